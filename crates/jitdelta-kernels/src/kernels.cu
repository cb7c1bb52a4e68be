// jitdelta kernels over the device layout (crates/jitdelta-kernels/src/device_layout.rs): BF16
// weights as three 4-bit planes P (code low bit + 3 mantissa bits), S (sign + code >> 1, two
// values a byte) and L (4 low mantissa bits), 16-byte aligned segments per chunk of rows.
// Weights are built *scaled*, with exponent 112 + code; a GEMV rescales each row's sum by
// 2^(base - 112), a decode adds (base - 112) << 7 back. Escapes (exponent outside the window,
// and 0 / 255 inside it) hold code 0 and are corrected from a per-chunk CSR list.
// Compiled at run time with NVRTC, after pdl.cuh.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define MODE_EXACT 0
#define MODE_DRAFT 1
#define MODE_ROUTED 2
#define SCALED_EXPONENT 112

// 8 values (one 32-bit word of each plane) as 4 words of two scaled BF16: (v0, v1), (v2, v3),
// (v4, v5), (v6, v7). Byte 0 of a BF16 is P << 4 | L, byte 1 is sign | (112 + code) >> 1.
__device__ __forceinline__ void decode8(u32 p, u32 s, u32 l, bool exact, u32 out[4]) {
    const u32 hi_nibbles = 0xF0F0F0F0u, lo_nibbles = 0x0F0F0F0Fu, mid = 0x08080808u;
    const u32 b0_lo = ((p << 4) & hi_nibbles) | (exact ? (l & lo_nibbles) : mid);
    const u32 b0_hi = (p & hi_nibbles) | (exact ? ((l >> 4) & lo_nibbles) : mid);
    const u32 b1_lo = (s & 0x87878787u) | 0x38383838u;
    const u32 b1_hi = ((s << 1) & 0x80808080u) | ((s >> 3) & 0x07070707u) | 0x38383838u;
    out[0] = __byte_perm(b0_lo, b1_lo, 0x5140);
    out[1] = __byte_perm(b0_lo, b1_lo, 0x7362);
    out[2] = __byte_perm(b0_hi, b1_hi, 0x5140);
    out[3] = __byte_perm(b0_hi, b1_hi, 0x7362);
}

// Value i of a chunk whose segments start at `at`: sign, code, top 3 and low 4 mantissa bits.
struct Fields {
    u32 sign, code, m3, l4;
};

__device__ __forceinline__ Fields fields_at(const u8* P, const u8* S, const u8* L, u64 at, u32 i) {
    const u32 group = i >> 3, v = i & 7u;
    const u32 q = group * 8 + (v < 4 ? 2 * v : 2 * (v - 4) + 1);
    const u32 p = (P[at + q / 2] >> ((q & 1u) * 4)) & 15u;
    const u32 l = (L[at + q / 2] >> ((q & 1u) * 4)) & 15u;
    const u32 sb = S[at + group * 4 + (v & 3u)];
    Fields f;
    f.sign = v < 4 ? sb >> 7 : (sb >> 6) & 1u;
    f.code = ((v < 4 ? sb : sb >> 3) & 7u) << 1 | p >> 3;
    f.m3 = p & 7u;
    f.l4 = l;
    return f;
}

// A weight's BF16 bits for an explicit exponent; a draft gets the bucket midpoint except for
// exponents 0 and 255 (same rule as the CPU decoder).
__device__ __forceinline__ u32 bf16_bits(Fields f, u32 e, bool exact) {
    const u32 lo = exact ? f.l4 : ((e != 0u && e != 0xFFu) ? 8u : 0u);
    return f.sign << 15 | e << 7 | f.m3 << 4 | lo;
}

