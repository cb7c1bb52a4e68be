//! Bit layouts of the float dtypes the codec splits into exponent, sign and mantissa fields.

use crate::{Error, Result};

/// The IEEE-style layout of a floating-point storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatFormat {
    /// bfloat16: 1 sign, 8 exponent, 7 mantissa bits.
    BF16,
    /// IEEE half: 1 sign, 5 exponent, 10 mantissa bits.
    F16,
    /// IEEE single: 1 sign, 8 exponent, 23 mantissa bits.
    F32,
}

impl FloatFormat {
    /// The format for a safetensors dtype name (`"BF16"`, `"F16"`, `"F32"`), if it is one we split.
    pub fn from_dtype_name(name: &str) -> Option<Self> {
        match name {
            "BF16" => Some(Self::BF16),
            "F16" => Some(Self::F16),
            "F32" => Some(Self::F32),
            _ => None,
        }
    }

    /// The safetensors dtype name.
    pub fn dtype_name(self) -> &'static str {
        match self {
            Self::BF16 => "BF16",
            Self::F16 => "F16",
            Self::F32 => "F32",
        }
    }

    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            Self::BF16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    /// Exponent field width in bits.
    pub fn exponent_bits(self) -> u32 {
        match self {
            Self::BF16 | Self::F32 => 8,
            Self::F16 => 5,
        }
    }

    /// Mantissa field width in bits.
    pub fn mantissa_bits(self) -> u32 {
        match self {
            Self::BF16 => 7,
            Self::F16 => 10,
            Self::F32 => 23,
        }
    }

    /// Largest exponent field value (infinities and NaNs).
    pub fn max_exponent(self) -> u32 {
        (1 << self.exponent_bits()) - 1
    }

    /// Checks that `draft_mantissa_bits` leaves at least one residual bit.
    pub fn check_draft_bits(self, draft_mantissa_bits: u32) -> Result<()> {
        if draft_mantissa_bits >= self.mantissa_bits() {
            return Err(Error::InvalidOption(format!(
                "{} has {} mantissa bits; the draft may keep 0..={} of them, not {draft_mantissa_bits}",
                self.dtype_name(),
                self.mantissa_bits(),
                self.mantissa_bits() - 1
            )));
        }
        Ok(())
    }

    /// Reads value `i` of a little-endian byte buffer as raw bits.
    #[inline(always)]
    pub fn load(self, bytes: &[u8], i: usize) -> u32 {
        match self {
            Self::BF16 | Self::F16 => u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32,
            Self::F32 => u32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ]),
        }
    }

    /// Splits raw bits into (exponent, high field = sign and top `d` mantissa bits, low mantissa bits).
    #[inline(always)]
    pub fn split(self, bits: u32, d: u32) -> (u32, u32, u32) {
        let m = self.mantissa_bits();
        let e = self.exponent_bits();
        let sign = bits >> (e + m);
        let exponent = (bits >> m) & ((1 << e) - 1);
        let mantissa = bits & ((1 << m) - 1);
        let low_bits = m - d;
        (
            exponent,
            (sign << d) | (mantissa >> low_bits),
            mantissa & ((1 << low_bits) - 1),
        )
    }

    /// Inverse of [`FloatFormat::split`].
    #[inline(always)]
    pub fn join(self, exponent: u32, high: u32, low: u32, d: u32) -> u32 {
        let m = self.mantissa_bits();
        let e = self.exponent_bits();
        ((high >> d) << (e + m)) | (exponent << m) | ((high & ((1 << d) - 1)) << (m - d)) | low
    }

    /// The draft value of a weight whose low mantissa bits are unknown: the middle of the bucket
    /// for normal numbers, the truncated value for zeros, subnormals, infinities and NaNs (so that
    /// zeros stay zero and infinities stay infinite).
    #[inline(always)]
    pub fn draft(self, exponent: u32, high: u32, d: u32) -> u32 {
        let low_bits = self.mantissa_bits() - d;
        let midpoint = if exponent != 0 && exponent != self.max_exponent() {
            1 << (low_bits - 1)
        } else {
            0
        };
        self.join(exponent, high, midpoint, d)
    }

    /// Raw bits to f32 (exact for every source format).
    #[inline(always)]
    pub fn to_f32(self, bits: u32) -> f32 {
        match self {
            Self::BF16 => f32::from_bits(bits << 16),
            Self::F16 => half::f16::from_bits(bits as u16).to_f32(),
            Self::F32 => f32::from_bits(bits),
        }
    }

    /// f32 to raw bits of this format, rounding to nearest even.
    #[inline(always)]
    pub fn from_f32(self, v: f32) -> u32 {
        match self {
            Self::BF16 => half::bf16::from_f32(v).to_bits() as u32,
            Self::F16 => half::f16::from_f32(v).to_bits() as u32,
            Self::F32 => v.to_bits(),
        }
    }
}

/// The dtype a draft (base-only) decode writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DraftDtype {
    /// bfloat16 (exact for BF16 sources; F16/F32 drafts are rounded to nearest even).
    BF16,
    /// f32 (always exact).
    F32,
}

impl DraftDtype {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            Self::BF16 => 2,
            Self::F32 => 4,
        }
    }

    /// Writes draft bits of `source` format into `out` (little-endian) at position `i`.
    #[inline(always)]
    pub(crate) fn store(self, source: FloatFormat, bits: u32, out: &mut [u8], i: usize) {
        match (self, source) {
            (Self::BF16, FloatFormat::BF16) => {
                out[2 * i..2 * i + 2].copy_from_slice(&(bits as u16).to_le_bytes())
            }
            (Self::BF16, _) => {
                let b = half::bf16::from_f32(source.to_f32(bits)).to_bits();
                out[2 * i..2 * i + 2].copy_from_slice(&b.to_le_bytes())
            }
            (Self::F32, _) => {
                out[4 * i..4 * i + 4].copy_from_slice(&source.to_f32(bits).to_le_bytes())
            }
        }
    }
}

#[inline(always)]
pub(crate) fn store_bits(format: FloatFormat, bits: u32, out: &mut [u8], i: usize) {
    match format {
        FloatFormat::BF16 | FloatFormat::F16 => {
            out[2 * i..2 * i + 2].copy_from_slice(&(bits as u16).to_le_bytes())
        }
        FloatFormat::F32 => out[4 * i..4 * i + 4].copy_from_slice(&bits.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_join_roundtrip_all_bf16_and_f16() {
        for f in [FloatFormat::BF16, FloatFormat::F16] {
            for d in 0..f.mantissa_bits() {
                for bits in 0..=u16::MAX as u32 {
                    let (e, h, l) = f.split(bits, d);
                    assert_eq!(f.join(e, h, l, d), bits);
                }
            }
        }
    }

    #[test]
    fn draft_keeps_zero_and_infinity() {
        let f = FloatFormat::BF16;
        for bits in [0u32, 0x8000, 0x7F80, 0xFF80] {
            let (e, h, _) = f.split(bits, 3);
            assert_eq!(f.draft(e, h, 3), bits);
        }
        // 1.0 + low bits: draft is the bucket midpoint.
        let (e, h, _) = f.split(0x3F85, 3);
        assert_eq!(f.draft(e, h, 3), 0x3F88);
    }
}
