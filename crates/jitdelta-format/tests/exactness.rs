//! Property tests: every tensor written through the public API comes back bit for bit, whatever
//! its bit patterns (NaN payloads, infinities, signed zeros, subnormals, huge dynamic range),
//! shape (empty, rank 0..3, not a multiple of any block size), dtype, base kind and draft
//! precision; drafts are deterministic and, for bit-plane tensors, equal to the documented bucket
//! midpoint.
//!
//!   cargo test -p jitdelta-format --test exactness
//!
//! `PROPTEST_CASES=N` raises the case count of every property (default 64 here).

use jitdelta_format::{
    BaseKind, DraftDtype, EncodeOptions, Encoding, Error, FloatFormat, JdFile, JdWriter,
    ResidentTensor,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use std::path::Path;

const FORMATS: [FloatFormat; 3] = [FloatFormat::BF16, FloatFormat::F16, FloatFormat::F32];

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        // Failures are minimised and reported in the test output; no regression files in src.
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

// ---------------------------------------------------------------------------------------------
// Bit patterns

fn pack(f: FloatFormat, sign: bool, exponent: u32, mantissa: u32) -> u32 {
    let m = f.mantissa_bits();
    let e = f.exponent_bits();
    ((sign as u32) << (e + m)) | (exponent << m) | (mantissa & ((1 << m) - 1))
}

fn width_mask(f: FloatFormat) -> u32 {
    if f.bytes() == 2 {
        0xFFFF
    } else {
        u32::MAX
    }
}

/// Named extreme values: min/max normal, smallest subnormal, 1e-30, 1e30, 1, 65504.
fn extremes(f: FloatFormat) -> Vec<u32> {
    let maxe = f.max_exponent();
    let m = f.mantissa_bits();
    let mut v = vec![
        pack(f, false, 1, 0),
        pack(f, false, maxe - 1, (1 << m) - 1),
        pack(f, false, 0, 1),
        pack(f, false, 0, (1 << m) - 1),
    ];
    for x in [1e-30f32, 1e30, 1.0, 65504.0, 1e-8, 3.0e38, 1.0e-38] {
        v.push(f.from_f32(x));
    }
    v
}

/// One value: weighted towards typical trained weights and every special class.
fn value(f: FloatFormat) -> BoxedStrategy<u32> {
    let m = f.mantissa_bits();
    let maxe = f.max_exponent();
    let bias = maxe / 2;
    let mant = (1u32 << m) - 1;
    let quiet = 1u32 << (m - 1);
    let mask = width_mask(f);
    prop_oneof![
        // Typical weights: |w| in ~[2^-8, 2].
        4 => (any::<bool>(), (bias - 8)..=(bias + 1), any::<u32>())
            .prop_map(move |(s, e, man)| pack(f, s, e, man & mant)),
        // Anything at all.
        2 => any::<u32>().prop_map(move |b| b & mask),
        // Quiet NaN with a payload, either sign.
        1 => (any::<bool>(), any::<u32>())
            .prop_map(move |(s, p)| pack(f, s, maxe, quiet | (p & (quiet - 1)))),
        // Signalling NaN (quiet bit clear, payload non-zero), either sign.
        1 => (any::<bool>(), 1..quiet).prop_map(move |(s, p)| pack(f, s, maxe, p)),
        // ±0 and ±inf.
        1 => (any::<bool>(), select(vec![0u32, maxe])).prop_map(move |(s, e)| pack(f, s, e, 0)),
        // Subnormals.
        1 => (any::<bool>(), 1..=mant).prop_map(move |(s, man)| pack(f, s, 0, man)),
        // Named extremes, either sign.
        1 => (any::<bool>(), select(extremes(f)))
            .prop_map(move |(s, b)| if s { b ^ pack(f, true, 0, 0) } else { b }),
    ]
    .boxed()
}

/// Tiny or huge magnitudes only: a group that holds both spans the whole exponent range.
fn dynamic_range(f: FloatFormat) -> BoxedStrategy<u32> {
    let maxe = f.max_exponent();
    let mant = (1u32 << f.mantissa_bits()) - 1;
    prop_oneof![
        (any::<bool>(), 0..=3u32, any::<u32>()).prop_map(move |(s, e, m)| pack(f, s, e, m & mant)),
        (any::<bool>(), (maxe - 3)..maxe, any::<u32>()).prop_map(move |(s, e, m)| pack(
            f,
            s,
            e,
            m & mant
        )),
        (any::<bool>(), select(vec![1e-30f32, 1e30])).prop_map(move |(s, x)| f.from_f32(if s {
            -x
        } else {
            x
        })),
    ]
    .boxed()
}

/// `n` values: mixtures, constant tensors, dynamic-range tensors, constant with a few outliers.
fn values(f: FloatFormat, n: usize) -> BoxedStrategy<Vec<u32>> {
    if n == 0 {
        return Just(Vec::new()).boxed();
    }
    prop_oneof![
        4 => vec(value(f), n),
        1 => value(f).prop_map(move |v| vec![v; n]),
        1 => vec(dynamic_range(f), n),
        1 => (value(f), vec((0..n, value(f)), 1..4)).prop_map(move |(c, patches)| {
            let mut v = vec![c; n];
            for (i, x) in patches {
                v[i] = x;
            }
            v
        }),
    ]
    .boxed()
}

fn to_bytes(f: FloatFormat, values: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * f.bytes());
    for &v in values {
        out.extend_from_slice(&v.to_le_bytes()[..f.bytes()]);
    }
    out
}