__device__ __forceinline__ float bf16_to_f32(u32 b) { return __uint_as_float(b << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ bool chunk_is_exact(int mode, const u8* routed, u32 chunk) {
    return mode == MODE_EXACT || (mode == MODE_ROUTED && routed[chunk] != 0);
}

// Scaled pair of BF16 (one 16-bit lane each) to the true bits: exponent += base - 112.
__device__ __forceinline__ u32 rebase(u32 v, int delta) {
    const u32 mag = v & 0x7FFF7FFFu, sign = v & 0x80008000u;
    const u32 d = (u32)(delta < 0 ? -delta : delta) * 0x00800080u;
    return (delta < 0 ? mag - d : mag + d) | sign;
}

// Words of each plane (8 values each) a thread of the decode takes (-DDECODE_WORDS=n; the host
// reads the same define): more loads in flight per thread, fewer threads. A warp takes
// 32 * DECODE_WORDS consecutive words of a chunk, lane t words t, t + 32, .., so every load and
// store instruction of the warp stays contiguous (a thread's words side by side made every
// store strided: 20-27% of copy bandwidth). H100, same call: 1 word 46-51%, 2 words 50-53%,
// 4 words 46-51% (docs/benchmarks.md, session 9).
#ifndef DECODE_WORDS
#define DECODE_WORDS 2
#endif

// Decode to BF16 in global memory (the prefill path). One 16-byte store per word; the grid's
// x * y covers every chunk's warps. Escapes are written afterwards by jd_patch_escapes. Under a
// dependent launch (pdl.cuh) the planes load before the wait and the escape kernel launches
// while this one runs (4096 x 4096, one word a thread: 43% of copy bandwidth as two plain
// launches, 49% so).
extern "C" __global__ void __launch_bounds__(256)
jd_decode_bf16(const u8* __restrict__ P, const u8* __restrict__ S, const u8* __restrict__ L,
               const u8* __restrict__ bases, const u8* __restrict__ routed, int mode,
               u32 rows, u32 cols, u32 chunk_rows, u64 segment, u16* __restrict__ out) {
    const u64 full = (u64)chunk_rows * cols;
    const u64 warps_per_chunk = ((full + 7) / 8 + 32 * DECODE_WORDS - 1) / (32 * DECODE_WORDS);
    const u32 chunks = (rows + chunk_rows - 1) / chunk_rows;
    const u64 u = (u64)blockIdx.y * gridDim.x * blockDim.x + (u64)blockIdx.x * blockDim.x + threadIdx.x;
    pdl_launch_dependents();
    // The routing flags come from a host copy; waiting is conservative (as in the GEMV).
    if (mode == MODE_ROUTED) pdl_wait();
    const u64 warp = u / 32;
    if (warp >= warps_per_chunk * chunks) return;
    const u32 c = (u32)(warp / warps_per_chunk);
    const u64 first = ((warp - (u64)c * warps_per_chunk) * 32 * DECODE_WORDS + (u % 32)) * 8;
    const u64 n = (u64)min((u64)chunk_rows, (u64)rows - (u64)c * chunk_rows) * cols;
    const bool exact = chunk_is_exact(mode, routed, c);
    const u64 at = (u64)c * segment + first / 2;
    const int delta = (int)bases[c] - SCALED_EXPONENT;
    u32 p[DECODE_WORDS], s[DECODE_WORDS], l[DECODE_WORDS];
#pragma unroll
    for (int w = 0; w < DECODE_WORDS; ++w) {
        // Word w is 32 words (128 bytes of a plane) after word w - 1.
        const bool in = first + 256 * w < n;
        p[w] = in ? __ldg(reinterpret_cast<const u32*>(P + at + 128 * w)) : 0u;
        s[w] = in ? __ldg(reinterpret_cast<const u32*>(S + at + 128 * w)) : 0u;
        l[w] = in && exact ? __ldg(reinterpret_cast<const u32*>(L + at + 128 * w)) : 0u;
    }
    u32 v[DECODE_WORDS][4];
#pragma unroll
    for (int w = 0; w < DECODE_WORDS; ++w) {
        decode8(p[w], s[w], l[w], exact, v[w]);
#pragma unroll
        for (int k = 0; k < 4; ++k) v[w][k] = rebase(v[w][k], delta);
    }
    pdl_wait();
#pragma unroll
    for (int w = 0; w < DECODE_WORDS; ++w) {
        const u64 f = first + 256 * w;
        if (f >= n) break;
        u16* dst = out + (u64)c * full + f;
        if (f + 8 <= n && (((u64)c * full + f) & 7u) == 0) {
            *reinterpret_cast<uint4*>(dst) = make_uint4(v[w][0], v[w][1], v[w][2], v[w][3]);
        } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (f + 2 * q < n) dst[2 * q] = (u16)v[w][q];
                if (f + 2 * q + 1 < n) dst[2 * q + 1] = (u16)(v[w][q] >> 16);
            }
        }
    }
}

