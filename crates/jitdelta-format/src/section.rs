//! Length-prefixed sections inside a chunk blob.

use crate::{Error, Result};

/// Appends `u32` length + bytes.
pub fn write(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Splits a length-prefixed section off the front of `blob`.
pub fn read<'a>(blob: &mut &'a [u8], what: &str) -> Result<&'a [u8]> {
    let len = take(blob, 4, what)?;
    let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
    take(blob, len, what)
}

/// Splits exactly `len` bytes off the front of `blob`.
pub fn take<'a>(blob: &mut &'a [u8], len: usize, what: &str) -> Result<&'a [u8]> {
    if blob.len() < len {
        return Err(Error::corrupt(format!(
            "{what}: needs {len} bytes, {} left in the chunk",
            blob.len()
        )));
    }
    let (head, tail) = blob.split_at(len);
    *blob = tail;
    Ok(head)
}

/// Checks that nothing is left over.
pub fn finish(blob: &[u8], what: &str) -> Result<()> {
    if blob.is_empty() {
        Ok(())
    } else {
        Err(Error::corrupt(format!(
            "{what}: {} trailing bytes",
            blob.len()
        )))
    }
}

/// Splits a blocked stream into `count` blocks of at least `min_len` bytes each. Layout: a `u32`
/// end offset per block (relative to the end of this table, non-decreasing, the last one the end
/// of the stream), then the blocks back to back.
pub fn split_blocks<'a>(
    stream: &'a [u8],
    count: usize,
    min_len: usize,
    what: &str,
) -> Result<Vec<&'a [u8]>> {
    let table_len = count
        .checked_mul(4)
        .filter(|&l| l <= stream.len())
        .ok_or_else(|| Error::corrupt(format!("{what} stream shorter than its block table")))?;
    let (table, data) = stream.split_at(table_len);
    let mut out = Vec::with_capacity(count);
    let mut start = 0usize;
    for (b, end) in table.chunks_exact(4).enumerate() {
        let end = u32::from_le_bytes(end.try_into().unwrap()) as usize;
        if end < start + min_len || end > data.len() {
            return Err(Error::corrupt(format!(
                "{what} block {b} has a bad end offset {end}"
            )));
        }
        out.push(&data[start..end]);
        start = end;
    }
    if start != data.len() {
        return Err(Error::corrupt(format!("{what} stream has trailing bytes")));
    }
    Ok(out)
}