fn load(f: FloatFormat, bytes: &[u8], i: usize) -> u32 {
    let b = f.bytes();
    let mut w = [0u8; 4];
    w[..b].copy_from_slice(&bytes[i * b..i * b + b]);
    u32::from_le_bytes(w)
}

// ---------------------------------------------------------------------------------------------
// Shapes and options

fn shape() -> BoxedStrategy<Vec<u64>> {
    prop_oneof![
        5 => (0u64..20, 0u64..20).prop_map(|(r, c)| vec![r, c]),
        // Enough rows and columns for several chunks of several entropy-coded blocks.
        2 => (20u64..70, 1u64..60).prop_map(|(r, c)| vec![r, c]),
        // Stacked experts.
        2 => (1u64..4, 0u64..6, 0u64..9).prop_map(|(a, b, c)| vec![a, b, c]),
        1 => (0u64..30).prop_map(|n| vec![n]),
        1 => Just(vec![]),
        1 => select(vec![vec![0u64, 5], vec![5, 0], vec![0, 0], vec![3, 0, 7], vec![1, 1], vec![1, 1, 1]]),
    ]
    .boxed()
}

#[derive(Debug, Clone)]
struct Case {
    format: FloatFormat,
    shape: Vec<u64>,
    values: Vec<u32>,
    opts: EncodeOptions,
}

fn base_kind() -> impl Strategy<Value = BaseKind> {
    select(vec![BaseKind::Bitplane, BaseKind::Affine, BaseKind::Auto])
}

/// Options with `draft_mantissa_bits` anywhere in the valid range of `f`.
fn options(f: FloatFormat) -> impl Strategy<Value = EncodeOptions> {
    (
        base_kind(),
        0..f.mantissa_bits(),
        1usize..8,
        1usize..100,
        1usize..40,
    )
        .prop_map(
            |(base, d, chunk_rows, block_len, group_size)| EncodeOptions {
                base,
                draft_mantissa_bits: d,
                chunk_rows,
                group_size,
                block_len,
                ..EncodeOptions::default()
            },
        )
}

fn case(formats: Vec<FloatFormat>) -> impl Strategy<Value = Case> {
    select(formats)
        .prop_flat_map(|f| (Just(f), shape(), options(f)))
        .prop_flat_map(|(format, shape, opts)| {
            let n = shape.iter().product::<u64>() as usize;
            values(format, n).prop_map(move |values| Case {
                format,
                shape: shape.clone(),
                values,
                opts: opts.clone(),
            })
        })
}