// One thread per escape: the true value (exact or draft per chunk) over the decoded placeholder
// (launched dependently, it waits for the decode before it writes).
// Chunks are contiguous runs of chunk_rows * cols values, so an escape's chunk is its position
// divided by that.
extern "C" __global__ void __launch_bounds__(256)
jd_patch_escapes(const u8* __restrict__ P, const u8* __restrict__ S, const u8* __restrict__ L,
                 const u32* __restrict__ esc_pos, const u8* __restrict__ esc_exp, u32 escapes,
                 const u8* __restrict__ routed, int mode,
                 u32 cols, u32 chunk_rows, u64 segment, u16* __restrict__ out) {
    const u32 e = blockIdx.x * blockDim.x + threadIdx.x;
    pdl_launch_dependents();
    if (mode == MODE_ROUTED) pdl_wait();
    if (e >= escapes) return;
    const u64 pos = esc_pos[e], per_chunk = (u64)chunk_rows * cols;
    const u32 c = (u32)(pos / per_chunk);
    const Fields f = fields_at(P, S, L, (u64)c * segment, (u32)(pos - (u64)c * per_chunk));
    const u32 bits = bf16_bits(f, esc_exp[e], chunk_is_exact(mode, routed, c));
    // Over the decode's placeholder: after it.
    pdl_wait();
    out[pos] = (u16)bits;
}

