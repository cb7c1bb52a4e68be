//! Fixed-width bit fields packed LSB-first: field `i` of width `w` occupies bits `i*w .. i*w+w`
//! of the byte string read as one little-endian integer.

/// Bytes needed for `n` fields of `width` bits.
pub fn packed_len(n: usize, width: u32) -> usize {
    (n * width as usize).div_ceil(8)
}

/// Appends `values` (each < 2^width) packed at `width` bits to `out`.
pub fn pack(values: &[u32], width: u32, out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + packed_len(values.len(), width), 0);
    pack_into(values, width, &mut out[at..]);
}

/// Packs `values` (each < 2^width) at `width` bits into `out`, which must be exactly
/// `packed_len(values.len(), width)` bytes; every byte is written (the bits after the last field
/// are zero).
pub fn pack_into(values: &[u32], width: u32, out: &mut [u8]) {
    assert_eq!(
        out.len(),
        packed_len(values.len(), width),
        "packed plane size"
    );
    match width {
        0 => {}
        4 => {
            let mut pairs = values.chunks_exact(2);
            for (o, p) in out.iter_mut().zip(&mut pairs) {
                *o = (p[0] | (p[1] << 4)) as u8;
            }
            if let [v] = pairs.remainder() {
                out[values.len() / 2] = *v as u8;
            }
        }
        8 => {
            for (o, &v) in out.iter_mut().zip(values) {
                *o = v as u8;
            }
        }
        _ => {
            let mut acc = 0u64;
            let mut bits = 0u32;
            let mut at = 0;
            for &v in values {
                acc |= (v as u64) << bits;
                bits += width;
                while bits >= 8 {
                    out[at] = acc as u8;
                    at += 1;
                    acc >>= 8;
                    bits -= 8;
                }
            }
            if bits > 0 {
                out[at] = acc as u8;
            }
        }
    }
}

/// Clears the bits after field `n - 1` of a packed plane of `n` `width`-bit fields (its last
/// byte's unused high bits), as [`pack`] leaves them.
pub fn clear_padding(plane: &mut [u8], n: usize, width: u32) {
    let used = n * width as usize % 8;
    if used != 0 {
        if let Some(last) = plane.get_mut(packed_len(n, width) - 1) {
            *last &= (1u8 << used) - 1;
        }
    }
}

/// Reads fields `first .. first + out.len()` of a plane of `width`-bit fields.
///
/// The caller guarantees the plane holds at least `packed_len(first + out.len(), width)` bytes.
pub fn unpack(plane: &[u8], width: u32, first: usize, out: &mut [u32]) {
    debug_assert!(plane.len() >= packed_len(first + out.len(), width));
    match width {
        0 => out.fill(0),
        8 => {
            for (o, &b) in out.iter_mut().zip(&plane[first..]) {
                *o = b as u32;
            }
        }
        4 if first % 2 == 0 => {
            let bytes = &plane[first / 2..];
            let last = out.len() / 2;
            let mut pairs = out.chunks_exact_mut(2);
            for (p, &b) in (&mut pairs).zip(bytes) {
                p[0] = (b & 15) as u32;
                p[1] = (b >> 4) as u32;
            }
            if let [o] = pairs.into_remainder() {
                *o = (bytes[last] & 15) as u32;
            }
        }
        _ => {
            let mask = (1u64 << width) - 1;
            let mut bit = first * width as usize;
            for o in out.iter_mut() {
                let byte = bit / 8;
                let window = if byte + 8 <= plane.len() {
                    u64::from_le_bytes(plane[byte..byte + 8].try_into().unwrap())
                } else {
                    let mut tail = [0u8; 8];
                    tail[..plane.len() - byte].copy_from_slice(&plane[byte..]);
                    u64::from_le_bytes(tail)
                };
                *o = ((window >> (bit % 8)) & mask) as u32;
                bit += width as usize;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_every_width_and_offset() {
        for width in 0..=24u32 {
            let max = if width == 0 { 0 } else { (1u64 << width) - 1 };
            let values: Vec<u32> = (0..203u64)
                .map(|i| ((i * 2654435761) & max) as u32)
                .collect();
            let mut plane = Vec::new();
            pack(&values, width, &mut plane);
            assert_eq!(plane.len(), packed_len(values.len(), width));
            for first in [0usize, 1, 2, 7, 64, 200] {
                let mut out = vec![0u32; values.len() - first];
                unpack(&plane, width, first, &mut out);
                assert_eq!(out, values[first..], "width {width} first {first}");
            }
        }
    }
}
