//! Real weights, end to end through the public whole-model API: MiniLM (BF16, F16, F32) and
//! SmolLM2-135M (BF16) compress, verify and decompress bit-exactly; MiniLM BF16 sits near the
//! entropy floor at rest and in the resident layout; a sharded model keeps its shards.
//!
//! The models come from `scripts/fetch-test-data.sh` (folder `$JITDELTA_CACHE`, default
//! `<repo>/testdata-cache`). Without them these tests fail, unless `JITDELTA_SKIP_REAL_DATA=1`.
//!
//!   cargo test -p jitdelta-format --test real_weights -- --nocapture   # prints the sizes

use jitdelta_format::{
    compress_model, decompress_model, file_stats, verify_model, EncodeOptions, JdFile,
};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Test data

fn cache_dir() -> PathBuf {
    std::env::var_os("JITDELTA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata-cache"))
}

/// The model folder `name` of the test-data cache, or `None` when it is missing and
/// `JITDELTA_SKIP_REAL_DATA=1`; missing data otherwise fails the test.
fn model(name: &str) -> Option<PathBuf> {
    let dir = cache_dir().join(name);
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    if std::env::var("JITDELTA_SKIP_REAL_DATA").is_ok_and(|v| v == "1") {
        eprintln!(
            "skipping: {} is missing (JITDELTA_SKIP_REAL_DATA=1)",
            dir.display()
        );
        return None;
    }
    panic!(
        "test data {} is missing: run scripts/fetch-test-data.sh (or set JITDELTA_CACHE to the \
         folder it prepared; JITDELTA_SKIP_REAL_DATA=1 skips these tests)",
        dir.join("model.safetensors").display()
    );
}

// ---------------------------------------------------------------------------------------------
// Comparison helpers