__device__ __forceinline__ void mma_bf16_16816(float d[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Tuning knobs: warps per block (-DGEMV_WARPS=n; the host reads it from the same define).
#ifndef GEMV_WARPS
#define GEMV_WARPS 8
#endif
#define TILE_ROWS 16
#define MAX_BATCH 8
// Blocks per SM the register allocation must allow (-DGEMV_MIN_BLOCKS=n). 2 caps the
// registers at 96 (a few bytes spill) and doubles the warps in flight: +5-15% on H100, most
// at batch 8 and for the draft (docs/benchmarks.md).
#ifndef GEMV_MIN_BLOCKS
#define GEMV_MIN_BLOCKS 2
#endif

// A warp's step: 256 columns of its two rows, 64 a lane (two 16-byte vectors per plane and
// row). Loading the next step before decoding this one (a software pipeline) was slower: the
// registers for two steps spilled (docs/benchmarks.md, `PREFETCH=1`: exact 0.84-0.97x).
#define LANE_VECS 2
#define STEP_COLS (128 * LANE_VECS)

// One lane's loads for one step: 32 * LANE_VECS values of rows a and b in each plane, and the
// matching activations.
struct StepData {
    uint4 pa[LANE_VECS], sa[LANE_VECS], la[LANE_VECS], pb[LANE_VECS], sb[LANE_VECS], lb[LANE_VECS];
    uint4 x[4 * LANE_VECS];
};

// The 4 activation vectors of one lane's 32 columns from column c (zeros when `present` is
// false: past the end, or a lane without an activation row).
__device__ __forceinline__ void load_x(uint4* x, const u16* __restrict__ xrow, bool present, u32 c) {
#pragma unroll
    for (int q = 0; q < 4; ++q)
        x[q] = present ? __ldg(reinterpret_cast<const uint4*>(xrow + c) + q) : make_uint4(0, 0, 0, 0);
}

// The activations of a step whose planes are loaded (see load_step).
__device__ __forceinline__ void load_step_x(StepData& d, const u16* __restrict__ xrow, bool has_x, u32 cols,
                                            u32 col) {
#pragma unroll
    for (int j = 0; j < LANE_VECS; ++j) load_x(d.x + 4 * j, xrow, col + 32 * j < cols && has_x, col + 32 * j);
}

// The planes of a step (weights only: safe before pdl_wait()).
__device__ __forceinline__ StepData load_planes(const u8* __restrict__ P, const u8* __restrict__ S,
                                                const u8* __restrict__ L, u64 row_a, u64 row_b,
                                                bool va, bool vb, bool ea, bool eb, u32 cols, u32 col) {
    const uint4 z = make_uint4(0, 0, 0, 0);
    StepData d;
#pragma unroll
    for (int j = 0; j < LANE_VECS; ++j) {
        // Lane tig covers columns [64 tig, 64 tig + 64) of the step: vector j of the 4 lanes of
        // a row then touches every sector of the row's 128-byte line (one request per line; the
        // other half of each sector hits L1 for the next vector), measurably faster than two
        // 64-byte requests.
        const u32 c = col + 32 * j;
        const bool in = c < cols;
        const u64 oa = row_a + c / 2, ob = row_b + c / 2;
        d.pa[j] = (in && va) ? __ldg(reinterpret_cast<const uint4*>(P + oa)) : z;
        d.sa[j] = (in && va) ? __ldg(reinterpret_cast<const uint4*>(S + oa)) : z;
        d.la[j] = (in && ea) ? __ldg(reinterpret_cast<const uint4*>(L + oa)) : z;
        d.pb[j] = (in && vb) ? __ldg(reinterpret_cast<const uint4*>(P + ob)) : z;
        d.sb[j] = (in && vb) ? __ldg(reinterpret_cast<const uint4*>(S + ob)) : z;
        d.lb[j] = (in && eb) ? __ldg(reinterpret_cast<const uint4*>(L + ob)) : z;
    }
    return d;
}

__device__ __forceinline__ StepData load_step(const u8* __restrict__ P, const u8* __restrict__ S,
                                              const u8* __restrict__ L, u64 row_a, u64 row_b,
                                              bool va, bool vb, bool ea, bool eb,
                                              const u16* __restrict__ xrow, bool has_x, u32 cols, u32 col) {
    StepData d = load_planes(P, S, L, row_a, row_b, va, vb, ea, eb, cols, col);
    load_step_x(d, xrow, has_x, cols, col);
    return d;
}

// Decodes one step's values of both rows into A fragments and multiplies.
__device__ __forceinline__ void step_mma(const StepData& d, bool ea, bool eb, float acc[4]) {
#pragma unroll
    for (int j = 0; j < LANE_VECS; ++j) {
        const u32 pA[4] = {d.pa[j].x, d.pa[j].y, d.pa[j].z, d.pa[j].w}, sA[4] = {d.sa[j].x, d.sa[j].y, d.sa[j].z, d.sa[j].w};
        const u32 lA[4] = {d.la[j].x, d.la[j].y, d.la[j].z, d.la[j].w};
        const u32 pB[4] = {d.pb[j].x, d.pb[j].y, d.pb[j].z, d.pb[j].w}, sB[4] = {d.sb[j].x, d.sb[j].y, d.sb[j].z, d.sb[j].w};
        const u32 lB[4] = {d.lb[j].x, d.lb[j].y, d.lb[j].z, d.lb[j].w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            u32 qa[4], qb[4];
            decode8(pA[w], sA[w], lA[w], ea, qa);
            decode8(pB[w], sB[w], lB[w], eb, qb);
            // Word w covers 8 consecutive columns, whose activations are the 16-byte x vector
            // w of this step (pairs of consecutive columns, as the decoded pairs).
            const uint4 xv = d.x[4 * j + w];
            const u32 xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 a[4] = {qa[2 * h], qb[2 * h], qa[2 * h + 1], qb[2 * h + 1]};
                const u32 b[2] = {xs[2 * h], xs[2 * h + 1]};
                mma_bf16_16816(acc, a, b);
            }
        }
    }
}

// Tuning knob: -DGEMV_STAGES=n (n >= 2) streams the planes through a per-warp ring of n steps
// in shared memory with cp.async instead of registers: n steps of loads in flight per warp at
// little register cost, and the copies are shaped for DRAM (each instruction moves 4 whole
// 128-byte row lines per plane) independently of the mma fragment layout. The host sizes the
// dynamic shared memory from the same define. 0 = load into registers.
#ifndef GEMV_STAGES
#define GEMV_STAGES 0
#endif
#if GEMV_STAGES
// A stage of one warp: [plane P, S, L][row 0..15][8 chunks of 16 bytes], chunk c of row r
// stored at c ^ (r & 7) so the fragment reads (rows g and g + 8, chunks 2 tig + j) are free
// of bank conflicts.
#define STAGE_CHUNKS (3 * TILE_ROWS * 8)

__device__ __forceinline__ void cp_async16(uint4* dst, const void* src, bool fill) {
    const u32 to = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(src), "r"(fill ? 16 : 0));
}

// The 4 rows this lane copies (rows 4 i + lane / 8 of the tile): byte offset of the row in a
// plane, whether it exists and whether its chunk is exact.
struct CopyRows {
    u64 at[4];
    bool valid[4], exact[4];
};

__device__ __forceinline__ CopyRows copy_rows(u32 r0, u32 lane, u32 rows, u32 cols, u32 chunk_rows,
                                              u64 segment, int mode, const u8* __restrict__ routed) {
    CopyRows c;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 r = r0 + 4 * i + lane / 8;
        const u32 ch = r < rows ? r / chunk_rows : 0u;
        c.valid[i] = r < rows;
        c.exact[i] = c.valid[i] && chunk_is_exact(mode, routed, ch);
        c.at[i] = (u64)ch * segment + (u64)(r - ch * chunk_rows) * (cols / 2);
    }
    return c;
}

