//! Unmodified candle-transformers BERT loads from a jitdelta file through
//! `jitdelta_nn::varbuilder` and computes sentence embeddings bit-identical to loading the
//! original safetensors. Real weights: all-MiniLM-L6-v2 (F32, and cast to BF16), prepared by
//! `scripts/fetch-test-data.sh`.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use jitdelta_format::{compress_model, EncodeOptions, JdFile};
use jitdelta_nn::varbuilder::{candle_dtype, var_builder, JdBackend, VarBuilderError};
use std::path::{Path, PathBuf};
use tokenizers::{PaddingParams, Tokenizer};

const SENTENCES: &[&str] = &[
    "The cat sits on the mat.",
    "A cat is sitting on a rug.",
    "Stock markets fell sharply after the announcement.",
    "Lossless compression keeps every bit of the original weights, naïvely or not.",
];

fn cache_dir() -> PathBuf {
    match std::env::var_os("JITDELTA_CACHE") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata-cache"),
    }
}

fn model_dir(name: &str) -> PathBuf {
    let dir = cache_dir().join(name);
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(
            dir.join(f).is_file(),
            "test data {} is missing: run scripts/fetch-test-data.sh",
            dir.join(f).display()
        );
    }
    dir
}

fn compress(dir: &Path, tmp: &Path) -> JdFile {
    let out = tmp.join("model.jd");
    compress_model(dir, &out, &EncodeOptions::default(), false).unwrap();
    JdFile::open(&out).unwrap()
}

/// Runs BERT on [`SENTENCES`] (one padded batch) and returns (last hidden state, mean-pooled
/// embeddings), both F32.
fn embed(vb: VarBuilder, dir: &Path) -> (Tensor, Tensor) {
    let config: Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let model = BertModel::load(vb, &config).unwrap();
    let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tokenizer.with_padding(Some(PaddingParams::default())); // pad to the longest sentence
    let enc = tokenizer.encode_batch(SENTENCES.to_vec(), true).unwrap();
    let stack = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| {
        let rows: Vec<Tensor> = enc
            .iter()
            .map(|e| Tensor::new(f(e), &Device::Cpu).unwrap())
            .collect();
        Tensor::stack(&rows, 0).unwrap()
    };
    let ids = stack(&|e| e.get_ids());
    let type_ids = stack(&|e| e.get_type_ids());
    let mask = stack(&|e| e.get_attention_mask());
    let hidden = model
        .forward(&ids, &type_ids, Some(&mask))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let mask = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let summed = hidden.broadcast_mul(&mask).unwrap().sum(1).unwrap();
    let pooled = summed.broadcast_div(&mask.sum(1).unwrap()).unwrap();
    (hidden, pooled)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

/// Loads `name` from safetensors and from its jitdelta file as `dtype`; the outputs must be
/// bit-identical (and sensible).
fn check_bit_identical(name: &str, dtype: DType) {
    let dir = model_dir(name);
    let tmp = tempfile::tempdir().unwrap();
    let jd = compress(&dir, tmp.path());

    // SAFETY: the test data is not modified while mapped.
    let st_vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], dtype, &Device::Cpu)
    }
    .unwrap();
    let (st_hidden, st_pooled) = embed(st_vb, &dir);
    let (jd_hidden, jd_pooled) = embed(var_builder(&jd, dtype, &Device::Cpu), &dir);

    assert_eq!(st_hidden.dims(), jd_hidden.dims());
    assert_eq!(st_pooled.dims(), &[SENTENCES.len(), 384]);
    assert!(
        bits(&st_hidden) == bits(&jd_hidden),
        "{name}: hidden states differ"
    );
    assert!(
        bits(&st_pooled) == bits(&jd_pooled),
        "{name}: embeddings differ"
    );

    // The embeddings mean something: the two cat sentences are closer than cat vs. stocks.
    let e = jd_pooled.to_vec2::<f32>().unwrap();
    assert!(e.iter().flatten().all(|x| x.is_finite()));
    let (near, far) = (cosine(&e[0], &e[1]), cosine(&e[0], &e[2]));
    assert!(
        near > far + 0.2,
        "{name}: cos(cat, cat) {near} vs cos(cat, stocks) {far}"
    );
}

#[test]
fn bert_f32_bit_identical() {
    check_bit_identical("minilm-f32", DType::F32);
}

#[test]
fn bert_bf16_upcast_to_f32_bit_identical() {
    check_bit_identical("minilm-bf16", DType::F32);
}

