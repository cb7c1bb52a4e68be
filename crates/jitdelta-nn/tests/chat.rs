//! Tokenizer, streaming detokenization, stop tokens and chat templates on SmolLM2's real files
//! (prepared by `scripts/fetch-test-data.sh`).

use jitdelta_nn::chat::{
    eos_token_ids, ChatError, ChatTemplate, Message, ModelFiles, TokenOutputStream, Tokenizer,
};
use std::path::{Path, PathBuf};

fn cache_dir() -> PathBuf {
    match std::env::var_os("JITDELTA_CACHE") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata-cache"),
    }
}

fn model_dir(name: &str) -> PathBuf {
    let dir = cache_dir().join(name);
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        assert!(
            dir.join(f).is_file(),
            "test data {} is missing: run scripts/fetch-test-data.sh",
            dir.join(f).display()
        );
    }
    dir
}

fn smollm2() -> PathBuf {
    model_dir("smollm2-bf16")
}

/// Rendered by Python's jinja2 the way `transformers`' `apply_chat_template` renders it
/// (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
/// extensions=[loopcontrols])`, `render(messages=[{"role": "user", "content": "Hi"}],
/// tools=None, documents=None, add_generation_prompt=True, bos_token=..., eos_token=...)`) from
/// the `chat_template` of `testdata-cache/smollm2-bf16/tokenizer_config.json`.
const SMOLLM2_HI: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn smollm2_template_matches_python_jinja() {
    let template = ChatTemplate::from_dir(smollm2()).unwrap();
    assert!(!template.is_plain());
    assert_eq!(
        template.apply(&[Message::user("Hi")], true).unwrap(),
        SMOLLM2_HI
    );
    // Without the generation prompt the assistant cue is gone.
    let no_prompt = template.apply(&[Message::user("Hi")], false).unwrap();
    assert_eq!(
        no_prompt,
        SMOLLM2_HI.strip_suffix("<|im_start|>assistant\n").unwrap()
    );
    // A system message replaces the default one.
    let with_system = template
        .apply(&[Message::system("Be brief."), Message::user("Hi")], true)
        .unwrap();
    assert_eq!(
        with_system,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

/// A template exercising what Hugging Face templates rely on: `trim_blocks`/`lstrip_blocks`,
/// Python string methods, slicing, loop controls, `raise_exception`, `tojson` (compact and
/// indented, insertion order, non-ASCII kept), special-token variables, `tools` set to none.
const FEATURE_TEMPLATE: &str = "{%- if messages[0]['role'] == 'system' %}\n    {%- set system = messages[0]['content'].strip() %}\n    {%- set rest = messages[1:] %}\n{%- else %}\n    {%- set system = 'default' %}\n    {%- set rest = messages %}\n{%- endif %}\n{{ bos_token }}<<SYS>>{{ system }}<</SYS>>\n{% for m in rest %}\n    {% if m['role'] not in ['user', 'assistant'] %}\n        {{ raise_exception('unsupported role ' + m['role']) }}\n    {% endif %}\n    {% if m['content'].startswith('skip') %}\n        {% continue %}\n    {% endif %}\n[{{ loop.index0 }}] {{ m['role'] | upper }}: {{ m['content'] | trim }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n\n{% endfor %}\n{{ {'name': 'na\u{ef}ve \"x\"', 'args': [1, 2.5, true, none]} | tojson }}\n{{ {'name': 'n', 'args': [1]} | tojson(indent=2) }}\n{% if tools is none %}no tools{% endif %}\n{% if add_generation_prompt %}\nASSISTANT:\n{%- endif %}\n";

/// Rendered by Python's jinja2 with the environment described at [`SMOLLM2_HI`] (plus
/// `transformers`' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`), messages
/// `[system "  Be brief.  ", user "Hi", user "skip me", assistant " Hello! "]`,
/// bos_token `<|im_start|>`, eos_token `<|im_end|>`.
const FEATURE_EXPECTED: &str = "<|im_start|><<SYS>>Be brief.<</SYS>>\n[0] USER: Hi\n[2] ASSISTANT: Hello!<|im_end|>\n{\"name\": \"na\u{ef}ve \\\"x\\\"\", \"args\": [1, 2.5, true, null]}\n{\n  \"name\": \"n\",\n  \"args\": [\n    1\n  ]\n}\nno toolsASSISTANT:";

#[test]
fn hf_template_features_match_python_jinja() {
    let special = [
        ("bos_token".to_string(), "<|im_start|>".to_string()),
        ("eos_token".to_string(), "<|im_end|>".to_string()),
    ];
    let template = ChatTemplate::new(FEATURE_TEMPLATE, special.clone()).unwrap();
    let messages = [
        Message::system("  Be brief.  "),
        Message::user("Hi"),
        Message::user("skip me"),
        Message::assistant(" Hello! "),
    ];
    assert_eq!(template.apply(&messages, true).unwrap(), FEATURE_EXPECTED);

    let err = template
        .apply(&[Message::new("tool", "42")], true)
        .unwrap_err();
    assert!(matches!(err, ChatError::Template(_)));
    assert!(
        err.to_string().contains("unsupported role tool"),
        "raise_exception message lost: {err}"
    );
}

#[test]
fn plain_fallback_without_template() {
    // MiniLM (an encoder) has no chat template.
    let template = ChatTemplate::from_dir(model_dir("minilm-f32")).unwrap();
    assert!(template.is_plain());
    assert_eq!(template.source(), None);
    let text = template
        .apply(&[Message::system("a"), Message::user("b c")], true)
        .unwrap();
    assert_eq!(text, "a\nb c");
    assert_eq!(
        ChatTemplate::plain()
            .apply(&[Message::user("x")], true)
            .unwrap(),
        "x"
    );
}

#[test]
fn eos_ids_from_all_sources() {
    let dir = smollm2();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    // generation_config.json and config.json say 2; tokenizer_config.json's eos is <|im_end|> = 2.
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(eos_token_ids(&ModelFiles::Dir(dir), &tok).unwrap(), vec![2]);

    // An int list in generation_config.json, another id in config.json, a dict-form eos_token.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 7]}"#,
    )
    .unwrap();
    std::fs::write(tmp.path().join("config.json"), r#"{"eos_token_id": 5}"#).unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"eos_token": {"__type": "AddedToken", "content": "<|im_start|>"}}"#,
    )
    .unwrap();
    assert_eq!(
        eos_token_ids(&ModelFiles::Dir(tmp.path().to_path_buf()), &tok).unwrap(),
        vec![2, 7, 5, 1]
    );
    // Nothing there: no ids.
    let empty = tempfile::tempdir().unwrap();
    assert!(
        eos_token_ids(&ModelFiles::Dir(empty.path().to_path_buf()), &tok)
            .unwrap()
            .is_empty()
    );
}

const MULTIBYTE: &str = "naïve café 日本語 🙂";

#[test]
fn encode_decode_round_trip() {
    let tok = Tokenizer::from_dir(smollm2()).unwrap();
    for text in [
        MULTIBYTE,
        "Hello, world!",
        "  two  spaces\nand a newline",
        "",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Special tokens in the text are recognized as single tokens.
    let ids = tok.encode(SMOLLM2_HI, false).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tok.decode(&ids, false).unwrap(), SMOLLM2_HI);
    assert!(!tok.decode(&ids, true).unwrap().contains("<|im_start|>"));
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
}

fn stream_all(stream: &mut TokenOutputStream, ids: &[u32]) -> (String, usize) {
    let mut text = String::new();
    let mut held = 0;
    for &id in ids {
        match stream.next_token(id).unwrap() {
            Some(delta) => {
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "partial UTF-8 emitted: {delta:?}"
                );
                text.push_str(&delta);
            }
            None => held += 1,
        }
    }
    if let Some(rest) = stream.finish().unwrap() {
        text.push_str(&rest);
    }
    (text, held)
}