// Copies step `s` (256 columns) of the tile into `stage`: lane copies chunk lane % 8 of rows
// 4 i + lane / 8, i = 0..3, of each plane (L only for exact rows).
__device__ __forceinline__ void issue_step(uint4* stage, u32 lane, const CopyRows& rows,
                                           const u8* __restrict__ P, const u8* __restrict__ S,
                                           const u8* __restrict__ L, u32 cols, u32 s) {
    const u32 chunk = lane & 7u;
    const bool in = s * STEP_COLS + chunk * 32 < cols;
    const u64 col_byte = (u64)s * (STEP_COLS / 2) + chunk * 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 r = 4 * i + lane / 8;
        const u32 slot = r * 8 + (chunk ^ (r & 7u));
        const bool fill = in && rows.valid[i];
        const u64 at = fill ? rows.at[i] + col_byte : 0;
        cp_async16(stage + slot, P + at, fill);
        cp_async16(stage + TILE_ROWS * 8 + slot, S + at, fill);
        if (rows.exact[i]) cp_async16(stage + 2 * TILE_ROWS * 8 + slot, L + at, in);
    }
}

// This lane's fragment data of a stage (rows g and g + 8, chunks 2 tig + j) and activations.
__device__ __forceinline__ StepData read_step(const uint4* stage, u32 g, u32 tig, bool ea, bool eb,
                                              const u16* __restrict__ xrow, bool has_x, u32 cols, u32 col) {
    const uint4 z = make_uint4(0, 0, 0, 0);
    StepData d;
#pragma unroll
    for (int j = 0; j < LANE_VECS; ++j) {
        const u32 c = col + 32 * j;
        load_x(d.x + 4 * j, xrow, c < cols && has_x, c);
        const u32 sa = g * 8 + ((2 * tig + j) ^ g), sb = sa + 8 * 8;
        d.pa[j] = stage[sa];
        d.sa[j] = stage[TILE_ROWS * 8 + sa];
        d.la[j] = ea ? stage[2 * TILE_ROWS * 8 + sa] : z;
        d.pb[j] = stage[sb];
        d.sb[j] = stage[TILE_ROWS * 8 + sb];
        d.lb[j] = eb ? stage[2 * TILE_ROWS * 8 + sb] : z;
    }
    return d;
}
#endif

// Escapes a lane holds per pass of escape_corrections (ESC_PASS = 32 * ESC_PER_LANE a pass),
// and activation rows it loads per memory round trip (ESC_X_ROWS): a pass costs one round trip
// per ESC_X_ROWS batch rows, so the knobs trade registers for round trips per tile.
#ifndef ESC_PER_LANE
#define ESC_PER_LANE 8
#endif
#ifndef ESC_X_ROWS
#define ESC_X_ROWS 4
#endif
#define ESC_PASS (32 * ESC_PER_LANE)

// The list entries of one pass from entry `at`: positions and both corrections.
__device__ __forceinline__ void load_escapes(const u32* __restrict__ esc_pos, const float2* __restrict__ esc_corr,
                                             u32 at, u32 last, u32 lane, u32 pos[ESC_PER_LANE],
                                             float2 c[ESC_PER_LANE]) {
#pragma unroll
    for (int u = 0; u < ESC_PER_LANE; ++u) {
        const u32 e = at + u * 32 + lane;
        pos[u] = e < last ? esc_pos[e] : 0u;
        c[u] = e < last ? esc_corr[e] : make_float2(0.f, 0.f);
    }
}

