//! Static rANS entropy coder for byte symbols, in independent blocks of interleaved lanes.
//!
//! The affine kind codes its 4-bit codes and its residuals (one table per code, the context the
//! decoder already has) with it: those alphabets are skewed far below one bit a symbol, where
//! Huffman would waste most of a bit. Written here rather than taken from a crate because the
//! format fixes the layout: tables shared by every chunk of a tensor (stored once in the index),
//! every block decodable on its own, and per-symbol table choice from a decoded context. The
//! arithmetic is the textbook 32-bit rANS with 16-bit renormalisation and 12-bit probabilities;
//! `docs/format.md` specifies it bit for bit.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Probability precision: frequencies sum to `1 << PROB_BITS`.
pub const PROB_BITS: u32 = 12;
const PROB_SCALE: u32 = 1 << PROB_BITS;
const STATE_LOW: u32 = 1 << 16;
/// Interleaved states per block; symbol `i` of a block belongs to lane `i % LANES`.
pub const LANES: usize = 8;
const BLOCK_HEADER: usize = 4 * LANES;

/// Normalised frequencies of byte symbols, summing to 4096 (or all zero for an empty stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<(u16, u16)>", into = "Vec<(u16, u16)>")]
pub struct FrequencyTable {
    freqs: Vec<u16>,
}

impl TryFrom<Vec<(u16, u16)>> for FrequencyTable {
    type Error = Error;
    fn try_from(pairs: Vec<(u16, u16)>) -> Result<Self> {
        let mut freqs = vec![0u16; 256];
        let mut total = 0u32;
        for (symbol, freq) in pairs {
            let slot = freqs
                .get_mut(symbol as usize)
                .ok_or_else(|| Error::corrupt(format!("frequency table symbol {symbol} > 255")))?;
            if freq == 0 || *slot != 0 {
                return Err(Error::corrupt(
                    "frequency table has a zero or repeated entry",
                ));
            }
            *slot = freq;
            total += freq as u32;
        }
        if total != 0 && total != PROB_SCALE {
            return Err(Error::corrupt(format!(
                "frequency table sums to {total}, not {PROB_SCALE}"
            )));
        }
        Ok(Self { freqs })
    }
}

impl From<FrequencyTable> for Vec<(u16, u16)> {
    fn from(t: FrequencyTable) -> Self {
        t.freqs
            .iter()
            .enumerate()
            .filter(|(_, &f)| f > 0)
            .map(|(s, &f)| (s as u16, f))
            .collect()
    }
}

impl FrequencyTable {
    /// Normalises a histogram of up to 256 symbols; every symbol seen gets a frequency >= 1.
    pub fn from_counts(counts: &[u64]) -> Self {
        assert!(counts.len() <= 256, "byte alphabet");
        let mut freqs = vec![0u16; 256];
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Self { freqs };
        }
        let mut sum: i64 = 0;
        for (f, &c) in freqs.iter_mut().zip(counts) {
            if c > 0 {
                let scaled = (c as u128 * PROB_SCALE as u128 + total as u128 / 2) / total as u128;
                *f = scaled.clamp(1, PROB_SCALE as u128) as u16;
                sum += *f as i64;
            }
        }
        // Fix rounding drift: take from (or give to) the most frequent symbols, where a step of
        // one costs the least code length.
        let mut order: Vec<usize> = (0..256).filter(|&s| freqs[s] > 0).collect();
        order.sort_by_key(|&s| std::cmp::Reverse(counts[s]));
        let mut diff = PROB_SCALE as i64 - sum;
        while diff != 0 {
            let mut moved = false;
            for &s in &order {
                if diff > 0 {
                    freqs[s] += 1;
                    diff -= 1;
                    moved = true;
                } else if freqs[s] > 1 {
                    freqs[s] -= 1;
                    diff += 1;
                    moved = true;
                }
                if diff == 0 {
                    break;
                }
            }
            assert!(moved, "at most 256 symbols always fit in 4096 slots");
        }
        Self { freqs }
    }

    /// Frequency of a symbol (0 when it cannot be coded).
    pub fn freq(&self, symbol: u8) -> u32 {
        self.freqs[symbol as usize] as u32
    }

    /// Ideal code length of a histogram under this table, in bits.
    pub fn cost_bits(&self, counts: &[u64]) -> f64 {
        counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(s, &c)| {
                let f = self.freqs[s].max(1) as f64;
                c as f64 * (PROB_BITS as f64 - f.log2())
            })
            .sum()
    }

    /// Encoder view of the table.
    pub fn encoder(&self) -> EncodeTable {
        let mut syms = [(0u32, 0u32); 256];
        let mut cum = 0u32;
        for (s, &f) in self.freqs.iter().enumerate() {
            syms[s] = (f as u32, cum);
            cum += f as u32;
        }
        EncodeTable { syms }
    }

    /// Decoder view of the table: one packed entry per probability slot.
    pub fn decoder(&self) -> DecodeTable {
        let mut slots = vec![0u32; PROB_SCALE as usize].into_boxed_slice();
        let mut cum = 0u32;
        for (s, &f) in self.freqs.iter().enumerate() {
            for slot in cum..cum + f as u32 {
                // symbol | (slot - cum) << 8 | (freq - 1) << 20
                slots[slot as usize] = s as u32 | ((slot - cum) << 8) | ((f as u32 - 1) << 20);
            }
            cum += f as u32;
        }
        DecodeTable {
            slots,
            empty: cum == 0,
        }
    }
}

