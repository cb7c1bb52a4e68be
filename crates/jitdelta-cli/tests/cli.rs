//! The `jitdelta` binary end to end on MiniLM BF16 (compress, verify, inspect, decompress), and
//! its behaviour on bad input: a non-zero exit, one `jitdelta: error:` line on stderr (after the
//! mismatch lines, for `verify`), never a panic.
//!
//! MiniLM comes from `scripts/fetch-test-data.sh` (folder `$JITDELTA_CACHE`, default
//! `<repo>/testdata-cache`); without it the tests that need it fail, unless
//! `JITDELTA_SKIP_REAL_DATA=1`.

use jitdelta_format::{Encoding, JdFile};
use safetensors::SafeTensors;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_jitdelta");

fn jitdelta<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(!text(&out.stderr).contains("panicked"));
}

/// Non-zero exit; stderr is exactly one line, `jitdelta: error: ...`; no panic.
#[track_caller]
fn assert_clean_error(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, exit 0\n--- stdout\n{}\n--- stderr\n{stderr}",
        text(&out.stdout)
    );
    assert!(
        out.status.code().is_some(),
        "killed by a signal: {:?}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("jitdelta: error:"),
        "stderr is not one `jitdelta: error:` line:\n{stderr}"
    );
    stderr
}

// ---------------------------------------------------------------------------------------------
// Test data and the shared fixture

fn cache_dir() -> PathBuf {
    std::env::var_os("JITDELTA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata-cache"))
}

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
        "test data {} is missing: run scripts/fetch-test-data.sh (or set JITDELTA_CACHE; \
         JITDELTA_SKIP_REAL_DATA=1 skips these tests)",
        dir.join("model.safetensors").display()
    );
}

/// MiniLM BF16 compressed once per test run, as a file and as a folder (with aux files).
struct Fixture {
    src: PathBuf,
    from_file: PathBuf,
    from_folder: PathBuf,
}