/// Bit patterns of a tensor of any dtype used here.
fn raw_bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .into_iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .into_iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u64)
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// Every tensor, in its stored dtype (no conversion), matches candle's safetensors loader bit
/// for bit. (candle-transformers' BERT itself cannot run in BF16: its attention mask multiplies
/// by `f32::MIN`, which rounds to -inf in BF16, so 0 * -inf gives NaN on either path.)
#[test]
fn every_tensor_bit_identical_in_stored_dtype() {
    for name in ["minilm-f32", "minilm-bf16", "minilm-f16"] {
        let dir = cache_dir().join(name);
        if name == "minilm-f16" && !dir.is_dir() {
            continue;
        }
        let dir = model_dir(name);
        let tmp = tempfile::tempdir().unwrap();
        let jd = compress(&dir, tmp.path());
        let st =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let backend = JdBackend::new(jd.clone());
        assert_eq!(jd.tensor_names().count(), st.len());
        for (tensor, want) in &st {
            let got = backend
                .load(tensor, Some(want.shape()), &Device::Cpu)
                .unwrap();
            assert_eq!(got.dtype(), want.dtype(), "{name} {tensor}");
            assert!(raw_bits(&got) == raw_bits(want), "{name} {tensor} differs");
        }
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = model_dir("minilm-f32");
    let tmp = tempfile::tempdir().unwrap();
    let missing = "encoder.layer.3.attention.self.key.weight";
    let mut tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.remove(missing).is_some());
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    candle_core::safetensors::save(&tensors, src.join("model.safetensors")).unwrap();
    let jd = compress(&src.join("model.safetensors"), tmp.path());

    let config: Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let err = BertModel::load(var_builder(&jd, DType::F32, &Device::Cpu), &config)
        .err()
        .expect("a model with a missing tensor must not load");
    let msg = err.to_string();
    assert!(
        msg.contains(missing),
        "error does not name the tensor: {msg}"
    );

    let backend = JdBackend::new(jd.clone());
    let err = backend.load(missing, None, &Device::Cpu).unwrap_err();
    assert!(matches!(&err, VarBuilderError::MissingTensor(n) if n == missing));
}

#[test]
fn shape_and_dtype_checks() {
    let dir = model_dir("minilm-bf16");
    let tmp = tempfile::tempdir().unwrap();
    let jd = compress(&dir, tmp.path());
    let vb = var_builder(&jd, DType::F32, &Device::Cpu);
    let name = "embeddings.word_embeddings.weight";
    assert!(vb.contains_tensor(name));
    assert!(!vb.contains_tensor("embeddings"));
    let ok = vb.get((30522, 384), name).unwrap();
    assert_eq!(ok.dtype(), DType::F32);
    let err = vb.get((384, 30522), name).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("[384, 30522]"), "{err}");

    // Integer tensors come back exactly, in their own dtype.
    let pos = vb
        .get_unchecked_dtype("embeddings.position_ids", DType::I64)
        .unwrap();
    assert_eq!(pos.dims(), &[1, 512]);
    assert_eq!(
        pos.flatten_all().unwrap().to_vec1::<i64>().unwrap(),
        (0..512).collect::<Vec<i64>>()
    );

    // The stored dtype is kept by `load`; `var_builder` converts.
    let raw = JdBackend::new(jd).load(name, None, &Device::Cpu).unwrap();
    assert_eq!(raw.dtype(), DType::BF16);

    assert_eq!(candle_dtype("BF16").unwrap().dtype, DType::BF16);
    assert_eq!(candle_dtype("F8_E4M3").unwrap().dtype, DType::F8E4M3);
    let u16 = candle_dtype("U16").unwrap();
    assert!(u16.widened && u16.dtype == DType::U32);
    for name in ["BOOL", "I8", "U64", "F8_E5M2", "F4", "nonsense"] {
        assert!(candle_dtype(name).is_none(), "{name}");
    }

    // A tensor candle cannot hold: a clear error naming it and its dtype.
    let header = br#"{"flag":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]}}"#;
    let mut header = header.to_vec();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(&header);
    st.extend_from_slice(&[1, 0, 0, 1]);
    let path = tmp.path().join("bool.safetensors");
    std::fs::write(&path, st).unwrap();
    let out = tmp.path().join("bool.jd");
    compress_model(&path, &out, &EncodeOptions::default(), false).unwrap();
    let backend = JdBackend::new(JdFile::open(&out).unwrap());
    let err = backend.load("flag", None, &Device::Cpu).unwrap_err();
    assert!(matches!(err, VarBuilderError::UnsupportedDtype { .. }));
    assert!(
        err.to_string().contains("`flag`") && err.to_string().contains("BOOL"),
        "{err}"
    );
}
