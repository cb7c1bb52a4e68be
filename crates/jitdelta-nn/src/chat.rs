//! Text around a language model: tokenizer, streaming detokenization, stop tokens and the chat
//! template.
//!
//! Everything reads a model's auxiliary files (`tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`, `config.json`, `chat_template.jinja`) through [`ModelFiles`],
//! either from a model folder or from inside a jitdelta file (which stores them next to the
//! weights).
//!
//! ```no_run
//! use jitdelta_nn::chat::{ChatTemplate, Message, ModelFiles, Tokenizer, eos_token_ids};
//!
//! # fn main() -> Result<(), jitdelta_nn::chat::ChatError> {
//! let jd = jitdelta_format::JdFile::open("smollm2.jd")?;
//! let files = ModelFiles::Jd(jd);
//! let tokenizer = Tokenizer::load(&files)?;
//! let template = ChatTemplate::load(&files)?;
//! let stop = eos_token_ids(&files, &tokenizer)?;
//! let prompt = template.apply(&[Message::user("Hi")], true)?;
//! let ids = tokenizer.encode(&prompt, false)?;
//! let mut stream = tokenizer.stream(true);
//! for &id in &ids {
//!     if let Some(delta) = stream.next_token(id)? {
//!         print!("{delta}");
//!     }
//! }
//! # let _ = stop;
//! # Ok(())
//! # }
//! ```

use jitdelta_format::JdFile;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed.
    #[error("{file}: {source}")]
    Json {
        /// The file name.
        file: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A file the operation needs is not there.
    #[error("the model has no `{0}`")]
    MissingFile(String),
    /// The tokenizer failed to load, encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to compile or render (including `raise_exception`).
    #[error("chat template: {0}")]
    Template(#[from] minijinja::Error),
    /// Reading an auxiliary file from a jitdelta file failed.
    #[error(transparent)]
    Format(#[from] jitdelta_format::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ChatError>;

fn tok_err(e: impl std::fmt::Display) -> ChatError {
    ChatError::Tokenizer(e.to_string())
}

/// Where a model's auxiliary files live.
#[derive(Clone)]
pub enum ModelFiles {
    /// A model folder (files read from `folder/name`).
    Dir(PathBuf),
    /// A jitdelta file (files read with [`JdFile::aux_file`]).
    Jd(JdFile),
}

impl ModelFiles {
    /// The bytes of file `name`, `None` when it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Self::Dir(dir) => {
                let path = dir.join(name);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(ChatError::Io { path, source }),
                }
            }
            Self::Jd(jd) => Ok(jd.aux_file(name)?),
        }
    }

    /// File `name` parsed as JSON, `None` when it does not exist.
    pub fn read_json(&self, name: &str) -> Result<Option<serde_json::Value>> {
        self.read(name)?
            .map(|b| {
                serde_json::from_slice(&b).map_err(|source| ChatError::Json {
                    file: name.to_string(),
                    source,
                })
            })
            .transpose()
    }
}

/// A Hugging Face tokenizer (`tokenizer.json`). Cloning is cheap (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
}

impl Tokenizer {
    /// Parses the contents of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(tok_err)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ChatError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Loads `tokenizer.json` from a model folder or jitdelta file.
    pub fn load(files: &ModelFiles) -> Result<Self> {
        let bytes = files
            .read("tokenizer.json")?
            .ok_or_else(|| ChatError::MissingFile("tokenizer.json".into()))?;
        Self::from_bytes(&bytes)
    }

    /// Loads `folder/tokenizer.json`.
    pub fn from_dir(folder: impl AsRef<Path>) -> Result<Self> {
        Self::load(&ModelFiles::Dir(folder.as_ref().to_path_buf()))
    }

    /// Loads the `tokenizer.json` stored inside a jitdelta file.
    pub fn from_jd(jd: &JdFile) -> Result<Self> {
        Self::load(&ModelFiles::Jd(jd.clone()))
    }

    /// Token ids of `text`. `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (e.g. BOS); pass `false` for text rendered by a chat template, which carries its own.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// The id of a token (including added tokens such as `<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn stream(&self, skip_special_tokens: bool) -> TokenOutputStream {
        TokenOutputStream::new(self.clone(), skip_special_tokens)
    }
}