// ---------------------------------------------------------------------------------------------
// Checks

/// The documented draft of `bits`: sign, exponent and top `d` mantissa bits kept; the low bits
/// set to the bucket midpoint for normal numbers, cleared for zeros, subnormals, inf and NaN.
fn expected_draft_bits(f: FloatFormat, bits: u32, d: u32) -> u32 {
    let m = f.mantissa_bits();
    let low = m - d;
    let e = (bits >> m) & f.max_exponent();
    let kept = bits & !((1u32 << low) - 1);
    if e != 0 && e != f.max_exponent() {
        kept | (1 << (low - 1))
    } else {
        kept
    }
}

fn bits_to_f32(f: FloatFormat, bits: u32) -> f32 {
    match f {
        FloatFormat::BF16 => f32::from_bits(bits << 16),
        FloatFormat::F16 => half::f16::from_bits(bits as u16).to_f32(),
        FloatFormat::F32 => f32::from_bits(bits),
    }
}

/// The expected draft output of a whole tensor as `dtype` bytes.
fn expected_draft(f: FloatFormat, data: &[u8], d: u32, dtype: DraftDtype) -> Vec<u8> {
    let n = data.len() / f.bytes();
    let mut out = Vec::with_capacity(n * dtype.bytes());
    for i in 0..n {
        let b = expected_draft_bits(f, load(f, data, i), d);
        match (dtype, f) {
            (DraftDtype::F32, _) => {
                out.extend_from_slice(&bits_to_f32(f, b).to_bits().to_le_bytes())
            }
            (DraftDtype::BF16, FloatFormat::BF16) => {
                out.extend_from_slice(&(b as u16).to_le_bytes())
            }
            (DraftDtype::BF16, _) => out.extend_from_slice(
                &half::bf16::from_f32(bits_to_f32(f, b))
                    .to_bits()
                    .to_le_bytes(),
            ),
        }
    }
    out
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

macro_rules! prop_assert_bytes_eq {
    ($a:expr, $b:expr, $($what:tt)+) => {{
        let (a, b): (&[u8], &[u8]) = (&$a, &$b);
        if let Some(at) = first_diff(a, b) {
            return Err(TestCaseError::fail(format!(
                "{}: {} vs {} bytes, first difference at byte {at}: {:02x?} vs {:02x?}",
                format!($($what)+),
                a.len(),
                b.len(),
                &a[at.min(a.len())..(at + 8).min(a.len())],
                &b[at.min(b.len())..(at + 8).min(b.len())],
            )));
        }
    }};
}

/// Checks the BF16 bucket-width promise for a bit-plane draft: for every normal value `v`, the
/// F32 draft has the sign of `v` and `|draft - v| <= 2^(E-d)` with `v = 1.m * 2^E`, i.e. a
/// relative error of at most `2^-d`.
fn check_bf16_bucket(data: &[u8], draft_f32: &[u8], d: u32) -> Result<(), TestCaseError> {
    let f = FloatFormat::BF16;
    for i in 0..data.len() / 2 {
        let bits = load(f, data, i);
        let e = (bits >> 7) & 0xFF;
        if e == 0 || e == 0xFF {
            continue;
        }
        let v = f32::from_bits(bits << 16) as f64;
        let dr = f32::from_le_bytes(draft_f32[4 * i..4 * i + 4].try_into().unwrap()) as f64;
        let width = 2f64.powi(e as i32 - 127 - d as i32);
        prop_assert!(
            (dr - v).abs() <= width && dr.signum() == v.signum(),
            "value {i}: {v:e} (bits {bits:#06x}) drafts to {dr:e}, bucket width {width:e}, d = {d}"
        );
        prop_assert!((dr - v).abs() / v.abs() <= 2f64.powi(-(d as i32)));
    }
    Ok(())
}

/// Everything a reader can do with one tensor, checked against its source bytes.
fn check_tensor(
    jd: &JdFile,
    name: &str,
    dtype: &str,
    shape: &[u64],
    data: &[u8],
) -> Result<(), TestCaseError> {
    let view = jd
        .tensor(name)
        .map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
    prop_assert_eq!(&view.entry().dtype, dtype);
    prop_assert_eq!(view.entry().shape.as_slice(), shape);
    let exact = view
        .decode_exact()
        .map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
    prop_assert_bytes_eq!(exact, data, "{name}: decode_exact");
    let mut into = vec![0xA5u8; data.len()];
    view.decode_exact_into(&mut into).unwrap();
    prop_assert_bytes_eq!(into, data, "{name}: decode_exact_into");
    let mut wrong = vec![0u8; data.len() + 1];
    let r = view.decode_exact_into(&mut wrong);
    prop_assert!(matches!(r, Err(Error::BufferSize { .. })), "{:?}", r);

    let Some(f) = view.format() else {
        // Stored whole: no chunks, no draft, no resident form.
        prop_assert_eq!(view.chunk_count(), 0);
        prop_assert!(view.chunk_rows().is_none());
        prop_assert!(view.decode_draft(DraftDtype::F32).is_err());
        prop_assert!(view.to_resident(0).is_err());
        prop_assert!(view.decode_chunk_exact(0, &mut []).is_err());
        return Ok(());
    };
    prop_assert_eq!(f.dtype_name(), dtype);
    let (rows, cols) = view.dims();
    prop_assert_eq!(rows * cols, data.len() / f.bytes());
    let chunk_rows = view.chunk_rows().unwrap();
    let (kind_bitplane, d) = match &view.entry().encoding {
        Encoding::Bitplane {
            draft_mantissa_bits,
            ..
        } => (true, *draft_mantissa_bits),
        Encoding::Affine { .. } => (false, 0),
        Encoding::Stored { .. } => unreachable!("format() is Some"),
    };
    let expected_chunks = if cols == 0 {
        0
    } else {
        rows.div_ceil(chunk_rows)
    };
    prop_assert_eq!(view.chunk_count(), expected_chunks);

    // Chunk by chunk, exact and draft, against the whole-tensor decodes.
    let draft = view.decode_draft(DraftDtype::F32).unwrap();
    let draft_again = view.decode_draft(DraftDtype::F32).unwrap();
    prop_assert_bytes_eq!(draft, draft_again, "{name}: draft F32 is not deterministic");
    let draft16 = view.decode_draft(DraftDtype::BF16).unwrap();
    prop_assert_bytes_eq!(
        draft16,
        view.decode_draft(DraftDtype::BF16).unwrap(),
        "{name}: draft BF16 is not deterministic"
    );
    prop_assert_eq!(draft.len(), rows * cols * 4);
    for c in 0..view.chunk_count() {
        let n = view.chunk_len(c);
        let start = c * chunk_rows * cols;
        let mut out = vec![0x5Au8; n * f.bytes()];
        view.decode_chunk_exact(c, &mut out)
            .map_err(|e| TestCaseError::fail(format!("{name} chunk {c}: {e}")))?;
        prop_assert_bytes_eq!(
            out,
            data[start * f.bytes()..(start + n) * f.bytes()],
            "{name}: decode_chunk_exact({c})"
        );
        let mut dout = vec![0u8; n * 4];
        view.decode_chunk_draft(c, DraftDtype::F32, &mut dout)
            .unwrap();
        prop_assert_bytes_eq!(
            dout,
            draft[start * 4..(start + n) * 4],
            "{name}: chunk draft {c}"
        );
    }
    let mut none = vec![0u8; 0];
    let r = view.decode_chunk_exact(view.chunk_count(), &mut none);
    prop_assert!(matches!(r, Err(Error::ChunkOutOfRange { .. })), "{:?}", r);

    if kind_bitplane {
        prop_assert_bytes_eq!(
            draft,
            expected_draft(f, data, d, DraftDtype::F32),
            "{name}: bit-plane F32 draft (d = {d}) is not the bucket midpoint"
        );
        prop_assert_bytes_eq!(
            draft16,
            expected_draft(f, data, d, DraftDtype::BF16),
            "{name}: bit-plane BF16 draft (d = {d}) is not the bucket midpoint"
        );
        if f == FloatFormat::BF16 {
            check_bf16_bucket(data, &draft, d)?;
        }
    }

    // Resident layouts at several draft precisions.
    let mut ds = vec![0, f.mantissa_bits() - 1, 3.min(f.mantissa_bits() - 1)];
    if kind_bitplane {
        ds.push(d);
    }
    ds.sort();
    ds.dedup();
    for rd in ds {
        let r = view
            .to_resident(rd)
            .map_err(|e| TestCaseError::fail(format!("{name}: to_resident({rd}): {e}")))?;
        prop_assert_eq!(r.dims(), (rows, cols));
        prop_assert_eq!(r.chunk_count(), view.chunk_count());
        prop_assert_eq!(r.draft_bits(), rd);
        let mut out = vec![0xC3u8; data.len()];
        r.decode_exact(&mut out)
            .map_err(|e| TestCaseError::fail(format!("{name}: resident({rd}) decode: {e}")))?;
        prop_assert_bytes_eq!(out, data, "{name}: resident({rd}).decode_exact");
        for c in 0..r.chunk_count() {
            let n = r.chunk_len(c);
            let start = c * chunk_rows * cols;
            let mut o = vec![0u8; n * f.bytes()];
            r.decode_chunk_exact(c, &mut o).unwrap();
            prop_assert_bytes_eq!(
                o,
                data[start * f.bytes()..(start + n) * f.bytes()],
                "{name}: resident({rd}).decode_chunk_exact({c})"
            );
        }
        let mut rdraft = vec![0u8; rows * cols * 4];
        r.decode_draft(DraftDtype::F32, &mut rdraft).unwrap();
        let mut rdraft2 = vec![0u8; rows * cols * 4];
        r.decode_draft(DraftDtype::F32, &mut rdraft2).unwrap();
        prop_assert_bytes_eq!(
            rdraft,
            rdraft2,
            "{name}: resident({rd}) draft not deterministic"
        );
        prop_assert_bytes_eq!(
            rdraft,
            expected_draft(f, data, rd, DraftDtype::F32),
            "{name}: resident({rd}) draft is not the bucket midpoint"
        );
        if kind_bitplane && rd == d {
            prop_assert_bytes_eq!(rdraft, draft, "{name}: resident and file drafts differ");
        }
        // Built straight from the exact values, the layout is the same.
        let direct = ResidentTensor::from_exact(f, rows, cols, chunk_rows, rd, data).unwrap();
        prop_assert_eq!(direct.planes(), r.planes());
        prop_assert_eq!(direct.exponent_bases(), r.exponent_bases());
        prop_assert_eq!(direct.escapes(), r.escapes());
        prop_assert!(r.draft_bytes() <= r.bytes_held());
    }
    Ok(())
}

fn write_one(path: &Path, c: &Case, data: &[u8]) -> jitdelta_format::Result<()> {
    let mut w = JdWriter::create(path)?;
    let shard = w.add_shard("model.safetensors", None);
    w.add_tensor("t", c.format.dtype_name(), &c.shape, shard, data, &c.opts)?;
    w.finish()
}

fn run_case(c: &Case) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jd");
    let data = to_bytes(c.format, &c.values);
    write_one(&path, c, &data).map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
    let jd = JdFile::open(&path).map_err(|e| TestCaseError::fail(format!("open: {e}")))?;
    check_tensor(&jd, "t", c.format.dtype_name(), &c.shape, &data)?;
    // An in-memory image reads the same.
    let mem = JdFile::from_bytes(std::fs::read(&path).unwrap()).unwrap();
    prop_assert_bytes_eq!(
        mem.tensor("t").unwrap().decode_exact().unwrap(),
        data,
        "from_bytes decode_exact"
    );
    // Split tensors get the kind that was asked for.
    if c.shape.len() >= 2 {
        let enc = &jd.index().tensors[0].encoding;
        let ok = match c.opts.base {
            BaseKind::Bitplane => matches!(enc, Encoding::Bitplane { .. }),
            BaseKind::Affine => matches!(enc, Encoding::Affine { .. }),
            BaseKind::Auto => !matches!(enc, Encoding::Stored { .. }),
        };
        prop_assert!(ok, "{:?} asked, {:?} written", c.opts.base, enc);
    } else {
        let stored = matches!(jd.index().tensors[0].encoding, Encoding::Stored { .. });
        prop_assert!(stored, "rank < 2 must be stored whole");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config())]

    #[test]
    fn bf16_roundtrips_bit_exactly(c in case(vec![FloatFormat::BF16])) {
        run_case(&c)?;
    }

    #[test]
    fn f16_roundtrips_bit_exactly(c in case(vec![FloatFormat::F16])) {
        run_case(&c)?;
    }

    #[test]
    fn f32_roundtrips_bit_exactly(c in case(vec![FloatFormat::F32])) {
        run_case(&c)?;
    }

    /// BF16 bit planes with normal values only: the draft is within one bucket of every value.
    #[test]
    fn bf16_bitplane_draft_within_bucket(
        d in 0u32..7,
        rows in 1u64..40,
        cols in 1u64..40,
        chunk_rows in 1usize..8,
        block_len in 1usize..100,
        seed in any::<u64>(),
    ) {
        let n = (rows * cols) as usize;
        let mut x = seed | 1;
        let vals: Vec<u32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Normal exponents only (1..=254), any sign and mantissa.
                let e = 1 + (x >> 20) as u32 % 254;
                pack(FloatFormat::BF16, x & 1 == 1, e, (x >> 8) as u32 & 0x7F)
            })
            .collect();
        let c = Case {
            format: FloatFormat::BF16,
            shape: vec![rows, cols],
            values: vals,
            opts: EncodeOptions {
                base: BaseKind::Bitplane,
                draft_mantissa_bits: d,
                chunk_rows,
                block_len,
                ..EncodeOptions::default()
            },
        };
        run_case(&c)?;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jd");
        let data = to_bytes(c.format, &c.values);
        write_one(&path, &c, &data).unwrap();
        let jd = JdFile::open(&path).unwrap();
        let draft = jd.tensor("t").unwrap().decode_draft(DraftDtype::F32).unwrap();
        check_bf16_bucket(&data, &draft, d)?;
    }

    /// Several tensors of every dtype (float and not) in several shards of one file.
    #[test]
    fn mixed_file_roundtrips(
        tensors in vec(
            prop_oneof![
                3 => case(FORMATS.to_vec()).prop_map(|c| {
                    let data = to_bytes(c.format, &c.values);
                    (c.format.dtype_name().to_string(), c.shape, data, Some(c.opts))
                }),
                1 => (
                    select(vec!["I64", "U8", "BOOL", "I32", "U16", "F64", "I8", "U64"]),
                    shape(),
                )
                    .prop_flat_map(|(dtype, shape)| {
                        let size = match dtype {
                            "U8" | "BOOL" | "I8" => 1,
                            "U16" => 2,
                            "I32" => 4,
                            _ => 8,
                        };
                        let n = shape.iter().product::<u64>() as usize * size;
                        (Just(dtype.to_string()), Just(shape), vec(any::<u8>(), n), Just(None))
                    }),
            ],
            1..6,
        ),
        shards in 1u32..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jd");
        let mut w = JdWriter::create(&path).unwrap();
        for s in 0..shards {
            let meta = (s % 2 == 0).then(|| {
                std::iter::once(("format".to_string(), format!("pt{s}"))).collect()
            });
            w.add_shard(&format!("model-{s}.safetensors"), meta);
        }
        for (i, (dtype, shape, data, opts)) in tensors.iter().enumerate() {
            let opts = opts.clone().unwrap_or_default();
            w.add_tensor(&format!("t{i}"), dtype, shape, i as u32 % shards, data, &opts)
                .map_err(|e| TestCaseError::fail(format!("t{i}: {e}")))?;
        }
        w.add_file("config.json", b"{\"a\": 1}").unwrap();
        w.finish().unwrap();
        let jd = JdFile::open(&path).unwrap();
        prop_assert_eq!(jd.index().shards.len(), shards as usize);
        prop_assert_eq!(jd.tensor_names().count(), tensors.len());
        for (i, (dtype, shape, data, _)) in tensors.iter().enumerate() {
            prop_assert_eq!(jd.index().tensors[i].shard, i as u32 % shards);
            check_tensor(&jd, &format!("t{i}"), dtype, shape, data)?;
        }
        prop_assert_eq!(jd.aux_file("config.json").unwrap().unwrap(), b"{\"a\": 1}".to_vec());
        prop_assert!(jd.aux_file("missing.json").unwrap().is_none());
        prop_assert!(matches!(jd.tensor("nope"), Err(Error::TensorNotFound(_))));
    }
}

