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