/// Incremental detokenization: feed generated tokens one at a time, get the new text as soon as
/// it is complete.
///
/// Text is emitted only when it does not end in a partial UTF-8 sequence (a byte-level token that
/// holds half of `é` or of an emoji is held back until the rest arrives), and each delta is taken
/// against a window that starts one emitted step back, so decoders that treat the first token
/// specially (SentencePiece's leading space) give the same text as a full decode. The deltas
/// plus [`TokenOutputStream::finish`] concatenate to the full decode of the tokens.
pub struct TokenOutputStream {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TokenOutputStream {
    /// An empty stream.
    pub fn new(tokenizer: Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    fn delta(&mut self, hold_partial: bool) -> Result<Option<String>> {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, self.skip_special_tokens);
        let prefix_text = decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let new_text = decode(&self.tokens[self.prefix_offset..])?;
        if new_text.len() <= prefix_text.len() || (hold_partial && new_text.ends_with('\u{FFFD}')) {
            return Ok(None);
        }
        let delta = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_string(),
            // The window re-decoded differently (rare normalizing decoders): emit from the first
            // char boundary past the old text.
            None => {
                let mut start = prefix_text.len();
                while !new_text.is_char_boundary(start) {
                    start += 1;
                }
                new_text[start..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Ok(Some(delta))
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn next_token(&mut self, id: u32) -> Result<Option<String>> {
        self.tokens.push(id);
        self.delta(true)
    }

    /// The text still held back (an incomplete UTF-8 sequence at the very end decodes to U+FFFD
    /// here); call once after the last token.
    pub fn finish(&mut self) -> Result<Option<String>> {
        self.delta(false)
    }

    /// Every token fed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Full decode of every token fed so far.
    pub fn decode_all(&self) -> Result<String> {
        self.tokenizer
            .decode(&self.tokens, self.skip_special_tokens)
    }

    /// Forgets every token (start of a new reply).
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
    }
}

/// Appends the ids of a `eos_token_id` JSON field (an integer or a list of integers).
fn push_ids(v: Option<&serde_json::Value>, out: &mut Vec<u32>) {
    match v {
        Some(serde_json::Value::Number(n)) => {
            if let Some(id) = n.as_u64().and_then(|n| u32::try_from(n).ok()) {
                out.push(id);
            }
        }
        Some(serde_json::Value::Array(a)) => {
            for x in a {
                push_ids(Some(x), out);
            }
        }
        _ => {}
    }
}

/// A special token in `tokenizer_config.json`: a string, or an `AddedToken` object with
/// `content`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// The token ids that end a reply: the union, in this order and without repeats, of
/// `generation_config.json`'s `eos_token_id`, `config.json`'s `eos_token_id` (also under
/// `text_config`), each an integer or a list, and the id of `tokenizer_config.json`'s
/// `eos_token`. Empty when none of them is there.
pub fn eos_token_ids(files: &ModelFiles, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    if let Some(g) = files.read_json("generation_config.json")? {
        push_ids(g.get("eos_token_id"), &mut ids);
    }
    if let Some(c) = files.read_json("config.json")? {
        push_ids(c.get("eos_token_id"), &mut ids);
        push_ids(
            c.get("text_config").and_then(|t| t.get("eos_token_id")),
            &mut ids,
        );
    }
    if let Some(t) = files.read_json("tokenizer_config.json")? {
        if let Some(id) = token_string(t.get("eos_token")).and_then(|s| tokenizer.token_to_id(&s)) {
            ids.push(id);
        }
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    Ok(ids)
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Special-token variables `transformers` hands to chat templates.
const SPECIAL_TOKEN_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A model's chat template, rendered the way `transformers`' `apply_chat_template` does: Jinja
/// with `trim_blocks` and `lstrip_blocks`, loop controls, Python string/dict methods
/// (`.strip()`, `.startswith()`, `.items()`, ...), a `raise_exception(msg)` function, a
/// Python-style `tojson` filter, the special tokens of `tokenizer_config.json` (`bos_token`,
/// `eos_token`, ...) as variables, and `tools`/`documents` set to none. `strftime_now` is not
/// provided (templates that use it test `is defined` and fall back).
///
/// A model without a template gets the plain one: the messages' contents joined by newlines.
pub struct ChatTemplate {
    env: Option<Environment<'static>>,
    source: Option<String>,
    special_tokens: Vec<(String, String)>,
}

const TEMPLATE_NAME: &str = "chat_template";

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`
/// as in `transformers`' chat template environment.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v).unwrap_or(0)),
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let a: String = v.get_item(&Value::from(0))?.to_string();
            let b: String = v.get_item(&Value::from(1))?.to_string();
            (a, b)
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let json = Json {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    json.write(value, 0, &mut out)?;
    Ok(Value::from(out))
}

struct Json {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl Json {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn string(s: &str, out: &mut String) {
        out.push_str(&serde_json::to_string(s).expect("strings serialize"));
    }

    fn write(
        &self,
        v: &Value,
        depth: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if let Ok(i) = i64::try_from(v.clone()) {
                    out.push_str(&i.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    if f.is_finite() {
                        out.push_str(&format!("{f:?}"));
                    } else if f.is_nan() {
                        out.push_str("NaN");
                    } else if f > 0.0 {
                        out.push_str("Infinity");
                    } else {
                        out.push_str("-Infinity");
                    }
                }
            }
            ValueKind::String => Self::string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    match k.as_str() {
                        Some(s) => Self::string(s, out),
                        None => Self::string(&k.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push('}');
            }
            _ => Self::string(&v.to_string(), out),
        }
        Ok(())
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template. `special_tokens` are `(name, token)` variables such as
    /// `("bos_token", "<s>")`.
    pub fn new(
        template: impl Into<String>,
        special_tokens: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let source = template.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())?;
        Ok(Self {
            env: Some(env),
            source: Some(source),
            special_tokens: special_tokens.into_iter().collect(),
        })
    }

    /// The plain template: the messages' contents joined by newlines, no markup.
    pub fn plain() -> Self {
        Self {
            env: None,
            source: None,
            special_tokens: Vec::new(),
        }
    }

    /// The model's template: `chat_template.jinja`, else `chat_template.json`'s
    /// `chat_template`, else `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// named templates of which `default` is taken), with the special tokens of
    /// `tokenizer_config.json`; [`ChatTemplate::plain`] when the model has none.
    pub fn load(files: &ModelFiles) -> Result<Self> {
        let config = files.read_json("tokenizer_config.json")?;
        let special_tokens: Vec<(String, String)> = config
            .as_ref()
            .map(|c| {
                SPECIAL_TOKEN_KEYS
                    .iter()
                    .filter_map(|k| token_string(c.get(*k)).map(|t| (k.to_string(), t)))
                    .collect()
            })
            .unwrap_or_default();
        let from_json = |v: Option<&serde_json::Value>| -> Option<String> {
            match v? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(list) => {
                    let named = |name: &str| {
                        list.iter()
                            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                    };
                    named("default")
                        .or_else(|| list.first())?
                        .get("template")?
                        .as_str()
                        .map(String::from)
                }
                _ => None,
            }
        };
        let template = match files.read("chat_template.jinja")? {
            Some(bytes) => Some(String::from_utf8(bytes).map_err(|e| {
                ChatError::Tokenizer(format!("chat_template.jinja is not UTF-8: {e}"))
            })?),
            None => match files.read_json("chat_template.json")? {
                Some(j) => from_json(j.get("chat_template")),
                None => None,
            },
        }
        .or_else(|| from_json(config.as_ref().and_then(|c| c.get("chat_template"))));
        match template {
            Some(t) => Self::new(t, special_tokens),
            None => Ok(Self::plain()),
        }
    }

    /// [`ChatTemplate::load`] from a model folder.
    pub fn from_dir(folder: impl AsRef<Path>) -> Result<Self> {
        Self::load(&ModelFiles::Dir(folder.as_ref().to_path_buf()))
    }

    /// [`ChatTemplate::load`] from the files stored inside a jitdelta file.
    pub fn from_jd(jd: &JdFile) -> Result<Self> {
        Self::load(&ModelFiles::Jd(jd.clone()))
    }

    /// `true` for the plain template (the model has no chat template).
    pub fn is_plain(&self) -> bool {
        self.env.is_none()
    }

    /// The Jinja source, `None` for the plain template.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The special-token variables handed to the template.
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    /// Renders a conversation. With `add_generation_prompt`, the text ends with the template's
    /// cue for the assistant's reply. Encode the result without adding special tokens.
    pub fn apply(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let Some(env) = &self.env else {
            return Ok(messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"));
        };
        let mut ctx: std::collections::BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        Ok(env.get_template(TEMPLATE_NAME)?.render(ctx)?)
    }
}