// ---------------------------------------------------------------------------------------------
// API contracts (deterministic)

fn writer(dir: &Path) -> (JdWriter, u32) {
    let mut w = JdWriter::create(dir.join("x.jd")).unwrap();
    let s = w.add_shard("model.safetensors", None);
    (w, s)
}

#[test]
fn draft_bits_out_of_range_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for f in FORMATS {
        let (mut w, s) = writer(dir.path());
        let data = vec![0u8; 4 * 3 * f.bytes()];
        for d in [f.mantissa_bits(), f.mantissa_bits() + 1, 1000] {
            for base in [BaseKind::Bitplane, BaseKind::Affine, BaseKind::Auto] {
                let opts = EncodeOptions {
                    base,
                    draft_mantissa_bits: d,
                    ..EncodeOptions::default()
                };
                let r = w.add_tensor("w", f.dtype_name(), &[4, 3], s, &data, &opts);
                assert!(
                    matches!(r, Err(Error::InvalidOption(_))),
                    "{f:?} d={d} {base:?}: {r:?}"
                );
            }
        }
        // A valid tensor still goes in afterwards.
        w.add_tensor(
            "w",
            f.dtype_name(),
            &[4, 3],
            s,
            &data,
            &EncodeOptions::default(),
        )
        .unwrap();
        w.finish().unwrap();
        let jd = JdFile::open(dir.path().join("x.jd")).unwrap();
        let view = jd.tensor("w").unwrap();
        assert_eq!(view.decode_exact().unwrap(), data);
        assert!(view.to_resident(f.mantissa_bits()).is_err());
    }
}