/// Relative paths of the non-weight files of a model folder, as compress_model stores them.
fn aux_files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if !name.ends_with(".safetensors") {
                let rel: Vec<String> = p
                    .strip_prefix(root)
                    .unwrap()
                    .iter()
                    .map(|c| c.to_string_lossy().into_owned())
                    .collect();
                out.push(rel.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn shard_files(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") && !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

fn metadata(bytes: &[u8]) -> Option<BTreeMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    meta.metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Same tensor names, dtypes, shapes, bytes and `__metadata__`.
fn assert_same_safetensors(original: &Path, restored: &Path) {
    let a = std::fs::read(original).unwrap();
    let b = std::fs::read(restored).unwrap();
    let sa = SafeTensors::deserialize(&a).unwrap();
    let sb = SafeTensors::deserialize(&b).unwrap();
    let mut na: Vec<String> = sa.names().into_iter().map(String::from).collect();
    let mut nb: Vec<String> = sb.names().into_iter().map(String::from).collect();
    na.sort();
    nb.sort();
    assert_eq!(na, nb, "{}: tensor names differ", restored.display());
    for name in &na {
        let ta = sa.tensor(name).unwrap();
        let tb = sb.tensor(name).unwrap();
        assert_eq!(ta.dtype(), tb.dtype(), "{name}: dtype");
        assert_eq!(ta.shape(), tb.shape(), "{name}: shape");
        assert!(ta.data() == tb.data(), "{name}: bytes differ");
    }
    assert_eq!(
        metadata(&a),
        metadata(&b),
        "{}: __metadata__",
        restored.display()
    );
    // Decompression keeps the original header: the whole file is byte-identical.
    assert!(
        a == b,
        "{}: same tensors but not byte-identical to {}",
        restored.display(),
        original.display()
    );
}

/// Every shard and auxiliary file of `original` is in `restored`, equal; nothing else is.
fn assert_same_folder(original: &Path, restored: &Path) {
    assert_eq!(shard_files(original), shard_files(restored), "shard files");
    for s in shard_files(original) {
        assert_same_safetensors(&original.join(&s), &restored.join(&s));
    }
    let aux = aux_files(original);
    assert!(!aux.is_empty());
    assert_eq!(aux, aux_files(restored), "auxiliary files");
    for f in &aux {
        let a = std::fs::read(original.join(f)).unwrap();
        let b = std::fs::read(restored.join(f)).unwrap();
        assert!(a == b, "auxiliary file {f} differs");
    }
}

/// Sum of the tensor data bytes of a safetensors file.
fn tensor_bytes(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .iter()
        .map(|(_, v)| v.data().len() as u64)
        .sum()
}

/// compress (folder) -> verify -> decompress (folder) -> compare; returns the .jd path.
fn roundtrip_folder(src: &Path, work: &Path) -> PathBuf {
    let jd = work.join("model.jd");
    let report = compress_model(src, &jd, &EncodeOptions::default(), false).unwrap();
    assert!(report.tensors > 0);
    let v = verify_model(&jd, src, false).unwrap();
    assert!(v.mismatches.is_empty(), "verify: {:#?}", v.mismatches);
    assert_eq!(v.tensors, report.tensors);
    let out = work.join("restored");
    decompress_model(&jd, &out, false).unwrap();
    assert_same_folder(src, &out);
    let stats = file_stats(&JdFile::open(&jd).unwrap()).unwrap();
    assert_eq!(stats.tensors.len(), report.tensors);
    assert_eq!(stats.file_bytes, std::fs::metadata(&jd).unwrap().len());
    jd
}

fn percent(a: u64, b: u64) -> f64 {
    100.0 * a as f64 / b as f64
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn minilm_bf16_roundtrip_size_and_resident() {
    let Some(src) = model("minilm-bf16") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let jd_path = roundtrip_folder(&src, work.path());

    // Size at rest: the weights alone (no auxiliary files) against their BF16 bytes.
    let single = work.path().join("weights.jd");
    let weights = src.join("model.safetensors");
    compress_model(&weights, &single, &EncodeOptions::default(), false).unwrap();
    let raw = tensor_bytes(&weights);
    let size = std::fs::metadata(&single).unwrap().len();
    println!(
        "MiniLM BF16: {size} bytes of .jd for {raw} bytes of BF16 tensors = {:.2}%",
        percent(size, raw)
    );
    assert!(
        percent(size, raw) <= 67.0,
        "MiniLM BF16 file is {:.2}% of BF16, above 67%",
        percent(size, raw)
    );
    let v = verify_model(&single, &weights, false).unwrap();
    assert!(v.mismatches.is_empty(), "{:#?}", v.mismatches);
    let out = work.path().join("one.safetensors");
    decompress_model(&single, &out, false).unwrap();
    assert_same_safetensors(&weights, &out);

    // Resident layout of every weight matrix.
    let bytes = std::fs::read(&weights).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let jd = JdFile::open(&jd_path).unwrap();
    let (mut held, mut raw_split, mut worst) = (0u64, 0u64, (0.0f64, String::new()));
    let mut matrices = 0;
    for name in jd.tensor_names() {
        let view = jd.tensor(name).unwrap();
        if view.format().is_none() {
            continue;
        }
        matrices += 1;
        let original = st.tensor(name).unwrap();
        let r = view.to_resident(3).unwrap();
        let mut exact = vec![0u8; original.data().len()];
        r.decode_exact(&mut exact).unwrap();
        assert!(exact == original.data(), "{name}: resident decode differs");
        let h = r.bytes_held() as u64;
        let p = percent(h, exact.len() as u64);
        if p > worst.0 {
            worst = (p, name.to_string());
        }
        held += h;
        raw_split += exact.len() as u64;
        assert!(
            p <= 76.0,
            "{name}: resident {h} bytes = {p:.2}% of BF16, above 76%"
        );
    }
    assert!(matrices >= 36, "only {matrices} split tensors");
    println!(
        "MiniLM BF16 resident(3): {held} bytes for {raw_split} bytes of {matrices} matrices = \
         {:.2}% (worst {:.2}% {})",
        percent(held, raw_split),
        worst.0,
        worst.1
    );
    assert!(percent(held, raw_split) <= 76.0);
}

#[test]
fn minilm_f16_roundtrip() {
    let Some(src) = model("minilm-f16") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let jd = roundtrip_folder(&src, work.path());
    let raw = tensor_bytes(&src.join("model.safetensors"));
    let size = std::fs::metadata(&jd).unwrap().len();
    println!(
        "MiniLM F16 (folder): {size} bytes = {:.2}% of {raw}",
        percent(size, raw)
    );
}

#[test]
fn minilm_f32_roundtrip() {
    let Some(src) = model("minilm-f32") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let jd = roundtrip_folder(&src, work.path());
    let raw = tensor_bytes(&src.join("model.safetensors"));
    let size = std::fs::metadata(&jd).unwrap().len();
    println!(
        "MiniLM F32 (folder): {size} bytes = {:.2}% of {raw}",
        percent(size, raw)
    );
}

#[test]
fn smollm2_bf16_roundtrip() {
    let Some(src) = model("smollm2-bf16") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let jd = roundtrip_folder(&src, work.path());
    let raw = tensor_bytes(&src.join("model.safetensors"));
    let size = std::fs::metadata(&jd).unwrap().len();
    println!(
        "SmolLM2 BF16 (folder): {size} bytes = {:.2}% of {raw}",
        percent(size, raw)
    );
}

/// MiniLM BF16 split into 3 shards with a `model.safetensors.index.json`: the shards come back
/// as the same 3 files holding the same tensors, with the auxiliary files.
#[test]
fn sharded_minilm_bf16_keeps_its_shards() {
    let Some(src) = model("minilm-bf16") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let sharded = work.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let shard_names: Vec<String> = (1..=3)
        .map(|i| format!("model-{i:05}-of-00003.safetensors"))
        .collect();
    let mut weight_map = serde_json::Map::new();
    let per = names.len().div_ceil(3);
    let mut total = 0usize;
    for (s, group) in names.chunks(per).enumerate() {
        let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = group
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        for (n, t) in &tensors {
            weight_map.insert(n.clone(), shard_names[s].clone().into());
            total += t.data().len();
        }
        // Give the shards different metadata: one with, one with other, one without.
        let meta: Option<HashMap<String, String>> = match s {
            0 => Some([("format".to_string(), "pt".to_string())].into()),
            1 => Some(
                [
                    ("format".to_string(), "pt".to_string()),
                    ("shard".to_string(), "2".to_string()),
                ]
                .into(),
            ),
            _ => None,
        };
        safetensors::serialize_to_file(tensors, meta, &sharded.join(&shard_names[s])).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), sharded.join(f)).unwrap();
    }
    assert_eq!(shard_files(&sharded), shard_names);

    let jd_path = roundtrip_folder(&sharded, work.path());
    let jd = JdFile::open(&jd_path).unwrap();
    let shards: Vec<&str> = jd.index().shards.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(shards, shard_names);
    // Each tensor is filed under the shard it came from.
    for t in &jd.index().tensors {
        let want = weight_map[&t.name].as_str().unwrap();
        assert_eq!(shard_names[t.shard as usize], want, "{}", t.name);
    }
    // A sharded model cannot be restored into one file.
    assert!(decompress_model(&jd_path, &work.path().join("one.safetensors"), false).is_err());
}

/// `CompressReport::output_bytes` is documented as the size of the jitdelta file: it must count
/// the index and footer too (small synthetic model; no test data needed).
#[test]
fn compress_report_counts_the_whole_file() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("model.safetensors");
    let w: Vec<u8> = (0..64 * 48u32)
        .flat_map(|i| half::bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) * 1e-4).to_le_bytes())
        .collect();
    let b = vec![0u8; 48 * 2];
    let tensors = vec![
        (
            "w",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![64, 48], &w)
                .unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![48], &b).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, &src).unwrap();
    let jd = work.path().join("model.jd");
    let report = compress_model(&src, &jd, &EncodeOptions::default(), false).unwrap();
    assert_eq!(report.tensors, 2);
    assert_eq!(report.input_bytes, std::fs::metadata(&src).unwrap().len());
    assert_eq!(
        report.output_bytes,
        std::fs::metadata(&jd).unwrap().len(),
        "CompressReport::output_bytes is not the size of the written file"
    );
}
