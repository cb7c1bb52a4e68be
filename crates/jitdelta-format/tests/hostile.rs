//! Hostile and damaged input: truncation at every length, every single-bit flip, and hand-built
//! indexes (with a correct index checksum, so that validation rather than the checksum is what
//! is exercised). Whatever the input, the reader returns an error or the right data: it never
//! panics, never aborts on a huge allocation, and never returns wrong bytes silently.
//!
//!   cargo test -p jitdelta-format --test hostile
//!
//! Cases that could abort the process (an allocation the input claims) run in a child process
//! under `ulimit -v`, so that a failure is reported instead of killing the test binary.

use jitdelta_format::container::{footer_bytes, header_bytes, FOOTER_LEN, HEADER_LEN, VERSION};
use jitdelta_format::{file_stats, BaseKind, DraftDtype, EncodeOptions, Error, JdFile, JdWriter};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

// ---------------------------------------------------------------------------------------------
// A small valid file

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

/// BF16 weights around 0.02 (realistic exponents), `n` values.
fn weights_bf16(n: usize, seed: u32) -> Vec<u8> {
    pattern(2 * n, seed)
        .chunks(2)
        .flat_map(|p| {
            let e = 118 + (p[1] as u16 % 6);
            let bits = ((p[1] as u16 & 0x80) << 8) | (e << 7) | (p[0] as u16 & 0x7F);
            bits.to_le_bytes()
        })
        .collect()
}

/// Writes the reference file: every encoding kind, several chunks and rANS blocks, a zstd and a
/// raw stored tensor, a zstd and a raw auxiliary file, two shards.
fn write_small(path: &Path) {
    let mut w = JdWriter::create(path).unwrap();
    let s0 = w.add_shard(
        "model-00001-of-00002.safetensors",
        Some([("format".to_string(), "pt".to_string())].into()),
    );
    let s1 = w.add_shard("model-00002-of-00002.safetensors", None);
    let bp = EncodeOptions {
        base: BaseKind::Bitplane,
        chunk_rows: 4,
        block_len: 16,
        ..EncodeOptions::default()
    };
    w.add_tensor(
        "w.bitplane",
        "BF16",
        &[6, 10],
        s0,
        &weights_bf16(60, 1),
        &bp,
    )
    .unwrap();
    let af = EncodeOptions {
        base: BaseKind::Affine,
        chunk_rows: 2,
        group_size: 4,
        block_len: 8,
        ..EncodeOptions::default()
    };
    let f16: Vec<u8> = (0..40u32)
        .flat_map(|i| half::f16::from_f32((i % 7) as f32 * 0.125 - 0.3).to_le_bytes())
        .collect();
    w.add_tensor("w.affine", "F16", &[5, 8], s0, &f16, &af)
        .unwrap();
    let f32s: Vec<u8> = (0..24u32)
        .flat_map(|i| ((i as f32 - 11.5) * 0.01).to_le_bytes())
        .collect();
    let auto = EncodeOptions {
        chunk_rows: 3,
        block_len: 5,
        ..EncodeOptions::default()
    };
    w.add_tensor("w.f32", "F32", &[2, 3, 4], s1, &f32s, &auto)
        .unwrap();
    let one_chunk = EncodeOptions {
        base: BaseKind::Bitplane,
        ..EncodeOptions::default()
    };
    w.add_tensor(
        "w.single",
        "BF16",
        &[3, 4],
        s1,
        &weights_bf16(12, 2),
        &one_chunk,
    )
    .unwrap();
    w.add_tensor("bias", "BF16", &[10], s0, &weights_bf16(10, 3), &bp)
        .unwrap();
    w.add_tensor("ids", "I64", &[64], s1, &[0u8; 512], &bp)
        .unwrap();
    w.add_file(
        "config.json",
        "{\"hidden_size\": 8}\n".repeat(20).as_bytes(),
    )
    .unwrap();
    w.add_file("tok/vocab.txt", &pattern(40, 9)).unwrap();
    w.finish().unwrap();
}

fn small_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.jd");
    write_small(&path);
    std::fs::read(&path).unwrap()
}

/// Everything a reader returns for a file, in a fixed order, or the first error.
fn decode_all(jd: &JdFile) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::new();
    let names: Vec<String> = jd.tensor_names().map(String::from).collect();
    for name in &names {
        let view = jd.tensor(name)?;
        out.push(view.decode_exact()?);
        if let Some(f) = view.format() {
            for c in 0..view.chunk_count() {
                let mut buf = vec![0u8; view.chunk_len(c) * f.bytes()];
                view.decode_chunk_exact(c, &mut buf)?;
                out.push(buf);
            }
            out.push(view.decode_draft(DraftDtype::F32)?);
            out.push(view.decode_draft(DraftDtype::BF16)?);
            let r = view.to_resident(3)?;
            let mut buf = vec![0u8; view.dims().0 * view.dims().1 * f.bytes()];
            r.decode_exact(&mut buf)?;
            out.push(buf);
        }
    }
    for f in &jd.index().files {
        out.push(jd.aux_file(&f.name)?.expect("listed"));
    }
    let stats = file_stats(jd)?;
    out.push(format!("{:?}", stats.tensors.len()).into_bytes());
    Ok(out)
}