#[test]
fn writer_rejects_bad_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, s) = writer(dir.path());
    let o = EncodeOptions::default();
    // Data length must match dtype x shape.
    assert!(matches!(
        w.add_tensor("a", "BF16", &[2, 3], s, &[0u8; 11], &o),
        Err(Error::BufferSize {
            expected: 12,
            got: 11
        })
    ));
    // Undeclared shard.
    assert!(matches!(
        w.add_tensor("a", "BF16", &[2, 3], s + 1, &[0u8; 12], &o),
        Err(Error::InvalidOption(_))
    ));
    // Unknown dtype.
    assert!(w.add_tensor("a", "F128", &[2], s, &[0u8; 32], &o).is_err());
    // Zero sizes in the options.
    for bad in [
        EncodeOptions {
            chunk_rows: 0,
            ..o.clone()
        },
        EncodeOptions {
            group_size: 0,
            ..o.clone()
        },
        EncodeOptions {
            block_len: 0,
            ..o.clone()
        },
    ] {
        assert!(matches!(
            w.add_tensor("a", "BF16", &[2, 3], s, &[0u8; 12], &bad),
            Err(Error::InvalidOption(_))
        ));
    }
    w.add_tensor("a", "BF16", &[2, 3], s, &[0u8; 12], &o)
        .unwrap();
    // Twice the same name.
    assert!(matches!(
        w.add_tensor("a", "BF16", &[2, 3], s, &[0u8; 12], &o),
        Err(Error::InvalidOption(_))
    ));
    w.finish().unwrap();
}