/// Per-symbol (frequency, cumulative frequency) for encoding.
pub struct EncodeTable {
    syms: [(u32, u32); 256],
}

/// Slot-indexed table for decoding.
pub struct DecodeTable {
    slots: Box<[u32]>,
    empty: bool,
}

/// Number of blocks a stream of `n` symbols is cut into.
pub fn block_count(n: usize, block_len: usize) -> usize {
    n.div_ceil(block_len)
}

/// Encodes `symbols` as independent blocks of `block_len` symbols and appends the stream to `out`.
///
/// Stream layout: `u32` end offset of each block (relative to the end of the offset table), then
/// the blocks. A block is `LANES` final states (`u32` each) followed by the 16-bit words in the
/// order the decoder reads them. `context[i]` picks the table for symbol `i` (one table when
/// `context` is `None`). Fails if a symbol has zero frequency in its table.
pub fn encode(
    symbols: &[u8],
    context: Option<&[u8]>,
    tables: &[EncodeTable],
    block_len: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    let blocks = block_count(symbols.len(), block_len);
    let table_at = out.len();
    out.resize(table_at + 4 * blocks, 0);
    let data_at = out.len();
    let mut words: Vec<u16> = Vec::new();
    for b in 0..blocks {
        let lo = b * block_len;
        let hi = (lo + block_len).min(symbols.len());
        let mut states = [STATE_LOW; LANES];
        words.clear();
        for i in (lo..hi).rev() {
            let t = match context {
                Some(c) => &tables[c[i] as usize],
                None => &tables[0],
            };
            let (freq, cum) = t.syms[symbols[i] as usize];
            if freq == 0 {
                return Err(Error::InvalidOption(format!(
                    "symbol {} has no frequency in its table",
                    symbols[i]
                )));
            }
            let lane = (i - lo) % LANES;
            let mut x = states[lane];
            let x_max = ((STATE_LOW >> PROB_BITS) as u64) << 16;
            if x as u64 >= x_max * freq as u64 {
                words.push(x as u16);
                x >>= 16;
            }
            states[lane] = ((x / freq) << PROB_BITS) + (x % freq) + cum;
        }
        for s in states {
            out.extend_from_slice(&s.to_le_bytes());
        }
        for w in words.iter().rev() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let end = (out.len() - data_at) as u32;
        out[table_at + 4 * b..table_at + 4 * b + 4].copy_from_slice(&end.to_le_bytes());
    }
    Ok(())
}

/// Splits an encoded stream into its blocks, checking the offset table.
pub fn blocks(stream: &[u8], n: usize, block_len: usize) -> Result<Vec<&[u8]>> {
    crate::section::split_blocks(stream, block_count(n, block_len), BLOCK_HEADER, "rANS")
}