#[test]
fn streaming_decode_of_multibyte_text() {
    let tok = Tokenizer::from_dir(smollm2()).unwrap();
    let ids = tok.encode(MULTIBYTE, false).unwrap();
    let mut stream = tok.stream(false);
    let (text, held) = stream_all(&mut stream, &ids);
    assert_eq!(text, MULTIBYTE);
    assert_eq!(text, tok.decode(&ids, false).unwrap());
    // The byte-level BPE splits 日 and 語 across tokens: the stream must have held some back.
    assert!(held > 0, "expected partial characters to be held back");
    assert_eq!(stream.tokens(), ids.as_slice());
    assert_eq!(stream.decode_all().unwrap(), MULTIBYTE);

    // A templated conversation, special tokens skipped, then a reset and a second reply.
    let ids = tok
        .encode(
            &format!("{SMOLLM2_HI}Bonjour, ça va? 🙂🙂 — très bien.<|im_end|>"),
            false,
        )
        .unwrap();
    stream.clear();
    let mut stream = tok.stream(true);
    let (text, _) = stream_all(&mut stream, &ids);
    assert_eq!(text, tok.decode(&ids, true).unwrap());
    stream.clear();
    assert!(stream.tokens().is_empty());
}

#[test]
fn streaming_decode_wordpiece() {
    // A WordPiece decoder (joins `##` pieces, spaces between words): deltas still add up.
    let tok = Tokenizer::from_dir(model_dir("minilm-f32")).unwrap();
    let text = "Hello, world! Tokenization isn't naïve.";
    let ids = tok.encode(text, true).unwrap();
    let mut stream = tok.stream(true);
    let (streamed, _) = stream_all(&mut stream, &ids);
    assert_eq!(streamed, tok.decode(&ids, true).unwrap());
}