/// A whole-tensor chunk (`chunk_rows` larger than any tensor) is a legitimate option value.
#[test]
fn huge_chunk_rows_option_roundtrips() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..6 * 5 * 2).map(|i| (i * 37 % 251) as u8).collect();
    for chunk_rows in [1usize << 40, usize::MAX / 2, usize::MAX] {
        let path = dir.path().join("big-chunks.jd");
        let mut w = JdWriter::create(&path).unwrap();
        let s = w.add_shard("m.safetensors", None);
        let opts = EncodeOptions {
            chunk_rows,
            base: BaseKind::Bitplane,
            ..EncodeOptions::default()
        };
        match w.add_tensor("w", "BF16", &[6, 5], s, &data, &opts) {
            Err(Error::InvalidOption(_)) => continue,
            Err(e) => panic!("chunk_rows {chunk_rows}: unexpected error {e}"),
            Ok(()) => {}
        }
        w.finish().unwrap();
        let jd = JdFile::open(&path).unwrap();
        let view = jd.tensor("w").unwrap();
        assert_eq!(
            view.decode_exact().unwrap(),
            data,
            "chunk_rows {chunk_rows}"
        );
        let r = view.to_resident(3).unwrap();
        let mut out = vec![0u8; data.len()];
        r.decode_exact(&mut out).unwrap();
        assert_eq!(out, data);
    }
}