fn is_open_error(e: &Error) -> bool {
    matches!(
        e,
        Error::BadMagic
            | Error::UnsupportedVersion(..)
            | Error::Truncated(_)
            | Error::Checksum { .. }
            | Error::Corrupt(_)
            | Error::Index(_)
            | Error::UnsupportedDtype(_)
    )
}

/// `file_stats` of a file that opened: an error, or sizes that fit in the file (no wrapped
/// arithmetic passed off as a size).
#[track_caller]
fn assert_sane_stats(jd: &JdFile) {
    if let Ok(stats) = file_stats(jd) {
        for t in &stats.tensors {
            for (what, v) in [
                ("base", t.base_bytes),
                ("residual", t.residual_bytes),
                ("scale", t.scale_bytes),
                ("table", t.table_bytes),
            ] {
                assert!(
                    v <= stats.file_bytes,
                    "{}: {what} bytes {v} exceed the file's {}",
                    t.name,
                    stats.file_bytes
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Damaged files

#[test]
fn reference_file_decodes() {
    let bytes = small_file();
    let jd = JdFile::from_bytes(bytes.clone()).unwrap();
    decode_all(&jd).unwrap();
    assert!(
        bytes.len() < 8 << 10,
        "keep the reference file small: {}",
        bytes.len()
    );
}

#[test]
fn truncation_at_every_length_fails_to_open() {
    let bytes = small_file();
    for len in 0..bytes.len() {
        match JdFile::from_bytes(bytes[..len].to_vec()) {
            Ok(_) => panic!("a {len}-byte prefix of {} opened", bytes.len()),
            Err(Error::Truncated(_)) => {}
            Err(e) => panic!("prefix {len}: expected Truncated, got {e:?}"),
        }
    }
    // Through the memory-mapped path too, including the empty file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.jd");
    for len in [0, 1, 8, 15, 16, 47, 48, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let r = JdFile::open(&path);
        assert!(
            matches!(r, Err(Error::Truncated(_))),
            "open of {len} bytes: {:?}",
            r.err()
        );
    }
    // Bytes appended after the footer are as bad as bytes cut off.
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"garbage!");
    assert!(matches!(
        JdFile::from_bytes(longer),
        Err(Error::Truncated(_))
    ));
}

#[test]
fn every_single_bit_flip_is_detected() {
    let bytes = small_file();
    let reference = decode_all(&JdFile::from_bytes(bytes.clone()).unwrap()).unwrap();
    let footer_start = bytes.len() - FOOTER_LEN as usize;
    let index_offset =
        u64::from_le_bytes(bytes[footer_start..footer_start + 8].try_into().unwrap());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bits = bytes.len() * 8;
    let identical = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..threads {
            let (bytes, reference, identical) = (&bytes, &reference, &identical);
            s.spawn(move || {
                for bit in (t..bits).step_by(threads) {
                    let (byte, mask) = (bit / 8, 1u8 << (bit % 8));
                    let mut damaged = bytes.clone();
                    damaged[byte] ^= mask;
                    let jd = match JdFile::from_bytes(damaged) {
                        Err(e) => {
                            assert!(is_open_error(&e), "flip of byte {byte} bit {}: {e:?}", bit % 8);
                            continue;
                        }
                        Ok(jd) => jd,
                    };
                    assert!(
                        (byte as u64) < index_offset,
                        "flip in index or footer (byte {byte}) was not caught at open"
                    );
                    match decode_all(&jd) {
                        Err(Error::Checksum { .. }) => {}
                        Err(e) => panic!("flip of byte {byte}: decode failed with {e:?}, not a checksum error"),
                        Ok(out) => {
                            assert!(
                                out == *reference,
                                "flip of byte {byte} bit {} decoded to different data without an error",
                                bit % 8
                            );
                            identical.lock().unwrap().push(byte);
                        }
                    }
                }
            });
        }
    });
    // Only the reserved header word may be ignored.
    let identical = identical.into_inner().unwrap();
    assert!(
        identical.iter().all(|&b| (12..16).contains(&b)),
        "flips outside the reserved header bytes went unnoticed: {identical:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Hand-built indexes

/// The data area (bytes between header and index) and the parsed index of a file image.
fn split(file: &[u8]) -> (Vec<u8>, Value) {
    let f = file.len() - FOOTER_LEN as usize;
    let index_offset = u64::from_le_bytes(file[f..f + 8].try_into().unwrap()) as usize;
    (
        file[HEADER_LEN as usize..index_offset].to_vec(),
        serde_json::from_slice(&file[index_offset..f]).unwrap(),
    )
}

/// A file image with the given data area and index bytes, and a correct footer and index CRC.
fn build_raw(data: &[u8], index: &[u8]) -> Vec<u8> {
    let mut out = header_bytes().to_vec();
    out.extend_from_slice(data);
    let index_offset = out.len() as u64;
    out.extend_from_slice(index);
    out.extend_from_slice(&footer_bytes(
        index_offset,
        index.len() as u64,
        crc32fast::hash(index),
    ));
    out
}

fn build(data: &[u8], index: &Value) -> Vec<u8> {
    build_raw(data, &serde_json::to_vec(index).unwrap())
}

/// Appends `bytes` to a data area; returns `(offset, len, crc32)` as an index would store them.
fn append(data: &mut Vec<u8>, bytes: &[u8]) -> (u64, u64, u32) {
    let offset = HEADER_LEN + data.len() as u64;
    data.extend_from_slice(bytes);
    (offset, bytes.len() as u64, crc32fast::hash(bytes))
}

fn tensor<'a>(index: &'a mut Value, name: &str) -> &'a mut Value {
    index["tensors"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// The reference file, an index edit, the rebuilt image opened.
fn open_edited(edit: impl FnOnce(&mut Vec<u8>, &mut Value)) -> Result<JdFile, Error> {
    let (mut data, mut index) = split(&small_file());
    edit(&mut data, &mut index);
    JdFile::from_bytes(build(&data, &index))
}

#[track_caller]
fn assert_corrupt(r: Result<JdFile, Error>) {
    match r {
        Err(Error::Corrupt(_)) => {}
        Err(e) => panic!("expected Error::Corrupt, got {e:?}"),
        Ok(_) => panic!("expected Error::Corrupt, the file opened"),
    }
}

#[test]
fn rebuilt_unchanged_index_opens() {
    // The helper itself is faithful: no edit, same file.
    let bytes = small_file();
    let (data, index) = split(&bytes);
    let jd = JdFile::from_bytes(build(&data, &index)).unwrap();
    assert_eq!(
        decode_all(&jd).unwrap(),
        decode_all(&JdFile::from_bytes(bytes).unwrap()).unwrap()
    );
}

#[test]
fn bad_magic_and_versions() {
    let bytes = small_file();
    let mut b = bytes.clone();
    b[0] ^= 1;
    assert!(matches!(JdFile::from_bytes(b), Err(Error::BadMagic)));
    let mut b = bytes.clone();
    b[7] = b'B';
    assert!(matches!(JdFile::from_bytes(b), Err(Error::BadMagic)));
    assert!(matches!(
        JdFile::from_bytes(b"GGUF\x03\0\0\0not a jitdelta file at all, but long enough".to_vec()),
        Err(Error::BadMagic)
    ));
    // Header version.
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
    assert!(matches!(
        JdFile::from_bytes(b),
        Err(Error::UnsupportedVersion(v, w)) if v == VERSION + 1 && w == VERSION
    ));
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        JdFile::from_bytes(b),
        Err(Error::UnsupportedVersion(0, _))
    ));
    // Footer version differs from the header's.
    let mut b = bytes.clone();
    let f = b.len() - 12;
    b[f..f + 4].copy_from_slice(&(VERSION + 1).to_le_bytes());
    assert!(matches!(JdFile::from_bytes(b), Err(Error::Corrupt(_))));
    // Footer magic gone.
    let mut b = bytes.clone();
    let n = b.len();
    b[n - 1] = b'X';
    assert!(matches!(JdFile::from_bytes(b), Err(Error::Truncated(_))));
    // Index checksum wrong.
    let mut b = bytes.clone();
    let f = b.len() - 16;
    b[f] ^= 0x40;
    assert!(matches!(JdFile::from_bytes(b), Err(Error::Checksum { .. })));
}

#[test]
fn footer_index_range_must_be_exact() {
    let (data, index) = split(&small_file());
    let good = build(&data, &index);
    let f = good.len() - FOOTER_LEN as usize;
    let index_offset = u64::from_le_bytes(good[f..f + 8].try_into().unwrap());
    let index_len = u64::from_le_bytes(good[f + 8..f + 16].try_into().unwrap());
    // A range that still ends at the footer but starts inside the index: the checksum fails.
    let mut b = good.clone();
    b[f..f + 8].copy_from_slice(&(index_offset + 1).to_le_bytes());
    b[f + 8..f + 16].copy_from_slice(&(index_len - 1).to_le_bytes());
    assert!(matches!(JdFile::from_bytes(b), Err(Error::Checksum { .. })));
    // Ranges that do not end at the footer, or start inside the header.
    for (off, len) in [
        (0, index_len),
        (8, index_len),
        (0, index_offset + index_len),
        (index_offset, index_len + 1),
        (index_offset + 1, index_len),
        (u64::MAX, index_len),
        (index_offset, u64::MAX),
        (u64::MAX - 3, 4),
    ] {
        let mut b = good.clone();
        b[f..f + 8].copy_from_slice(&off.to_le_bytes());
        b[f + 8..f + 16].copy_from_slice(&len.to_le_bytes());
        let r = JdFile::from_bytes(b);
        assert!(
            matches!(r, Err(Error::Corrupt(_))),
            "{off}+{len}: {:?}",
            r.err()
        );
    }
}

#[test]
fn not_json_or_wrong_json_is_an_index_error() {
    let (data, _) = split(&small_file());
    for index in [
        &b""[..],
        b"{",
        b"[]",
        b"null",
        b"{\"shards\": [], \"tensors\": []}",
        b"\xff\xfe\x00",
        b"{\"shards\":[],\"tensors\":[{\"name\":\"a\",\"dtype\":\"BF16\",\"shape\":[1],\"shard\":0,\"encoding\":{\"kind\":\"zfp\"}}],\"files\":[]}",
    ] {
        let r = JdFile::from_bytes(build_raw(&data, index));
        assert!(matches!(r, Err(Error::Index(_))), "{:?}: {:?}", String::from_utf8_lossy(index), r.err());
    }
}

#[test]
fn absurd_shapes_are_rejected() {
    for name in ["w.bitplane", "w.affine", "bias", "ids"] {
        for shape in [
            json!([1u64 << 40, 1u64 << 40]),
            json!([u64::MAX, 2]),
            json!([1u64 << 32, 1u64 << 32, 1u64 << 32]),
        ] {
            let r = open_edited(|_, index| tensor(index, name)["shape"] = shape.clone());
            assert_corrupt(r);
        }
    }
    // Fits in memory arithmetic but not in the stored bytes.
    assert_corrupt(open_edited(|_, index| {
        tensor(index, "w.bitplane")["shape"] = json!([6, 100000])
    }));
    assert_corrupt(open_edited(|_, index| {
        tensor(index, "ids")["shape"] = json!([65])
    }));
}

#[test]
fn chunk_ranges_outside_the_data_area_are_rejected() {
    let (data, _) = split(&small_file());
    let data_end = HEADER_LEN + data.len() as u64;
    for offset in [0, 4, data_end, data_end - 1, u64::MAX - 1, u64::MAX] {
        assert_corrupt(open_edited(|_, index| {
            tensor(index, "w.bitplane")["encoding"]["chunking"]["chunks"][1][0] = json!(offset)
        }));
    }
    for (field, value) in [(1, u64::MAX), (2, u64::MAX), (1, 1u64 << 40), (2, data_end)] {
        assert_corrupt(open_edited(|_, index| {
            tensor(index, "w.affine")["encoding"]["chunking"]["chunks"][0][field] = json!(value)
        }));
    }
    // Stored blobs and auxiliary files too.
    assert_corrupt(open_edited(|_, index| {
        tensor(index, "bias")["encoding"]["blob"]["offset"] = json!(data_end)
    }));
    assert_corrupt(open_edited(|_, index| {
        index["files"][0]["blob"]["len"] = json!(u64::MAX)
    }));
}

#[test]
fn overlapping_ranges_are_rejected() {
    // Two chunks of one tensor at the same place.
    assert_corrupt(open_edited(|_, index| {
        let c = &mut tensor(index, "w.bitplane")["encoding"]["chunking"]["chunks"];
        c[1][0] = c[0][0].clone();
    }));
    // A chunk of one tensor inside another tensor's chunk.
    assert_corrupt(open_edited(|_, index| {
        let other = tensor(index, "w.bitplane")["encoding"]["chunking"]["chunks"][0][0]
            .as_u64()
            .unwrap();
        tensor(index, "w.affine")["encoding"]["chunking"]["chunks"][0][0] = json!(other + 1);
    }));
    // An auxiliary file over a stored tensor.
    assert_corrupt(open_edited(|_, index| {
        let blob = tensor(index, "bias")["encoding"]["blob"].clone();
        index["files"][1]["blob"]["offset"] = blob["offset"].clone();
    }));
}

#[test]
fn chunk_count_and_geometry_must_match_the_shape() {
    // One chunk too few, one too many.
    assert_corrupt(open_edited(|_, index| {
        tensor(index, "w.bitplane")["encoding"]["chunking"]["chunks"]
            .as_array_mut()
            .unwrap()
            .pop();
    }));
    assert_corrupt(open_edited(|data, index| {
        let (o, l, c) = append(data, &[0u8; 64]);
        tensor(index, "w.bitplane")["encoding"]["chunking"]["chunks"]
            .as_array_mut()
            .unwrap()
            .push(json!([o, l, 0, c, 0]));
    }));
    // chunk_rows changed so that the count no longer matches.
    assert_corrupt(open_edited(|_, index| {
        tensor(index, "w.bitplane")["encoding"]["chunking"]["chunk_rows"] = json!(1)
    }));
    for field in ["chunk_rows", "block_len"] {
        for name in ["w.bitplane", "w.affine"] {
            assert_corrupt(open_edited(|_, index| {
                tensor(index, name)["encoding"]["chunking"][field] = json!(0)
            }));
        }
    }
    // A shard that does not exist.
    assert_corrupt(open_edited(|_, index| {
        tensor(index, "w.f32")["shard"] = json!(7)
    }));
    // Draft bits past the mantissa.
    for d in [7, 8, 1000] {
        assert_corrupt(open_edited(|_, index| {
            tensor(index, "w.bitplane")["encoding"]["draft_mantissa_bits"] = json!(d)
        }));
    }
    // Affine parameters.
    assert_corrupt(open_edited(|_, index| {
        tensor(index, "w.affine")["encoding"]["group_size"] = json!(0)
    }));
    assert_corrupt(open_edited(|_, index| {
        tensor(index, "w.affine")["encoding"]["residual_tables"]
            .as_array_mut()
            .unwrap()
            .pop();
    }));
    // An uncompressed blob whose raw length differs from its stored length.
    assert_corrupt(open_edited(|_, index| {
        let blob = &mut index["files"][1]["blob"];
        assert_eq!(blob["zstd"], false, "tok/vocab.txt is stored raw");
        blob["raw_len"] = json!(blob["len"].as_u64().unwrap() + 1);
    }));
}

#[test]
fn bad_frequency_tables_are_rejected() {
    // rANS frequency tables (the affine kind): must sum to 4096, no zero or repeated entry.
    let tables = [
        json!([[0, 4000]]),
        json!([[0, 4095]]),
        json!([[0, 4096], [1, 1]]),
        json!([[3, 2048], [3, 2048]]),
        json!([[300, 4096]]),
        json!([[0, 0], [1, 4096]]),
        json!([[0, 65535], [1, 65535]]),
        json!([[0, 70000]]),
        json!("not a table"),
    ];
    for t in &tables {
        for (name, field) in [("w.affine", "code_table"), ("w.affine", "residual_tables")] {
            let r = open_edited(|_, index| {
                let enc = &mut tensor(index, name)["encoding"];
                if field == "residual_tables" {
                    enc[field][3] = t.clone();
                } else {
                    enc[field] = t.clone();
                }
            });
            assert!(
                matches!(r, Err(Error::Index(_))),
                "{field} {t}: {:?}",
                r.err()
            );
        }
    }
}

#[test]
fn bad_code_length_tables_are_rejected() {
    // Huffman code lengths (the bit-plane exponent): a complete prefix code of lengths 1..=12,
    // or a single symbol of length 0, or nothing.
    let tables = [
        json!([[0, 1]]),
        json!([[0, 1], [1, 2]]),
        json!([[0, 1], [0, 1]]),
        json!([[0, 1], [1, 1], [2, 1]]),
        json!([[0, 13], [1, 1]]),
        json!([[300, 1], [1, 1]]),
        json!([[0, 0], [1, 0]]),
        json!([[0, 0], [1, 1], [2, 1]]),
        json!([[0, 1], [1, 256]]),
        json!("not a table"),
    ];
    for t in &tables {
        let r = open_edited(|_, index| {
            tensor(index, "w.bitplane")["encoding"]["exponent_code"] = t.clone()
        });
        assert!(matches!(r, Err(Error::Index(_))), "{t}: {:?}", r.err());
    }
    // Valid tables under which the chunk's bits are not a valid stream: open succeeds, decoding
    // fails cleanly (a one-symbol table decodes without reading bits, so the stream lengths no
    // longer match; an empty table cannot code any symbol).
    for t in [json!([[0, 0]]), json!([[120, 0]]), json!([])] {
        let jd = open_edited(|_, index| {
            tensor(index, "w.bitplane")["encoding"]["exponent_code"] = t.clone()
        })
        .unwrap();
        let view = jd.tensor("w.bitplane").unwrap();
        assert!(view.decode_exact().is_err(), "{t}");
        assert!(view.decode_draft(DraftDtype::F32).is_err(), "{t}");
        assert!(view.to_resident(3).is_err(), "{t}");
    }
    // Any other complete code decodes or fails, without panicking.
    for t in [
        json!([[0, 1], [1, 1]]),
        json!([[118, 2], [119, 2], [120, 2], [121, 2]]),
        json!([[118, 1], [119, 2], [120, 3], [121, 4], [122, 5], [123, 5]]),
        json!((0..256).map(|s| json!([s, 8])).collect::<Vec<_>>()),
        json!((0..12)
            .map(|s| json!([s, s + 1]))
            .chain([json!([12, 12])])
            .collect::<Vec<_>>()),
    ] {
        let jd = open_edited(|_, index| {
            tensor(index, "w.bitplane")["encoding"]["exponent_code"] = t.clone()
        })
        .unwrap();
        let view = jd.tensor("w.bitplane").unwrap();
        let _ = view.decode_exact();
        let _ = view.decode_draft(DraftDtype::BF16);
    }
}

#[test]
fn unsafe_auxiliary_file_names_are_rejected() {
    for name in [
        "../config.json",
        "..",
        "a/../../b",
        "/etc/passwd",
        "a\\..\\b",
        "",
        "./a",
        "a//b",
        "a/",
        "tok/./vocab.txt",
    ] {
        assert_corrupt(open_edited(|_, index| {
            index["files"][0]["name"] = json!(name)
        }));
    }
}

#[test]
fn duplicate_names_and_unknown_dtypes_are_rejected() {
    assert_corrupt(open_edited(|_, index| {
        tensor(index, "w.affine")["name"] = json!("w.bitplane")
    }));
    // A stored tensor of a dtype nobody knows.
    let r = open_edited(|_, index| tensor(index, "ids")["dtype"] = json!("F128"));
    assert!(
        matches!(r, Err(Error::UnsupportedDtype(_))),
        "{:?}",
        r.err()
    );
    let r = open_edited(|_, index| tensor(index, "ids")["dtype"] = json!(""));
    assert!(
        matches!(r, Err(Error::UnsupportedDtype(_))),
        "{:?}",
        r.err()
    );
    // Split kinds are for float dtypes only.
    for dtype in ["I64", "U8", "BOOL", "F64", "F128"] {
        let r = open_edited(|_, index| tensor(index, "w.bitplane")["dtype"] = json!(dtype));
        assert!(
            matches!(r, Err(Error::Corrupt(_) | Error::UnsupportedDtype(_))),
            "{dtype}: {:?}",
            r.err()
        );
        let r = open_edited(|_, index| tensor(index, "w.affine")["dtype"] = json!(dtype));
        assert!(
            matches!(r, Err(Error::Corrupt(_) | Error::UnsupportedDtype(_))),
            "{dtype}: {:?}",
            r.err()
        );
    }
}

/// A zstd auxiliary file that claims 1 TB: reading it fails without allocating the claim.
#[test]
fn zstd_aux_file_claiming_a_terabyte_errors() {
    let jd = open_edited(|_, index| {
        let blob = &mut index["files"][0]["blob"];
        assert_eq!(blob["zstd"], true, "config.json is stored compressed");
        blob["raw_len"] = json!(1u64 << 40);
    });
    // Either open refuses, or reading the file fails.
    if let Ok(jd) = jd {
        let r = jd.aux_file("config.json");
        assert!(
            matches!(r, Err(Error::Corrupt(_))),
            "{:?}",
            r.map(|v| v.map(|v| v.len()))
        );
    }
}

/// A chunk whose base is too short for its parameters, with the total length still plausible:
/// every consumer of the index (decoding and size accounting) must fail cleanly.
#[test]
fn affine_chunk_with_short_base_fails_cleanly() {
    let jd = open_edited(|_, index| {
        let chunks = &mut tensor(index, "w.affine")["encoding"]["chunking"]["chunks"];
        for c in chunks.as_array_mut().unwrap() {
            let total = c[1].as_u64().unwrap() + c[2].as_u64().unwrap();
            c[1] = json!(0);
            c[2] = json!(total);
            c[3] = json!(crc32fast::hash(&[]));
        }
    });
    let Ok(jd) = jd else { return };
    assert!(jd.tensor("w.affine").unwrap().decode_exact().is_err());
    // Size accounting of a file that opened must not panic.
    assert_sane_stats(&jd);
}

/// `chunk_rows` far larger than the tensor (one chunk holds everything, as the writer produces
/// for small tensors): decoding must give the same bytes or fail, not overflow.
#[test]
fn huge_chunk_rows_in_the_index() {
    let reference = JdFile::from_bytes(small_file()).unwrap();
    let want = reference
        .tensor("w.single")
        .unwrap()
        .decode_exact()
        .unwrap();
    for chunk_rows in [1u64 << 32, 1 << 62, u64::MAX] {
        let r = open_edited(|_, index| {
            tensor(index, "w.single")["encoding"]["chunking"]["chunk_rows"] = json!(chunk_rows)
        });
        let Ok(jd) = r else { continue };
        let view = jd.tensor("w.single").unwrap();
        match view.decode_exact() {
            Ok(got) => assert_eq!(got, want, "chunk_rows {chunk_rows}"),
            Err(_) => continue,
        }
        if let Ok(d) = view.decode_draft(DraftDtype::F32) {
            assert_eq!(d.len(), want.len() * 2);
        }
        if let Ok(r) = view.to_resident(3) {
            let mut out = vec![0u8; want.len()];
            if r.decode_exact(&mut out).is_ok() {
                assert_eq!(out, want);
            }
        }
    }
}

// Shapes whose byte size fits in a u64 but whose minimum stored size does not: the size check
// itself must not overflow.

/// BF16 bit planes: 2^62 values (2^63 bytes) in one chunk.
#[test]
fn bitplane_bf16_shape_near_u64_limit_is_rejected() {
    assert_corrupt(open_edited(|_, index| {
        let t = tensor(index, "w.single");
        t["shape"] = json!([1, 1u64 << 62]);
    }));
}

/// F32 bit planes: 2^61 values (2^63 bytes) in one chunk.
#[test]
fn bitplane_f32_shape_near_u64_limit_is_rejected() {
    assert_corrupt(open_edited(|_, index| {
        let t = tensor(index, "w.single");
        t["dtype"] = json!("F32");
        t["shape"] = json!([1, 1u64 << 61]);
    }));
}

/// Affine with groups of one: 2^62 F16 values (2^63 bytes) in one chunk.
#[test]
fn affine_shape_near_u64_limit_is_rejected() {
    assert_corrupt(open_edited(|_, index| {
        let t = tensor(index, "w.affine");
        t["shape"] = json!([1, 1u64 << 62]);
        t["encoding"]["group_size"] = json!(1);
        t["encoding"]["chunking"]["chunk_rows"] = json!(1);
        let c = t["encoding"]["chunking"]["chunks"][0].clone();
        t["encoding"]["chunking"]["chunks"] = json!([c]);
    }));
}

// ---------------------------------------------------------------------------------------------
// Regressions found by the `reader` fuzz target (fuzz/README.md)

/// Found by `cargo fuzz run reader` after ~1.48M executions: the reference file with the affine
/// tensor's shape edited from [5, 8] to [5, 81] (checksums repaired). Every chunk is still long
/// enough in total for its group parameters, so the file opens; the base parts are not, and
/// `file_stats` subtracted the parameter bytes from the base bytes without checking. The input
/// is kept in `tests/data/` with its index renamed to the current field names.
#[test]
fn fuzz_regression_file_stats_underflow() {
    let bytes = include_bytes!("data/fuzz-reader-file-stats-underflow.jd").to_vec();
    let Ok(jd) = JdFile::from_bytes(bytes) else {
        return;
    };
    assert_sane_stats(&jd);
    assert!(decode_all(&jd).is_err());
}

/// The same finding built from the current reference file.
#[test]
fn affine_shape_wider_than_its_chunks() {
    let Ok(jd) = open_edited(|_, index| tensor(index, "w.affine")["shape"] = json!([5, 81])) else {
        return;
    };
    assert_sane_stats(&jd);
    assert!(jd.tensor("w.affine").unwrap().decode_exact().is_err());
}

// ---------------------------------------------------------------------------------------------
// Hostile files given to whole-model functions

/// Shard names are paths that `decompress_model` writes to: they must stay inside the output
/// folder, exactly like auxiliary file names.
#[test]
fn shard_names_cannot_escape_the_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    let outside_abs = dir.path().join("abs-escape.safetensors");
    for name in [
        "../escape.safetensors".to_string(),
        outside_abs.to_str().unwrap().to_string(),
        "sub/../../escape2.safetensors".to_string(),
    ] {
        let (data, mut index) = split(&small_file());
        index["shards"][1]["name"] = json!(name);
        let jd_path = dir.path().join("hostile.jd");
        std::fs::write(&jd_path, build(&data, &index)).unwrap();
        let out = dir.path().join("out");
        let r = jitdelta_format::decompress_model(&jd_path, &out, false);
        let escaped: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("escape"))
            .collect();
        assert!(
            escaped.is_empty(),
            "shard name {name:?}: decompress_model wrote {escaped:?} outside {} (result {:?})",
            out.display(),
            r.err()
        );
        assert!(r.is_err(), "shard name {name:?} was accepted");
        let _ = std::fs::remove_dir_all(&out);
    }
}

