//! Whole-model conversion: safetensors (one file or a sharded folder) to jitdelta and back,
//! and bit-exact verification against the original.

use crate::container::TensorEntry;
use crate::reader::JdFile;
use crate::writer::{EncodeOptions, JdWriter};
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File extensions of other weight formats that a model folder may also carry; never stored.
const SKIPPED_WEIGHTS: &[&str] = &[
    "bin", "pt", "pth", "gguf", "h5", "msgpack", "onnx", "ckpt", "jd",
];

/// The safetensors files and auxiliary files that make up a model.
#[derive(Debug)]
pub struct ModelSource {
    /// Folder the relative names are based on.
    pub root: PathBuf,
    /// Shard file names, relative to `root`, in order.
    pub shards: Vec<String>,
    /// Auxiliary files (relative names), empty for a single-file input.
    pub files: Vec<String>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadSource {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl ModelSource {
    /// Finds the shards of `path`: a `.safetensors` file, or a folder with one or more
    /// `.safetensors` files (ordered by `model.safetensors.index.json` where present, by name
    /// otherwise) and the files that go with them.
    pub fn discover(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| bad(path, "file name is not UTF-8"))?;
            return Ok(Self {
                root: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                shards: vec![name.to_string()],
                files: Vec::new(),
            });
        }
        let mut all = Vec::new();
        walk(path, path, &mut all)?;
        all.sort();
        let mut shards: Vec<String> = all
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .cloned()
            .collect();
        let index_name = "model.safetensors.index.json";
        if all.iter().any(|f| f == index_name) {
            let text = std::fs::read(path.join(index_name))
                .map_err(|e| Error::io(path.join(index_name), e))?;
            let json: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| bad(&path.join(index_name), e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad(&path.join(index_name), "no weight_map object"))?;
            let mut listed: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            listed.sort();
            listed.dedup();
            for s in &listed {
                if !shards.contains(s) {
                    return Err(bad(
                        path,
                        format!("index names shard `{s}`, which is missing"),
                    ));
                }
            }
            shards = listed;
        }
        if shards.is_empty() {
            return Err(bad(path, "no .safetensors file in this folder"));
        }
        let files = all
            .into_iter()
            .filter(|f| !f.ends_with(".safetensors"))
            .filter(|f| {
                let ext = f.rsplit('.').next().unwrap_or("");
                !SKIPPED_WEIGHTS.contains(&ext)
            })
            .collect();
        Ok(Self {
            root: path.to_path_buf(),
            shards,
            files,
        })
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| bad(&p, "file name is not UTF-8"))?;
        if name.starts_with('.') {
            continue;
        }
        let ft = entry.file_type().map_err(|e| Error::io(&p, e))?;
        if ft.is_dir() {
            walk(root, &p, out)?;
        } else if ft.is_file() {
            let rel = p.strip_prefix(root).expect("walked from root");
            let rel: Vec<&str> = rel.iter().map(|c| c.to_str().unwrap_or("")).collect();
            out.push(rel.join("/"));
        }
    }
    Ok(())
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of a file we only read; see `drop_pages` for why that is fine.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