/// Encoding is a function of its input: the same tensors give the same file bytes.
#[test]
fn encoding_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..37u32 * 29 * 2)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut files = Vec::new();
    for k in 0..2 {
        let path = dir.path().join(format!("d{k}.jd"));
        let mut w = JdWriter::create(&path).unwrap();
        let s = w.add_shard("m.safetensors", None);
        for (i, base) in [BaseKind::Bitplane, BaseKind::Affine, BaseKind::Auto]
            .into_iter()
            .enumerate()
        {
            let opts = EncodeOptions {
                base,
                chunk_rows: 3,
                block_len: 17,
                group_size: 7,
                ..EncodeOptions::default()
            };
            w.add_tensor(&format!("w{i}"), "BF16", &[37, 29], s, &data, &opts)
                .unwrap();
        }
        w.finish().unwrap();
        files.push(std::fs::read(&path).unwrap());
    }
    assert_eq!(files[0], files[1]);
}

/// Every 16-bit pattern in one tensor, for both 16-bit formats, every base kind and every
/// draft precision: an exhaustive complement to the sampled properties.
#[test]
fn every_16_bit_pattern_roundtrips() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<u32> = (0..=u16::MAX as u32).collect();
    for f in [FloatFormat::BF16, FloatFormat::F16] {
        let data = to_bytes(f, &values);
        for base in [BaseKind::Bitplane, BaseKind::Affine] {
            for d in [0, 3, f.mantissa_bits() - 1] {
                let c = Case {
                    format: f,
                    shape: vec![256, 256],
                    values: Vec::new(),
                    opts: EncodeOptions {
                        base,
                        draft_mantissa_bits: d,
                        chunk_rows: 61,
                        block_len: 1000,
                        group_size: 33,
                        ..EncodeOptions::default()
                    },
                };
                let path = dir.path().join("all.jd");
                write_one(&path, &c, &data).unwrap();
                let jd = JdFile::open(&path).unwrap();
                let view = jd.tensor("t").unwrap();
                assert!(view.decode_exact().unwrap() == data, "{f:?} {base:?} d={d}");
                if base == BaseKind::Bitplane {
                    let draft = view.decode_draft(DraftDtype::F32).unwrap();
                    assert!(draft == expected_draft(f, &data, d, DraftDtype::F32));
                }
                let r = view.to_resident(d).unwrap();
                let mut out = vec![0u8; data.len()];
                r.decode_exact(&mut out).unwrap();
                assert!(out == data, "{f:?} {base:?} resident d={d}");
            }
        }
    }
}