// Escape corrections of one 16-row tile, by one warp while the others stream the planes: the
// GEMV multiplied each escape's scaled placeholder (code 0), so add corr * x per escape, with
// corr precomputed at upload (exact or draft per chunk). The tile's escapes (a CSR run, in row
// order) go in passes of ESC_PASS: every lane computes its entries' products into shared
// memory, then lane r (< 16) adds its own row's products in list order, so a (row, batch) sum
// is the same for every batch size and every call. The list is weights-side data, so the first
// pass's entries load before pdl_wait() and each next pass's with this pass's activations; a
// pass then waits for its activations alone. An LM head holds ~1% escapes (SmolLM2's embedding:
// ~760 a tile), which made this warp the tile's critical path at 64 entries a pass.
__device__ __forceinline__ void escape_corrections(
        const u32* __restrict__ esc_row_start, const u32* __restrict__ esc_pos,
        const float2* __restrict__ esc_corr, const u8* __restrict__ routed, int mode,
        u32 rows, u32 cols, u32 chunk_rows, u32 r0, const u16* __restrict__ x, u32 batch,
        u32 lane, float (*corr)[MAX_BATCH]) {
    // Rows padded by one float: the stores of lanes 4 apart fall in different banks.
    __shared__ float prod[ESC_PASS][MAX_BATCH + 1];
    const u32 first = esc_row_start[r0], last = esc_row_start[min(r0 + TILE_ROWS, rows)];
    // Lane r's own row: entries row_first..row_last of the list.
    u32 row_first = 0, row_last = 0;
    if (lane < TILE_ROWS && r0 + lane < rows) {
        row_first = esc_row_start[r0 + lane];
        row_last = esc_row_start[r0 + lane + 1];
    }
    float mine[MAX_BATCH];
#pragma unroll
    for (int b = 0; b < MAX_BATCH; ++b) mine[b] = 0.f;
    u32 pos[ESC_PER_LANE];
    float2 c[ESC_PER_LANE];
    load_escapes(esc_pos, esc_corr, first, last, lane, pos, c);
    // The activations belong to the previous kernel.
    pdl_wait();
    for (u32 at = first; at < last; at += ESC_PASS) {
        u32 next_pos[ESC_PER_LANE];
        float2 next_c[ESC_PER_LANE];
        load_escapes(esc_pos, esc_corr, at + ESC_PASS, last, lane, next_pos, next_c);
        float w[ESC_PER_LANE];
        u32 col[ESC_PER_LANE];
#pragma unroll
        for (int u = 0; u < ESC_PER_LANE; ++u) {
            const u32 row = pos[u] / cols;
            w[u] = chunk_is_exact(mode, routed, row / chunk_rows) ? c[u].x : c[u].y;
            col[u] = pos[u] - row * cols;
        }
        for (u32 b0 = 0; b0 < batch; b0 += ESC_X_ROWS) {
            // All of this slice's activations are requested before any product is formed.
            u32 xb[ESC_PER_LANE][ESC_X_ROWS];
#pragma unroll
            for (int u = 0; u < ESC_PER_LANE; ++u) {
                const bool in = at + u * 32 + lane < last;
#pragma unroll
                for (int j = 0; j < ESC_X_ROWS; ++j)
                    xb[u][j] = (in && b0 + j < batch) ? (u32)__ldg(x + (u64)(b0 + j) * cols + col[u]) : 0u;
            }
#pragma unroll
            for (int u = 0; u < ESC_PER_LANE; ++u) {
#pragma unroll
                for (int j = 0; j < ESC_X_ROWS; ++j)
                    if (b0 + j < batch) prod[u * 32 + lane][b0 + j] = w[u] * bf16_to_f32(xb[u][j]);
            }
        }
#pragma unroll
        for (int u = 0; u < ESC_PER_LANE; ++u) {
            pos[u] = next_pos[u];
            c[u] = next_c[u];
        }
        __syncwarp();
        const u32 lo = max(row_first, at), hi = min(row_last, at + ESC_PASS);
        for (u32 k = lo; k < hi; ++k) {
#pragma unroll
            for (int b = 0; b < MAX_BATCH; ++b) mine[b] += prod[k - at][b];
        }
        __syncwarp();
    }
    if (lane < TILE_ROWS) {
#pragma unroll
        for (int b = 0; b < MAX_BATCH; ++b) corr[lane][b] = mine[b];
    }
}

// Fused decode + GEMV/GEMM for 1..8 activation rows: y[b][r] = sum_k W[r][k] x[b][k].
// A block owns 16 weight rows; its GEMV_WARPS warps split the columns and one more warp
// computes the escape corrections. Each lane decodes 32 values of two rows (g and g + 8) per
// step straight into mma.m16n8k16 A fragments (consecutive column pairs, so the activations
// load as they are), so decoded weights never leave registers and the tensor cores multiply
// for every batch size up to 8. Requires cols % 32 == 0.
#define GEMV_PARAMS                                                                              \
    const u8 *__restrict__ P, const u8 *__restrict__ S, const u8 *__restrict__ L,                \
        const u8 *__restrict__ bases, const u8 *__restrict__ routed, int mode, u32 rows, u32 cols, \
        u32 chunk_rows, u64 segment, const u32 *__restrict__ esc_row_start,                      \
        const u32 *__restrict__ esc_pos, const float2 *__restrict__ esc_corr,                    \
        const u16 *__restrict__ x, u32 batch, u16 *__restrict__ y
