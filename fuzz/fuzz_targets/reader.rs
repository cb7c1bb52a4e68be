//! Fuzz target: any byte string given to the reader must yield `Err` or correct decoding, never a
//! panic, an abort or an out-of-memory.
//!
//! Each input is tried twice:
//! 1. as is: `JdFile::from_bytes`, then every tensor decoded exact, draft and resident;
//! 2. with its checksums repaired: if the input has a footer and its index parses as JSON, the
//!    index CRC and every chunk / blob CRC in the index are recomputed over the bytes they cover,
//!    so that mutations reach index validation and the decoders instead of stopping at a
//!    checksum mismatch.
#![no_main]

use jitdelta_format::container::{footer_bytes, FOOTER_LEN, HEADER_LEN};
use jitdelta_format::{file_stats, DraftDtype, Encoding, Index, JdFile};
use libfuzzer_sys::fuzz_target;

fn exercise(bytes: Vec<u8>) {
    let Ok(jd) = JdFile::from_bytes(bytes) else {
        return;
    };
    let _ = file_stats(&jd);
    let names: Vec<String> = jd.tensor_names().map(String::from).collect();
    for name in &names {
        let Ok(view) = jd.tensor(name) else { continue };
        let _ = view.decode_exact();
        if let Some(f) = view.format() {
            for c in 0..view.chunk_count() {
                let mut buf = vec![0u8; view.chunk_len(c) * f.bytes()];
                let _ = view.decode_chunk_exact(c, &mut buf);
            }
        }
        let _ = view.decode_draft(DraftDtype::F32);
        let _ = view.decode_draft(DraftDtype::BF16);
        for d in [0, 3] {
            if let Ok(r) = view.to_resident(d) {
                let (rows, cols) = r.dims();
                let n = rows * cols;
                let mut out = vec![0u8; n * r.format().bytes()];
                let _ = r.decode_exact(&mut out);
                if let Some(len) = n.checked_mul(4) {
                    let mut draft = vec![0u8; len];
                    let _ = r.decode_draft(DraftDtype::F32, &mut draft);
                }
            }
        }
    }
    for f in &jd.index().files {
        let _ = jd.aux_file(&f.name);
    }
}

fn crc_at(data: &[u8], offset: u64, len: u64) -> Option<u32> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    data.get(start..end).map(crc32fast::hash)
}

/// The input with its index and chunk checksums recomputed, if it has a parseable index.
fn repaired(data: &[u8]) -> Option<Vec<u8>> {
    let footer = data.len().checked_sub(FOOTER_LEN as usize)?;
    let index_offset = u64::from_le_bytes(data[footer..footer + 8].try_into().ok()?);
    let index_offset = usize::try_from(index_offset).ok()?;
    if index_offset < HEADER_LEN as usize || index_offset > footer {
        return None;
    }
    let mut index: Index = serde_json::from_slice(&data[index_offset..footer]).ok()?;
    let area = &data[..index_offset];
    for t in &mut index.tensors {
        match &mut t.encoding {
            Encoding::Stored { blob } => {
                blob.crc32 = crc_at(area, blob.offset, blob.len).unwrap_or(blob.crc32);
            }
            Encoding::Bitplane { chunking, .. } | Encoding::Affine { chunking, .. } => {
                for c in &mut chunking.chunks {
                    c.base_crc32 = crc_at(area, c.offset, c.base_len).unwrap_or(c.base_crc32);
                    if let Some(r) = c.offset.checked_add(c.base_len) {
                        c.residual_crc32 =
                            crc_at(area, r, c.residual_len).unwrap_or(c.residual_crc32);
                    }
                }
            }
        }
    }
    for f in &mut index.files {
        f.blob.crc32 = crc_at(area, f.blob.offset, f.blob.len).unwrap_or(f.blob.crc32);
    }
    let json = serde_json::to_vec(&index).ok()?;
    let mut out = area.to_vec();
    let at = out.len() as u64;
    out.extend_from_slice(&json);
    out.extend_from_slice(&footer_bytes(at, json.len() as u64, crc32fast::hash(&json)));
    // Keep the header as the input has it (magic and version are fuzzed too).
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    exercise(data.to_vec());
    if let Some(fixed) = repaired(data) {
        exercise(fixed);
    }
});