fn progress(total: u64, enabled: bool, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A summary of one compression run.
#[derive(Debug, Clone)]
pub struct CompressReport {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data read.
    pub input_bytes: u64,
    /// Size of the jitdelta file.
    pub output_bytes: u64,
}

/// Compresses a model (file or folder) into one jitdelta file at `output`.
///
/// Streams tensor by tensor from memory-mapped input; the output appears atomically.
pub fn compress_model(
    input: &Path,
    output: &Path,
    opts: &EncodeOptions,
    show_progress: bool,
) -> Result<CompressReport> {
    let source = ModelSource::discover(input)?;
    let maps: Vec<(PathBuf, memmap2::Mmap)> = source
        .shards
        .iter()
        .map(|s| {
            let p = source.root.join(s);
            map_file(&p).map(|m| (p, m))
        })
        .collect::<Result<_>>()?;
    let total: u64 = maps.iter().map(|(_, m)| m.len() as u64).sum();
    let bar = progress(total, show_progress, "compress");
    let mut writer = JdWriter::create(output)?;
    let mut tensors = 0;
    for (name, (path, map)) in source.shards.iter().zip(&maps) {
        let (header_len, meta) =
            SafeTensors::read_metadata(map).map_err(|e| bad(path, e.to_string()))?;
        let data_start = 8 + header_len;
        let metadata = meta.metadata().as_ref().map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        });
        let shard = writer.add_shard(name, metadata);
        writer.set_shard_header(shard, &map[8..data_start])?;
        let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> =
            meta.tensors().into_iter().collect();
        infos.sort_by_key(|(_, info)| info.data_offsets.0);
        for (tname, info) in infos {
            let (a, b) = info.data_offsets;
            let bytes = map.get(data_start + a..data_start + b).ok_or_else(|| {
                bad(
                    path,
                    format!("tensor `{tname}` lies past the end of the file"),
                )
            })?;
            let dtype = format!("{:?}", info.dtype);
            let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
            writer.add_tensor(&tname, &dtype, &shape, shard, bytes, opts)?;
            crate::reader::drop_pages(map, data_start + a, b - a);
            bar.inc((b - a) as u64);
            tensors += 1;
        }
    }
    for f in &source.files {
        let p = source.root.join(f);
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        writer.add_file(f, &bytes)?;
    }
    writer.finish()?;
    let output_bytes = std::fs::metadata(output)
        .map_err(|e| Error::io(output, e))?
        .len();
    bar.finish_and_clear();
    Ok(CompressReport {
        tensors,
        input_bytes: total,
        output_bytes,
    })
}

fn safetensors_header(
    tensors: &[&TensorEntry],
    metadata: &Option<BTreeMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::to_value(m)?);
    }
    let mut offset = 0u64;
    for t in tensors {
        let len = t.byte_len()? as u64;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut bytes = serde_json::to_vec(&header)?;
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    Ok(bytes)
}

/// Writes `dest` atomically: everything goes to a temporary file that is renamed at the end.
fn write_atomic(dest: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".jitdelta-")
        .suffix(".tmp")
        .permissions(crate::reader::new_file_permissions())
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp);
    fill(&mut out)?;
    let tmp = out.into_inner().map_err(|e| e.into_error())?;
    tmp.as_file().sync_all().map_err(|e| Error::io(dest, e))?;
    tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
    Ok(())
}