#define GEMV_ARGS(mode) \
    P, S, L, bases, routed, mode, rows, cols, chunk_rows, segment, esc_row_start, esc_pos, esc_corr, x, batch, y

// The 16-row tile at row r0 (every block of the single-tensor kernels: r0 = 16 * blockIdx.x).
__device__ __forceinline__ void gemv_body(GEMV_PARAMS, u32 r0) {
    __shared__ float partial[GEMV_WARPS][TILE_ROWS][MAX_BATCH];
    __shared__ float corr[TILE_ROWS][MAX_BATCH];
    __shared__ int rescale[TILE_ROWS];
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    // Under a dependent launch (pdl.cuh), only weights are read before pdl_wait(): x and y
    // belong to earlier kernels, and so, to be safe, do the routing flags (copied in just
    // before the launch).
    pdl_launch_dependents();
    if (mode == MODE_ROUTED) pdl_wait();
    if (warp == GEMV_WARPS) {
        // The rows' exponent shifts, fetched while the planes stream rather than after the
        // block's final barrier (a dependent DRAM round trip at the tail of every block).
        if (lane < TILE_ROWS)
            rescale[lane] = r0 + lane < rows ? (int)bases[(r0 + lane) / chunk_rows] - SCALED_EXPONENT : 0;
        escape_corrections(esc_row_start, esc_pos, esc_corr, routed, mode, rows, cols, chunk_rows,
                           r0, x, batch, lane, corr);
    } else {
        const u32 g = lane >> 2, tig = lane & 3u;
        const u32 ra = r0 + g, rb = r0 + g + 8;
        const bool va = ra < rows, vb = rb < rows;
        const u32 ca = va ? ra / chunk_rows : 0u, cb = vb ? rb / chunk_rows : 0u;
        const bool ea = va && chunk_is_exact(mode, routed, ca), eb = vb && chunk_is_exact(mode, routed, cb);
        const u64 row_a = (u64)ca * segment + (u64)(ra - ca * chunk_rows) * (cols / 2);
        const u64 row_b = (u64)cb * segment + (u64)(rb - cb * chunk_rows) * (cols / 2);
        const bool has_x = g < batch;
        const u16* xrow = x + (u64)(has_x ? g : 0u) * cols;

        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        const u32 steps = (cols + STEP_COLS - 1) / STEP_COLS;
        // A padded row (beyond `rows`) decodes zero planes to small finite values; its output
        // is never stored.
#if GEMV_STAGES
        extern __shared__ uint4 ring[];  // [warp][stage][STAGE_CHUNKS]
        uint4* mine = ring + (u64)warp * GEMV_STAGES * STAGE_CHUNKS;
        const CopyRows copy = copy_rows(r0, lane, rows, cols, chunk_rows, segment, mode, routed);
        const u32 n = warp < steps ? (steps - warp + GEMV_WARPS - 1) / GEMV_WARPS : 0u;
#pragma unroll
        for (u32 i = 0; i + 1 < GEMV_STAGES; ++i) {
            if (i < n) issue_step(mine + i * STAGE_CHUNKS, lane, copy, P, S, L, cols, warp + i * GEMV_WARPS);
            asm volatile("cp.async.commit_group;\n");
        }
        // The ring's first steps stream while the previous kernel finishes.
        pdl_wait();
        for (u32 i = 0; i < n; ++i) {
            const u32 ahead = i + GEMV_STAGES - 1;
            if (ahead < n)
                issue_step(mine + (ahead % GEMV_STAGES) * STAGE_CHUNKS, lane, copy, P, S, L, cols,
                           warp + ahead * GEMV_WARPS);
            asm volatile("cp.async.commit_group;\n");
            asm volatile("cp.async.wait_group %0;\n" ::"n"(GEMV_STAGES - 1));
            // Other lanes copied this lane's data: wait for theirs too.
            __syncwarp();
            step_mma(read_step(mine + (i % GEMV_STAGES) * STAGE_CHUNKS, g, tig, ea, eb, xrow, has_x, cols,
                               (warp + i * GEMV_WARPS) * STEP_COLS + tig * 64),
                     ea, eb, acc);
            // The stage is refilled next iteration: every lane must have read it.
            __syncwarp();
        }
#else
        // The first step's planes go out before the wait: they stream while the previous
        // kernel finishes.
        u32 s = warp;
        if (s < steps) {
            StepData d = load_planes(P, S, L, row_a, row_b, va, vb, ea, eb, cols, s * STEP_COLS + tig * 64);
            pdl_wait();
            load_step_x(d, xrow, has_x, cols, s * STEP_COLS + tig * 64);
            step_mma(d, ea, eb, acc);
            s += GEMV_WARPS;
        } else {
            pdl_wait();
        }
        for (; s < steps; s += GEMV_WARPS)
            step_mma(load_step(P, S, L, row_a, row_b, va, vb, ea, eb, xrow, has_x, cols, s * STEP_COLS + tig * 64), ea, eb, acc);
#endif
        partial[warp][g][2 * tig] = acc[0];
        partial[warp][g][2 * tig + 1] = acc[1];
        partial[warp][g + 8][2 * tig] = acc[2];
        partial[warp][g + 8][2 * tig + 1] = acc[3];
    }
    __syncthreads();
    // Strided, so blocks of fewer than 128 threads (GEMV_WARPS < 3) reduce every output too.
    for (u32 t = threadIdx.x; t < TILE_ROWS * MAX_BATCH; t += blockDim.x) {
        const u32 r = t / MAX_BATCH, b = t % MAX_BATCH;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < GEMV_WARPS; ++w) sum += partial[w][r][b];
        const u32 row = r0 + r;
        if (row < rows && b < batch)
            y[(u64)b * rows + row] = f32_to_bf16(ldexpf(sum, rescale[r]) + corr[r][b]);
    }
}