/// Decodes one block of `out.len()` symbols. `context[i]` (same length as `out`) picks the table.
pub fn decode_block(
    block: &[u8],
    context: Option<&[u8]>,
    tables: &[DecodeTable],
    out: &mut [u8],
) -> Result<()> {
    if block.len() < BLOCK_HEADER || (block.len() - BLOCK_HEADER) % 2 != 0 {
        return Err(Error::corrupt("rANS block too short"));
    }
    let mut states = [0u32; LANES];
    for (l, s) in states.iter_mut().enumerate() {
        *s = u32::from_le_bytes(block[4 * l..4 * l + 4].try_into().unwrap());
        if *s < STATE_LOW {
            return Err(Error::corrupt("rANS state below its lower bound"));
        }
    }
    let words = &block[BLOCK_HEADER..];
    let word_count = words.len() / 2;
    // Reads past the end yield 0 and are caught by the final position check, which keeps the
    // hot loop free of error branches.
    let mut pos = 0usize;
    #[inline(always)]
    fn step(
        x: u32,
        slots: &[u32; PROB_SCALE as usize],
        words: &[u8],
        pos: &mut usize,
    ) -> (u8, u32) {
        let e = slots[(x & (PROB_SCALE - 1)) as usize];
        let x = ((e >> 20) + 1) * (x >> PROB_BITS) + ((e >> 8) & 0xFFF);
        if x < STATE_LOW {
            let w = match words.get(2 * *pos..2 * *pos + 2) {
                Some(w) => u16::from_le_bytes([w[0], w[1]]) as u32,
                None => 0,
            };
            *pos += 1;
            ((e as u8), (x << 16) | w)
        } else {
            (e as u8, x)
        }
    }
    match context {
        None => {
            let t = &tables[0];
            if t.empty && !out.is_empty() {
                return Err(Error::corrupt("symbols coded with an empty table"));
            }
            let slots: &[u32; PROB_SCALE as usize] =
                t.slots.as_ref().try_into().expect("4096 slots");
            let (mut lo, mut hi) = ([0u32; 4], [0u32; 4]);
            lo.copy_from_slice(&states[..4]);
            hi.copy_from_slice(&states[4..]);
            let mut groups = out.chunks_exact_mut(LANES);
            for g in &mut groups {
                let g: &mut [u8; LANES] = g.try_into().unwrap();
                lo = decode_quad(lo, &mut g[..4], slots, words, &mut pos);
                hi = decode_quad(hi, &mut g[4..], slots, words, &mut pos);
            }
            let rest = groups.into_remainder();
            let split = rest.len().min(LANES / 2);
            let (a, b) = rest.split_at_mut(split);
            lo = decode_quad(lo, a, slots, words, &mut pos);
            hi = decode_quad(hi, b, slots, words, &mut pos);
            states[..4].copy_from_slice(&lo);
            states[4..].copy_from_slice(&hi);
        }
        Some(ctx) => {
            for (i, o) in out.iter_mut().enumerate() {
                let t = tables
                    .get(ctx[i] as usize)
                    .ok_or_else(|| Error::corrupt("rANS context has no table"))?;
                if t.empty {
                    return Err(Error::corrupt("symbols coded with an empty table"));
                }
                let slots: &[u32; PROB_SCALE as usize] =
                    t.slots.as_ref().try_into().expect("4096 slots");
                let l = i % LANES;
                let (s, x) = step(states[l], slots, words, &mut pos);
                *o = s;
                states[l] = x;
            }
        }
    }
    if pos != word_count || states.iter().any(|&s| s != STATE_LOW) {
        return Err(Error::corrupt(
            "rANS block did not end in its initial state",
        ));
    }
    Ok(())
}