/// Restores the original safetensors file(s) and auxiliary files.
///
/// `output` ending in `.safetensors` writes a single file (the model must have one shard);
/// anything else is a folder that receives every shard under its original name plus the
/// auxiliary files.
pub fn decompress_model(input: &Path, output: &Path, show_progress: bool) -> Result<()> {
    let jd = JdFile::open(input)?;
    let index = jd.index();
    let single = output.extension().is_some_and(|e| e == "safetensors");
    if single && index.shards.len() != 1 {
        return Err(Error::InvalidOption(format!(
            "the model has {} shards; give a folder, not a .safetensors file",
            index.shards.len()
        )));
    }
    let total: u64 = index
        .tensors
        .iter()
        .map(|t| t.byte_len().unwrap_or(0) as u64)
        .sum();
    let bar = progress(total, show_progress, "decompress");
    for (s, shard) in index.shards.iter().enumerate() {
        let tensors: Vec<&TensorEntry> = index
            .tensors
            .iter()
            .filter(|t| t.shard as usize == s)
            .collect();
        let mut header = safetensors_header(&tensors, &shard.metadata)?;
        if let Some(blob) = &shard.header {
            let original = jd.read_blob(blob, &format!("shard `{}` header", shard.name))?;
            let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
            if parse(&original).is_none() || parse(&original) != parse(&header) {
                return Err(Error::corrupt(format!(
                    "shard `{}`: stored header does not describe the stored tensors",
                    shard.name
                )));
            }
            header = original;
        }
        let dest = if single {
            output.to_path_buf()
        } else {
            output.join(&shard.name)
        };
        write_atomic(&dest, |out| {
            out.write_all(&(header.len() as u64).to_le_bytes())?;
            out.write_all(&header)?;
            for t in &tensors {
                let view = jd.tensor(&t.name)?;
                view.decode_exact_streaming(|bytes| {
                    out.write_all(bytes)?;
                    bar.inc(bytes.len() as u64);
                    Ok(())
                })?;
                view.release_pages();
            }
            Ok(())
        })?;
    }
    if !single {
        for f in &index.files {
            let bytes = jd.aux_file(&f.name)?.expect("listed in the index");
            write_atomic(&output.join(&f.name), |out| Ok(out.write_all(&bytes)?))?;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// The outcome of [`verify_model`].
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// Tensors compared.
    pub tensors: usize,
    /// Bytes compared.
    pub bytes: u64,
    /// Every difference found (empty means bit-identical).
    pub mismatches: Vec<String>,
}

/// Checks that every tensor of `original` decodes bit-identically from `jd_path`, with the same
/// dtype, shape and shard metadata, and that the file holds no tensor the original lacks.
pub fn verify_model(jd_path: &Path, original: &Path, show_progress: bool) -> Result<VerifyReport> {
    let jd = JdFile::open(jd_path)?;
    let source = ModelSource::discover(original)?;
    let mut report = VerifyReport::default();
    let mut seen = std::collections::HashSet::new();
    let total: u64 = source
        .shards
        .iter()
        .map(|s| {
            std::fs::metadata(source.root.join(s))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    let bar = progress(total, show_progress, "verify");
    for shard_name in &source.shards {
        let path = source.root.join(shard_name);
        let map = map_file(&path)?;
        let st = SafeTensors::deserialize(&map).map_err(|e| bad(&path, e.to_string()))?;
        let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(&path, e.to_string()))?;
        let want_meta = meta.metadata().as_ref().map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        });
        match jd.index().shards.iter().find(|s| &s.name == shard_name) {
            None => report
                .mismatches
                .push(format!("shard `{shard_name}` missing")),
            Some(s) if s.metadata != want_meta => report
                .mismatches
                .push(format!("shard `{shard_name}`: metadata differs")),
            _ => {}
        }
        for (name, view) in st.tensors() {
            seen.insert(name.clone());
            let t = match jd.tensor(&name) {
                Ok(t) => t,
                Err(Error::TensorNotFound(_)) => {
                    report.mismatches.push(format!("tensor `{name}` missing"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let e = t.entry();
            let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
            if e.dtype != format!("{:?}", view.dtype()) || e.shape != shape {
                report.mismatches.push(format!(
                    "tensor `{name}`: {} {:?} in the file, {:?} {:?} in the original",
                    e.dtype,
                    e.shape,
                    view.dtype(),
                    shape
                ));
                continue;
            }
            let want = view.data();
            let mut at = 0usize;
            let mut first_diff = None;
            let compared = t.decode_exact_streaming(|bytes| {
                if first_diff.is_none() && bytes != &want[at..at + bytes.len()] {
                    let i = bytes.iter().zip(&want[at..]).position(|(a, b)| a != b);
                    first_diff = Some(at + i.unwrap_or(0));
                }
                at += bytes.len();
                Ok(())
            });
            match (compared, first_diff) {
                (Ok(()), None) => {}
                (Ok(()), Some(at)) => report
                    .mismatches
                    .push(format!("tensor `{name}`: bytes differ from offset {at}")),
                (Err(err), _) => report.mismatches.push(format!("tensor `{name}`: {err}")),
            }
            t.release_pages();
            let start = want.as_ptr() as usize - map.as_ptr() as usize;
            crate::reader::drop_pages(&map, start, want.len());
            report.tensors += 1;
            report.bytes += view.data().len() as u64;
            bar.inc(view.data().len() as u64);
        }
    }
    for name in jd.tensor_names() {
        if !seen.contains(name) {
            report
                .mismatches
                .push(format!("tensor `{name}` is not in the original"));
        }
    }
    bar.finish_and_clear();
    Ok(report)
}