fn scratch_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Removes fixture folders left by earlier runs whose process is gone (statics are not dropped).
fn clean_stale_fixtures() {
    let Ok(entries) = std::fs::read_dir(scratch_root()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("cli-fixture-") {
            if pid != std::process::id().to_string() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let src = model("minilm-bf16")?;
        clean_stale_fixtures();
        let dir = scratch_root().join(format!("cli-fixture-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let from_file = dir.join("file.jd");
        let out = jitdelta([
            "--quiet".as_ref(),
            "compress".as_ref(),
            src.join("model.safetensors").as_os_str(),
            from_file.as_os_str(),
        ]);
        assert_ok(&out);
        assert!(
            text(&out.stderr).starts_with("compressed "),
            "{}",
            text(&out.stderr)
        );
        let from_folder = dir.join("folder.jd");
        assert_ok(&jitdelta([
            "compress".as_ref(),
            src.as_os_str(),
            from_folder.as_os_str(),
        ]));
        Some(Fixture {
            src,
            from_file,
            from_folder,
        })
    })
    .as_ref()
}

/// A per-test scratch folder in the target's tmp folder (removed when dropped).
fn scratch() -> tempfile::TempDir {
    std::fs::create_dir_all(scratch_root()).unwrap();
    tempfile::tempdir_in(scratch_root()).unwrap()
}

/// Tensor names, dtypes, shapes and bytes are equal.
#[track_caller]
fn assert_same_tensors(a: &Path, b: &Path) {
    let (ba, bb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let (sa, sb) = (
        SafeTensors::deserialize(&ba).unwrap(),
        SafeTensors::deserialize(&bb).unwrap(),
    );
    let mut na = sa.names();
    let mut nb = sb.names();
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    for n in na {
        let (ta, tb) = (sa.tensor(n).unwrap(), sb.tensor(n).unwrap());
        assert_eq!(ta.dtype(), tb.dtype(), "{n}");
        assert_eq!(ta.shape(), tb.shape(), "{n}");
        assert!(ta.data() == tb.data(), "{n}: bytes differ");
    }
}

/// A small synthetic model of `shards` shards (with an index when sharded) and a config file.
fn synthetic_model(dir: &Path, shards: usize) -> PathBuf {
    let root = dir.join(format!("synthetic-{shards}"));
    std::fs::create_dir_all(&root).unwrap();
    let data: Vec<Vec<u8>> = (0..4u32)
        .map(|t| {
            (0..40 * 24u32)
                .flat_map(|i| {
                    let x = ((i * 7919 + t * 104729) % 2001) as f32 / 1000.0 - 1.0;
                    half::bf16::from_f32(x * 0.05).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", s + 1)
        };
        let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = (0..4)
            .filter(|t| t % shards == s)
            .map(|t| {
                weight_map.insert(format!("layer{t}.weight"), file.clone().into());
                (
                    format!("layer{t}.weight"),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::BF16,
                        vec![40, 24],
                        &data[t],
                    )
                    .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(tensors, None, &root.join(file)).unwrap();
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(root.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    std::fs::write(root.join("config.json"), b"{\"hidden_size\": 24}").unwrap();
    root
}

// ---------------------------------------------------------------------------------------------
// The happy path

#[test]
fn verify_inspect_and_decompress_a_file() {
    let Some(f) = fixture() else { return };
    let v = jitdelta([
        "verify".as_ref(),
        f.from_file.as_os_str(),
        f.src.join("model.safetensors").as_os_str(),
    ]);
    assert_ok(&v);
    assert_eq!(v.status.code(), Some(0));
    assert!(text(&v.stdout).starts_with("ok: "), "{}", text(&v.stdout));

    let i = jitdelta(["inspect".as_ref(), f.from_file.as_os_str()]);
    assert_ok(&i);
    let table = text(&i.stdout);
    assert!(table.starts_with("tensor "), "{table}");
    let total = table
        .lines()
        .find(|l| l.starts_with("total: "))
        .unwrap_or_else(|| panic!("no total line:\n{table}"));
    assert!(total.contains("% of raw"), "{total}");
    assert!(table.contains("bits/weight:"));

    let j = jitdelta([
        "inspect".as_ref(),
        "--json".as_ref(),
        f.from_file.as_os_str(),
    ]);
    assert_ok(&j);
    let json: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    let tensors = json["tensors"].as_array().expect("tensors array");
    let jd = JdFile::open(&f.from_file).unwrap();
    assert_eq!(tensors.len(), jd.tensor_names().count());
    assert!(tensors.len() > 50);
    assert_eq!(
        json["file_bytes"].as_u64(),
        Some(std::fs::metadata(&f.from_file).unwrap().len())
    );
    assert!(tensors.iter().any(|t| t["kind"] == "bitplane"));

    let tmp = scratch();
    let out = tmp.path().join("restored.safetensors");
    assert_ok(&jitdelta([
        "decompress".as_ref(),
        f.from_file.as_os_str(),
        out.as_os_str(),
    ]));
    assert_same_tensors(&f.src.join("model.safetensors"), &out);
}

#[test]
fn folder_roundtrip_with_aux_files() {
    let Some(f) = fixture() else { return };
    assert_ok(&jitdelta([
        "verify".as_ref(),
        f.from_folder.as_os_str(),
        f.src.as_os_str(),
    ]));
    let tmp = scratch();
    let out = tmp.path().join("restored");
    assert_ok(&jitdelta([
        "decompress".as_ref(),
        f.from_folder.as_os_str(),
        out.as_os_str(),
    ]));
    assert_same_tensors(
        &f.src.join("model.safetensors"),
        &out.join("model.safetensors"),
    );
    for aux in [
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "1_Pooling/config.json",
        "modules.json",
    ] {
        let a = std::fs::read(f.src.join(aux)).unwrap();
        let b = std::fs::read(out.join(aux)).unwrap_or_else(|e| panic!("{aux}: {e}"));
        assert!(a == b, "{aux} differs");
    }
    // The restored folder verifies against the same file.
    assert_ok(&jitdelta([
        "verify".as_ref(),
        f.from_folder.as_os_str(),
        out.as_os_str(),
    ]));
}

#[test]
fn single_shard_model_decompresses_into_a_folder() {
    let Some(f) = fixture() else { return };
    let tmp = scratch();
    let out = tmp.path().join("as-folder");
    assert_ok(&jitdelta([
        "decompress".as_ref(),
        f.from_file.as_os_str(),
        out.as_os_str(),
    ]));
    assert_same_tensors(
        &f.src.join("model.safetensors"),
        &out.join("model.safetensors"),
    );
}

#[test]
fn sharded_model_roundtrips_through_a_folder() {
    let tmp = scratch();
    let src = synthetic_model(tmp.path(), 2);
    let jd = tmp.path().join("sharded.jd");
    assert_ok(&jitdelta([
        "compress".as_ref(),
        src.as_os_str(),
        jd.as_os_str(),
    ]));
    assert_ok(&jitdelta([
        "verify".as_ref(),
        jd.as_os_str(),
        src.as_os_str(),
    ]));
    let out = tmp.path().join("restored");
    assert_ok(&jitdelta([
        "decompress".as_ref(),
        jd.as_os_str(),
        out.as_os_str(),
    ]));
    for s in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert_same_tensors(&src.join(s), &out.join(s));
    }
    for aux in ["config.json", "model.safetensors.index.json"] {
        assert_eq!(
            std::fs::read(src.join(aux)).unwrap(),
            std::fs::read(out.join(aux)).unwrap()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn missing_inputs() {
    let tmp = scratch();
    let missing = tmp.path().join("does-not-exist.safetensors");
    let out_jd = tmp.path().join("out.jd");
    let e = assert_clean_error(&jitdelta([
        "compress".as_ref(),
        missing.as_os_str(),
        out_jd.as_os_str(),
    ]));
    assert!(e.contains("does-not-exist"), "{e}");
    assert!(!out_jd.exists());
    let missing_jd = tmp.path().join("nope.jd");
    assert_clean_error(&jitdelta(["inspect".as_ref(), missing_jd.as_os_str()]));
    assert_clean_error(&jitdelta([
        "decompress".as_ref(),
        missing_jd.as_os_str(),
        tmp.path().join("o").as_os_str(),
    ]));
    assert_clean_error(&jitdelta([
        "verify".as_ref(),
        missing_jd.as_os_str(),
        missing.as_os_str(),
    ]));
    // Output folder that cannot be created.
    let src = synthetic_model(tmp.path(), 1);
    let blocked = tmp.path().join("a-file");
    std::fs::write(&blocked, b"x").unwrap();
    assert_clean_error(&jitdelta([
        "compress".as_ref(),
        src.as_os_str(),
        blocked.join("sub/out.jd").as_os_str(),
    ]));
}

#[test]
fn non_safetensors_inputs() {
    let tmp = scratch();
    let out_jd = tmp.path().join("out.jd");
    for (name, bytes) in [
        (
            "text.safetensors",
            &b"this is not a safetensors file at all"[..],
        ),
        ("empty.safetensors", b""),
        (
            "huge-header.safetensors",
            &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, b'{', b'}'],
        ),
        (
            "bad-json.safetensors",
            &[4, 0, 0, 0, 0, 0, 0, 0, b'{', b'x', b'}', b' '],
        ),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        assert_clean_error(&jitdelta([
            "compress".as_ref(),
            p.as_os_str(),
            out_jd.as_os_str(),
        ]));
        assert!(!out_jd.exists(), "{name}: a partial output was left");
    }
    // A folder with no weights.
    let empty = tmp.path().join("empty-folder");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("config.json"), b"{}").unwrap();
    assert_clean_error(&jitdelta([
        "compress".as_ref(),
        empty.as_os_str(),
        out_jd.as_os_str(),
    ]));
    // A safetensors file given where a .jd is expected.
    let st = synthetic_model(tmp.path(), 1).join("model.safetensors");
    let e = assert_clean_error(&jitdelta(["inspect".as_ref(), st.as_os_str()]));
    assert!(e.contains("not a jitdelta file"), "{e}");
}

#[test]
fn truncated_jd() {
    let Some(f) = fixture() else { return };
    let tmp = scratch();
    let bytes = std::fs::read(&f.from_file).unwrap();
    for len in [0, 10, 100, bytes.len() / 2, bytes.len() - 1] {
        let cut = tmp.path().join(format!("cut-{len}.jd"));
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let e = assert_clean_error(&jitdelta(["inspect".as_ref(), cut.as_os_str()]));
        assert!(e.contains("truncated"), "{len}: {e}");
        assert_clean_error(&jitdelta([
            "verify".as_ref(),
            cut.as_os_str(),
            f.src.as_os_str(),
        ]));
        let out = tmp.path().join("out.safetensors");
        assert_clean_error(&jitdelta([
            "decompress".as_ref(),
            cut.as_os_str(),
            out.as_os_str(),
        ]));
        assert!(!out.exists());
    }
}

#[test]
fn flipped_bit_in_a_chunk() {
    let Some(f) = fixture() else { return };
    let tmp = scratch();
    let mut bytes = std::fs::read(&f.from_file).unwrap();
    let (name, at) = {
        let jd = JdFile::open(&f.from_file).unwrap();
        let t = jd
            .index()
            .tensors
            .iter()
            .find(|t| matches!(t.encoding, Encoding::Bitplane { .. }))
            .unwrap();
        let Encoding::Bitplane { chunking, .. } = &t.encoding else {
            unreachable!()
        };
        let c = chunking.chunks[chunking.chunks.len() / 2];
        (
            t.name.clone(),
            (c.offset + c.base_len + c.residual_len / 2) as usize,
        )
    };
    bytes[at] ^= 0x08;
    let bad = tmp.path().join("flipped.jd");
    std::fs::write(&bad, &bytes).unwrap();

    let v = jitdelta([
        "verify".as_ref(),
        bad.as_os_str(),
        f.src.join("model.safetensors").as_os_str(),
    ]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v.stderr));
    let stderr = text(&v.stderr);
    assert!(!stderr.contains("panicked"));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with("mismatch: ")
            && lines[0].contains(&name)
            && lines[0].contains("checksum"),
        "{stderr}"
    );
    assert_eq!(lines[1], "jitdelta: error: 1 mismatches");

    let out = tmp.path().join("out.safetensors");
    let e = assert_clean_error(&jitdelta([
        "decompress".as_ref(),
        bad.as_os_str(),
        out.as_os_str(),
    ]));
    assert!(e.contains("checksum"), "{e}");
    assert!(!out.exists(), "a damaged decompress left its output");
    // inspect reads only the index: it still works.
    assert_ok(&jitdelta(["inspect".as_ref(), bad.as_os_str()]));
}

#[test]
fn verify_against_a_different_model() {
    let Some(f) = fixture() else { return };
    let Some(other) = model("minilm-f16") else {
        return;
    };
    let v = jitdelta([
        "verify".as_ref(),
        f.from_file.as_os_str(),
        other.join("model.safetensors").as_os_str(),
    ]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v.stderr));
    let stderr = text(&v.stderr);
    assert!(!stderr.contains("panicked"));
    let lines: Vec<&str> = stderr.lines().collect();
    let (last, mismatches) = lines.split_last().unwrap();
    assert!(mismatches.len() > 50, "{stderr}");
    assert!(
        mismatches.iter().all(|l| l.starts_with("mismatch: ")),
        "{stderr}"
    );
    assert_eq!(
        *last,
        format!("jitdelta: error: {} mismatches", mismatches.len())
    );
    // A model with other tensors: missing and extra tensors are mismatches too.
    let tmp = scratch();
    let synth = synthetic_model(tmp.path(), 1);
    let v = jitdelta([
        "verify".as_ref(),
        f.from_file.as_os_str(),
        synth.as_os_str(),
    ]);
    assert_eq!(v.status.code(), Some(1));
    let stderr = text(&v.stderr);
    assert!(
        stderr.contains("missing") && stderr.contains("not in the original"),
        "{stderr}"
    );
    assert!(stderr
        .lines()
        .last()
        .unwrap()
        .starts_with("jitdelta: error: "));
}

#[test]
fn bad_options() {
    let tmp = scratch();
    let src = synthetic_model(tmp.path(), 1);
    let out = tmp.path().join("o.jd");
    for args in [
        &["--draft-bits", "8"][..],
        &["--draft-bits", "0"],
        &["--draft-bits", "16"],
        &["--draft-bits", "100"],
        &["--chunk-rows", "0"],
        &["--group-size", "0"],
    ] {
        let mut a: Vec<&OsStr> = vec!["compress".as_ref(), src.as_os_str(), out.as_os_str()];
        a.extend(args.iter().map(OsStr::new));
        let e = assert_clean_error(&jitdelta(a));
        if args[0] == "--draft-bits" {
            assert!(
                e.contains("draft") || e.contains("mantissa"),
                "{args:?}: {e}"
            );
        }
        assert!(!out.exists(), "{args:?} left an output");
    }
    // The edges of the valid range work.
    for k in ["9", "15"] {
        assert_ok(&jitdelta([
            "compress".as_ref(),
            src.as_os_str(),
            out.as_os_str(),
            "--draft-bits".as_ref(),
            k.as_ref(),
        ]));
        assert_ok(&jitdelta([
            "verify".as_ref(),
            out.as_os_str(),
            src.as_os_str(),
        ]));
    }
}

/// A chunk larger than any tensor is a valid choice (one chunk per tensor): it either works or
/// is refused with an error line, never a panic.
#[test]
fn huge_chunk_rows_option() {
    let tmp = scratch();
    let src = synthetic_model(tmp.path(), 1);
    let out = tmp.path().join("o.jd");
    for rows in [
        "1099511627776",
        "9223372036854775807",
        "18446744073709551615",
    ] {
        let o = jitdelta([
            "compress".as_ref(),
            src.as_os_str(),
            out.as_os_str(),
            "--chunk-rows".as_ref(),
            rows.as_ref(),
        ]);
        if o.status.success() {
            assert_ok(&jitdelta([
                "verify".as_ref(),
                out.as_os_str(),
                src.as_os_str(),
            ]));
        } else {
            assert_clean_error(&o);
        }
        let _ = std::fs::remove_file(&out);
    }
}

#[test]
fn multi_shard_model_to_one_safetensors_file() {
    let tmp = scratch();
    let src = synthetic_model(tmp.path(), 3);
    let jd = tmp.path().join("three.jd");
    assert_ok(&jitdelta([
        "compress".as_ref(),
        src.as_os_str(),
        jd.as_os_str(),
    ]));
    let out = tmp.path().join("one.safetensors");
    let e = assert_clean_error(&jitdelta([
        "decompress".as_ref(),
        jd.as_os_str(),
        out.as_os_str(),
    ]));
    assert!(e.contains("3 shards"), "{e}");
    assert!(!out.exists());
}

/// Command-line usage errors are one error line too (the usage text is for `--help`).
#[test]
fn usage_errors_are_one_line() {
    let tmp = scratch();
    let x = tmp.path().join("x");
    for args in [
        vec![],
        vec!["frobnicate".as_ref()],
        vec!["compress".as_ref()],
        vec!["compress".as_ref(), x.as_os_str()],
        vec![
            "compress".as_ref(),
            x.as_os_str(),
            x.as_os_str(),
            "--base".as_ref(),
            "zfp".as_ref(),
        ],
        vec![
            "compress".as_ref(),
            x.as_os_str(),
            x.as_os_str(),
            "--draft-bits".as_ref(),
            "twelve".as_ref(),
        ],
        vec!["inspect".as_ref(), x.as_os_str(), "--bogus".as_ref()],
    ] {
        let args: Vec<&OsStr> = args;
        assert_clean_error(&jitdelta(&args));
    }
}

// ---------------------------------------------------------------------------------------------
// generate

/// `--json` output of `jitdelta generate`.
fn generate_json(model: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--prompt".into(),
        "What is the capital of France?".into(),
        "--max-tokens".into(),
        "6".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = jitdelta(&args);
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).expect("generate --json prints one JSON object")
}

/// Compresses `src` into `dir/smollm2.jd`: a folder holding only the .jd file, so config and
/// tokenizer come from inside it.
fn compress_into(src: &Path, dir: &Path) -> PathBuf {
    let jd = dir.join("smollm2.jd");
    assert_ok(&jitdelta([
        "compress".as_ref(),
        src.as_os_str(),
        jd.as_os_str(),
        "--quiet".as_ref(),
    ]));
    jd
}

#[test]
fn generate_exact_from_jd_matches_dense_and_reports_bytes() {
    let Some(src) = model("smollm2-bf16") else {
        return;
    };
    let dir = scratch();
    let jd = compress_into(&src, dir.path());
    let dense = generate_json(&src, &[]);
    let exact = generate_json(dir.path(), &[]);
    assert_eq!(dense["source"], "dense");
    assert_eq!(exact["source"], "jitdelta");
    assert_eq!(
        exact["token_ids"], dense["token_ids"],
        "greedy exact == dense"
    );
    assert!(exact["text"].as_str().unwrap().contains("Paris"), "{exact}");
    let (jit_bytes, dense_bytes) = (
        exact["resident_weight_bytes"].as_u64().unwrap(),
        dense["resident_weight_bytes"].as_u64().unwrap(),
    );
    assert!(jit_bytes < dense_bytes, "{jit_bytes} vs {dense_bytes}");
    // The decode rate (first token to last) leaves out the prefill: it is the faster rate.
    for run in [&dense, &exact] {
        let n = run["token_ids"].as_array().unwrap().len() as f64;
        let (all, decode) = (
            run["tokens_per_second"].as_f64().unwrap(),
            run["decode_tokens_per_second"].as_f64().unwrap(),
        );
        let first_ms = run["first_token_ms"].as_f64().unwrap();
        assert!(n > 1.0 && first_ms > 0.0 && decode > all, "{run}");
        // n tokens took the first token's time plus n - 1 decode steps.
        let total_s = first_ms / 1e3 + (n - 1.0) / decode;
        assert!((total_s - n / all).abs() < 0.05 * n / all, "{run}");
    }
    let draft = generate_json(&jd, &["--mode", "draft"]);
    assert_eq!(draft["mode"], "draft");
    let a = generate_json(
        &jd,
        &["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"],
    );
    let b = generate_json(
        &jd,
        &["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"],
    );
    assert_eq!(a["token_ids"], b["token_ids"], "same seed, same sample");
}

#[test]
fn generate_bad_inputs() {
    let Some(src) = model("smollm2-bf16") else {
        return;
    };
    let dir = scratch();
    let prompt = ["--prompt", "hi", "--max-tokens", "2"];
    // Draft needs a .jd file.
    let out = jitdelta(
        [
            "generate",
            "--model",
            src.to_str().unwrap(),
            "--mode",
            "draft",
        ]
        .iter()
        .chain(&prompt),
    );
    assert_clean_error(&out);
    // A folder with weights but no config.json.
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let out = jitdelta(
        ["generate", "--model", dir.path().to_str().unwrap()]
            .iter()
            .chain(&prompt),
    );
    assert_clean_error(&out);
    // An empty folder.
    let empty = scratch();
    let out = jitdelta(
        ["generate", "--model", empty.path().to_str().unwrap()]
            .iter()
            .chain(&prompt),
    );
    assert_clean_error(&out);
}

#[test]
fn generate_speculative_matches_exact_and_reports_acceptance() {
    let Some(src) = model("smollm2-bf16") else {
        return;
    };
    let dir = scratch();
    let jd = compress_into(&src, dir.path());
    let exact = generate_json(&jd, &[]);
    assert!(exact["speculative"].is_null());
    for controller in ["fixed:3", "lin-ucb"] {
        let spec = generate_json(&jd, &["--speculative", "--controller", controller]);
        assert_eq!(spec["token_ids"], exact["token_ids"], "{controller}");
        let s = &spec["speculative"]["stats"];
        let rate = s["acceptance_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&rate), "{spec}");
        assert!(s["mean_accepted_length"].as_f64().unwrap() >= 0.0);
        let passes = s["target_passes_per_token"].as_f64().unwrap();
        assert!(passes > 0.0 && passes <= 1.0, "{spec}");
        // Pass times: fixed:3 drafts 3 tokens in its second round (6 tokens, no auto-off), two
        // of them in timed passes (the first comes from the untimed prompt pass); a bandit may
        // draft one token a round, leaving no timed draft pass (null).
        for key in ["mean_draft_pass_ms", "mean_verify_pass_ms"] {
            let ms = &spec["speculative"][key];
            let timed = controller == "fixed:3" || key == "mean_verify_pass_ms";
            match ms.as_f64() {
                Some(ms) => assert!(ms > 0.0 && ms.is_finite(), "{key}: {spec}"),
                None => assert!(ms.is_null() && !timed, "{key}: {spec}"),
            }
        }
        let state = &spec["speculative"]["controller"];
        assert_eq!(state["controller"], controller);
        let arms = state["arms"].as_array().unwrap();
        let pulls: u64 = arms.iter().map(|a| a["pulls"].as_u64().unwrap()).sum();
        assert_eq!(pulls, state["rounds"].as_u64().unwrap());
        assert!(arms.iter().all(|a| a["mean_reward"].is_number()));
    }
    // Auto-off reaches the controller and shows in its state (6 tokens are fewer rounds than
    // one auto-off window, so nothing pauses here; jitdelta-spec tests the pauses).
    let spec = generate_json(&jd, &["--speculative", "--auto-off"]);
    assert_eq!(spec["token_ids"], exact["token_ids"]);
    let state = &spec["speculative"]["controller"];
    assert_eq!(state["config"]["auto_off"], true, "{state}");
    assert_eq!(state["plain_steps"], 0, "{state}");
    // Sampling runs through the same loop.
    let args = ["--speculative", "--temperature", "0.8", "--seed", "3"];
    let sampled = generate_json(&jd, &args);
    assert!(sampled["token_ids"].as_array().unwrap().len() <= 6);
    // Text mode prints the figures on stderr.
    let out = jitdelta([
        "generate".as_ref(),
        "--model".as_ref(),
        jd.as_os_str(),
        "--prompt".as_ref(),
        "Hi".as_ref(),
        "--max-tokens".as_ref(),
        "4".as_ref(),
        "--speculative".as_ref(),
    ]);
    assert_ok(&out);
    assert!(
        text(&out.stderr).contains("speculative (ucb1): acceptance rate"),
        "{}",
        text(&out.stderr)
    );
    // Bad input: one clean error line each.
    let jd = jd.to_str().unwrap();
    let prompt = ["--prompt", "hi", "--max-tokens", "2"];
    for bad in [
        &["--speculative", "--controller", "fixed:0"][..],
        &["--speculative", "--controller", "bandit"],
        &["--controller", "ucb1"],
        &["--auto-off"],
        &["--speculative", "--mode", "draft"],
    ] {
        let out = jitdelta(["generate", "--model", jd].iter().chain(&prompt).chain(bad));
        let err = assert_clean_error(&out);
        if bad.get(1) == Some(&"bandit") {
            assert!(err.contains("unknown controller `bandit`"), "{err}");
        }
    }
    let out = jitdelta(
        [
            "generate",
            "--model",
            src.to_str().unwrap(),
            "--speculative",
        ]
        .iter()
        .chain(&prompt),
    );
    assert!(assert_clean_error(&out).contains("need a .jd file"));
}

/// `--device` names a device or says which names it takes; a CPU-only build says so for cuda.
#[test]
fn bad_devices() {
    let tmp = scratch();
    let src = synthetic_model(tmp.path(), 1);
    for (device, says) in [
        ("gpu", "expected cpu, cuda or cuda:N"),
        ("cuda:x", "expected cpu, cuda or cuda:N"),
        ("cuda", "--device cuda:"),
    ] {
        let e = assert_clean_error(&jitdelta([
            "generate".as_ref(),
            "--model".as_ref(),
            src.as_os_str(),
            "--prompt".as_ref(),
            "hi".as_ref(),
            "--device".as_ref(),
            device.as_ref(),
        ]));
        if !(device == "cuda" && cfg!(feature = "cuda")) {
            assert!(e.contains(says), "{device}: {e}");
        }
    }
}