/// Decodes up to four symbols, one per lane, reading renormalisation words from one 64-bit
/// window: branch-free, one bounds check per quad. Reads past the end yield zeros; the caller's
/// final position check rejects them.
#[inline(always)]
fn decode_quad(
    mut states: [u32; 4],
    out: &mut [u8],
    slots: &[u32; PROB_SCALE as usize],
    words: &[u8],
    pos: &mut usize,
) -> [u32; 4] {
    let at = 2 * *pos;
    let window = match words.get(at..at + 8) {
        Some(w) => u64::from_le_bytes(w.try_into().unwrap()),
        None => {
            let mut tail = [0u8; 8];
            let from = at.min(words.len());
            let avail = (words.len() - from).min(8);
            tail[..avail].copy_from_slice(&words[from..from + avail]);
            u64::from_le_bytes(tail)
        }
    };
    let mut used = 0u32;
    let n = out.len().min(4);
    for j in 0..4 {
        if j < n {
            let x = states[j];
            let e = slots[(x & (PROB_SCALE - 1)) as usize];
            out[j] = e as u8;
            let y = ((e >> 20) + 1) * (x >> PROB_BITS) + ((e >> 8) & 0xFFF);
            let renorm = y < STATE_LOW;
            let w = ((window >> (16 * used)) & 0xFFFF) as u32;
            states[j] = if renorm { (y << 16) | w } else { y };
            used += renorm as u32;
        }
    }
    *pos += used as usize;
    states
}

/// Decodes a whole stream (all blocks, in order) into `out`.
pub fn decode(
    stream: &[u8],
    context: Option<&[u8]>,
    tables: &[DecodeTable],
    block_len: usize,
    out: &mut [u8],
) -> Result<()> {
    let blocks = blocks(stream, out.len(), block_len)?;
    for (b, (block, o)) in blocks.iter().zip(out.chunks_mut(block_len)).enumerate() {
        let ctx = context.map(|c| &c[b * block_len..b * block_len + o.len()]);
        decode_block(block, ctx, tables, o)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(symbols: &[u8], block_len: usize) -> usize {
        let mut counts = [0u64; 256];
        for &s in symbols {
            counts[s as usize] += 1;
        }
        let t = FrequencyTable::from_counts(&counts);
        let mut out = Vec::new();
        encode(symbols, None, &[t.encoder()], block_len, &mut out).unwrap();
        let mut back = vec![0u8; symbols.len()];
        decode(&out, None, &[t.decoder()], block_len, &mut back).unwrap();
        assert_eq!(back, symbols);
        out.len()
    }

    #[test]
    fn roundtrips_skewed_constant_and_uniform() {
        let skewed: Vec<u8> = (0..100_003u32)
            .map(|i| (120 + (i.wrapping_mul(2654435761) >> 29)) as u8)
            .collect();
        roundtrip(&skewed, 4096);
        let constant = vec![7u8; 50_000];
        // A single symbol costs no words at all, only block headers.
        assert_eq!(roundtrip(&constant, 16384), 4 * (4 + 4 * LANES));
        let uniform: Vec<u8> = (0..70_000u32).map(|i| (i * 7919 % 256) as u8).collect();
        roundtrip(&uniform, 1000);
        roundtrip(&[], 16);
        roundtrip(&[3], 16);
    }

    #[test]
    fn table_serialisation_rejects_bad_sums() {
        let t = FrequencyTable::from_counts(&[5, 0, 3]);
        let v: Vec<(u16, u16)> = t.clone().into();
        assert_eq!(FrequencyTable::try_from(v).unwrap(), t);
        assert!(FrequencyTable::try_from(vec![(0u16, 100u16)]).is_err());
        assert!(FrequencyTable::try_from(vec![(0u16, 4000u16), (0, 96)]).is_err());
        assert!(FrequencyTable::try_from(vec![(300u16, 4096u16)]).is_err());
    }

    #[test]
    fn corrupt_blocks_fail_cleanly() {
        let symbols: Vec<u8> = (0..10_000u32).map(|i| (i % 13) as u8).collect();
        let mut counts = [0u64; 256];
        for &s in &symbols {
            counts[s as usize] += 1;
        }
        let t = FrequencyTable::from_counts(&counts);
        let mut out = Vec::new();
        encode(&symbols, None, &[t.encoder()], 4096, &mut out).unwrap();
        let mut back = vec![0u8; symbols.len()];
        for cut in [0, 5, 13, out.len() / 2, out.len() - 2] {
            assert!(decode(&out[..cut], None, &[t.decoder()], 4096, &mut back).is_err());
        }
        // Flipped bits in the words need not be detected here (the chunk CRC does that), but
        // they must never panic or read out of bounds.
        for i in 0..out.len() {
            let mut flipped = out.clone();
            flipped[i] ^= 0x10;
            let _ = decode(&flipped, None, &[t.decoder()], 4096, &mut back);
        }
    }
}