// The kernels: mode chosen at run time (routed), and one per whole-tensor mode, where the
// constant mode folds away the per-chunk choice (and, for the draft, plane L's registers).
// Every mode of one module sums a row in the same order, so a routed row equals the exact or
// draft row bit for bit.
#define GEMV_KERNEL(name, mode_value) \
    extern "C" __global__ void __launch_bounds__((GEMV_WARPS + 1) * 32, GEMV_MIN_BLOCKS) name(GEMV_PARAMS) { gemv_body(GEMV_ARGS(mode_value), blockIdx.x * TILE_ROWS); }
GEMV_KERNEL(jd_gemv_bf16, mode)
GEMV_KERNEL(jd_gemv_bf16_exact, MODE_EXACT)
GEMV_KERNEL(jd_gemv_bf16_draft, MODE_DRAFT)

// Several tensors of one input in one launch (a layer's q, k and v, or gate and up): small
// tensors alone fill few SMs (1024 x 4096 is 64 blocks on 132), and every launch costs a few
// microseconds of host and GPU time. Blocks [tiles_end[i - 1], tiles_end[i]) run member i's
// tiles with the same body as its own launch, so each output is bit for bit the single-tensor
// kernel's. Whole-tensor modes only (routing flags are per tensor).
#define GROUP_MAX 3
struct GemvMember {
    const u8 *P, *S, *L, *bases;
    const u32 *esc_row_start, *esc_pos;
    const float2* esc_corr;
    u16* y;
    u64 segment;
    u32 rows, tiles_end;
};
struct GemvGroup {
    GemvMember m[GROUP_MAX];
    u32 count;
};

// Member i by value, from constant parameter offsets (a dynamic index would copy the whole
// group to local memory).
__device__ __forceinline__ GemvMember member(const GemvGroup& g, u32 i) {
    return i == 0 ? g.m[0] : (i == 1 ? g.m[1] : g.m[2]);
}

#define GEMV_GROUP_KERNEL(name, mode_value)                                                        \
    extern "C" __global__ void __launch_bounds__((GEMV_WARPS + 1) * 32, GEMV_MIN_BLOCKS)           \
    name(GemvGroup g, u32 cols, u32 chunk_rows, const u16* __restrict__ x, u32 batch) {            \
        u32 i = 0;                                                                                 \
        while (i + 1 < g.count && blockIdx.x >= member(g, i).tiles_end) ++i;                       \
        const GemvMember t = member(g, i);                                                         \
        const u32 first = i == 0 ? 0u : member(g, i - 1).tiles_end;                                \
        gemv_body(t.P, t.S, t.L, t.bases, t.bases, mode_value, t.rows, cols, chunk_rows, t.segment, \
                  t.esc_row_start, t.esc_pos, t.esc_corr, x, batch, t.y, (blockIdx.x - first) * TILE_ROWS); \
    }
GEMV_GROUP_KERNEL(jd_gemv_group_bf16_exact, MODE_EXACT)
GEMV_GROUP_KERNEL(jd_gemv_group_bf16_draft, MODE_DRAFT)