// ---------------------------------------------------------------------------------------------
// Claims of huge decoded sizes, run in a child process with limited address space

const CASE_VAR: &str = "JITDELTA_HOSTILE_CASE";

/// Runs `isolated_case_runner` for `case` in a child process limited to 8 GB of address space;
/// the case passes only if the child exits normally (no panic, no abort on allocation).
#[track_caller]
fn isolated(case: &str) {
    let exe = std::env::current_exe().unwrap();
    let args = [
        "isolated_case_runner",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ];
    let output = if Path::new("/bin/sh").exists() {
        Command::new("/bin/sh")
            .arg("-c")
            .arg("ulimit -v 8388608 2>/dev/null; exec \"$0\" \"$@\"")
            .arg(&exe)
            .args(args)
            .env(CASE_VAR, case)
            .output()
    } else {
        Command::new(&exe).args(args).env(CASE_VAR, case).output()
    }
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "case `{case}` failed in its child process ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A stored U8 tensor of 1 TB (shape [2^40]) backed by a tiny zstd frame.
fn stored_terabyte() -> Vec<u8> {
    let (mut data, mut index) = split(&small_file());
    let frame = zstd::bulk::compress(&[0u8; 1000], 3).unwrap();
    let (offset, len, crc) = append(&mut data, &frame);
    let t = tensor(&mut index, "ids");
    t["dtype"] = json!("U8");
    t["shape"] = json!([1u64 << 40]);
    t["encoding"] = json!({"kind": "stored", "blob": {
        "offset": offset, "len": len, "raw_len": 1u64 << 40, "crc32": crc, "zstd": true}});
    build(&data, &index)
}

/// An affine BF16 tensor of 2^36 values (128 GiB decoded) in one group per row and one chunk,
/// whose stored bytes are 80 bytes: the parameters' size is all validation can demand.
fn affine_huge() -> Vec<u8> {
    let (mut data, mut index) = split(&small_file());
    let cols = 1u64 << 36;
    let g = u32::MAX as u64;
    let params = cols.div_ceil(g) as usize * 4;
    let (offset, _, crc) = append(&mut data, &vec![0u8; params + 12]);
    let t = tensor(&mut index, "w.affine");
    t["dtype"] = json!("BF16");
    t["shape"] = json!([1, cols]);
    t["encoding"]["group_size"] = json!(g);
    t["encoding"]["chunking"]["chunk_rows"] = json!(1);
    t["encoding"]["chunking"]["block_len"] = json!(u32::MAX);
    t["encoding"]["chunking"]["chunks"] =
        json!([[offset, params + 12, 0, crc, crc32fast::hash(&[])]]);
    build(&data, &index)
}

#[test]
#[ignore = "entry point of the child process started by `isolated`"]
fn isolated_case_runner() {
    let Ok(case) = std::env::var(CASE_VAR) else {
        return;
    };
    match case.as_str() {
        "stored_terabyte" => {
            // Open may refuse; if it opens, decoding must fail, not allocate 1 TB.
            if let Ok(jd) = JdFile::from_bytes(stored_terabyte()) {
                let view = jd.tensor("ids").unwrap();
                assert!(view.decode_exact().is_err());
            }
        }
        "affine_huge" => {
            if let Ok(jd) = JdFile::from_bytes(affine_huge()) {
                let view = jd.tensor("w.affine").unwrap();
                assert!(view.decode_exact().is_err());
                assert!(view.decode_draft(DraftDtype::F32).is_err());
                assert!(view.to_resident(3).is_err());
            }
        }
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn stored_zstd_tensor_claiming_a_terabyte_errors_without_allocating() {
    isolated("stored_terabyte");
}

#[test]
fn affine_tensor_claiming_128_gib_errors_without_allocating() {
    isolated("affine_huge");
}

// ---------------------------------------------------------------------------------------------
// Fuzz seeds

/// Writes the seed corpus of the `reader` fuzz target (`fuzz/seeds/reader/`):
///   cargo test -p jitdelta-format --test hostile write_fuzz_seeds -- --ignored
/// A seed file: its name and what to write into it.
type Seed = (&'static str, Box<dyn Fn(&mut JdWriter)>);

#[test]
#[ignore = "writes fuzz/seeds/reader; run on purpose"]
fn write_fuzz_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/reader");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("small.jd"), small_file()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut seeds: Vec<Seed> = Vec::new();
    seeds.push((
        "bitplane-bf16.jd",
        Box::new(|w: &mut JdWriter| {
            let s = w.add_shard("m.safetensors", None);
            let o = EncodeOptions {
                base: BaseKind::Bitplane,
                chunk_rows: 3,
                block_len: 7,
                ..EncodeOptions::default()
            };
            w.add_tensor("w", "BF16", &[7, 9], s, &weights_bf16(63, 5), &o)
                .unwrap();
        }),
    ));
    seeds.push((
        "affine-f16.jd",
        Box::new(|w: &mut JdWriter| {
            let s = w.add_shard("m.safetensors", None);
            let o = EncodeOptions {
                base: BaseKind::Affine,
                chunk_rows: 2,
                group_size: 3,
                block_len: 5,
                ..EncodeOptions::default()
            };
            let v: Vec<u8> = (0..30u32)
                .flat_map(|i| half::f16::from_f32(i as f32 * 0.1 - 1.0).to_le_bytes())
                .collect();
            w.add_tensor("w", "F16", &[5, 6], s, &v, &o).unwrap();
        }),
    ));
    seeds.push((
        "f32-rank3-special.jd",
        Box::new(|w: &mut JdWriter| {
            let s = w.add_shard("m.safetensors", None);
            let o = EncodeOptions {
                chunk_rows: 2,
                block_len: 3,
                ..EncodeOptions::default()
            };
            let v: Vec<u8> = [
                0f32,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                1e-40,
                1e30,
                -1e-30,
                0.5,
                2.0,
                -3.0,
                7.0,
            ]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
            w.add_tensor("experts", "F32", &[2, 3, 2], s, &v, &o)
                .unwrap();
            w.add_tensor("scalar", "F32", &[], s, &1f32.to_le_bytes(), &o)
                .unwrap();
        }),
    ));
    seeds.push((
        "stored-aux.jd",
        Box::new(|w: &mut JdWriter| {
            let s = w.add_shard(
                "m.safetensors",
                Some([("k".to_string(), "v".to_string())].into()),
            );
            w.add_tensor(
                "ids",
                "I64",
                &[16],
                s,
                &[1u8; 128],
                &EncodeOptions::default(),
            )
            .unwrap();
            w.add_tensor(
                "mask",
                "BOOL",
                &[4, 2],
                s,
                &[1, 0, 1, 0, 0, 1, 1, 1],
                &EncodeOptions::default(),
            )
            .unwrap();
            w.add_file("config.json", "{\"a\": 1}".repeat(30).as_bytes())
                .unwrap();
        }),
    ));
    // Through compress_model: a shard with its original safetensors header kept.
    {
        let src = dir.path().join("model.safetensors");
        let w = weights_bf16(16 * 8, 11);
        let tensors = vec![(
            "w",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![16, 8], &w)
                .unwrap(),
        )];
        let meta = Some([("format".to_string(), "pt".to_string())].into());
        safetensors::serialize_to_file(tensors, meta, &src).unwrap();
        let path = dir.path().join("compressed-model.jd");
        jitdelta_format::compress_model(&src, &path, &EncodeOptions::default(), false).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() < 20 << 10);
        decode_all(&JdFile::from_bytes(bytes.clone()).unwrap()).unwrap();
        std::fs::write(root.join("compressed-model.jd"), bytes).unwrap();
    }
    for (name, fill) in seeds {
        let path = dir.path().join(name);
        let mut w = JdWriter::create(&path).unwrap();
        fill(&mut w);
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() < 20 << 10);
        decode_all(&JdFile::from_bytes(bytes.clone()).unwrap()).unwrap();
        std::fs::write(root.join(name), bytes).unwrap();
    }
}