#[test]
fn files_from_inside_a_jitdelta_file() {
    // A tiny model folder with SmolLM2's text files, compressed to a .jd: tokenizer, template
    // and stop tokens come back from inside it.
    let src = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let w = candle_core::Tensor::arange(0f32, 64.0, &candle_core::Device::Cpu)
        .unwrap()
        .reshape((8, 8))
        .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("w".to_string(), w)]),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let jd_path = tmp.path().join("model.jd");
    jitdelta_format::compress_model(
        &dir,
        &jd_path,
        &jitdelta_format::EncodeOptions::default(),
        false,
    )
    .unwrap();
    let jd = jitdelta_format::JdFile::open(&jd_path).unwrap();
    let files = ModelFiles::Jd(jd.clone());
    let tok = Tokenizer::from_jd(&jd).unwrap();
    assert_eq!(
        tok.decode(&tok.encode(MULTIBYTE, false).unwrap(), false)
            .unwrap(),
        MULTIBYTE
    );
    assert_eq!(
        ChatTemplate::from_jd(&jd)
            .unwrap()
            .apply(&[Message::user("Hi")], true)
            .unwrap(),
        SMOLLM2_HI
    );
    assert_eq!(eos_token_ids(&files, &tok).unwrap(), vec![2]);
    assert!(files.read("nope.json").unwrap().is_none());

    // A .jd without tokenizer.json: a clear error.
    let bare = tmp.path().join("bare.jd");
    jitdelta_format::compress_model(
        &dir.join("model.safetensors"),
        &bare,
        &jitdelta_format::EncodeOptions::default(),
        false,
    )
    .unwrap();
    let bare = jitdelta_format::JdFile::open(&bare).unwrap();
    let err = Tokenizer::from_jd(&bare).err().expect("no tokenizer.json");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    assert!(ChatTemplate::from_jd(&bare).unwrap().is_plain());
}
