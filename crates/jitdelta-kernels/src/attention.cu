// The decoder's kernels besides the fused GEMV, compiled at run time with NVRTC; BF16 in and
// out, f32 inside.
//
// Decode attention for short query blocks continuing a sequence (single-token steps and
// speculative verify passes). Each (query row, head) result depends only on that row's query
// and the keys/values up to its position, never on how many rows the launch holds: a verify
// pass over k rows is bit-identical to k single-token steps.
//
// Fused elementwise ops that save the launches of candle's separate kernels: residual add +
// RMSNorm (one block a row, a fixed reduction order: rows independent as above) and SwiGLU's
// silu(gate) * up. Compiled after pdl.cuh: under a dependent launch each kernel here lets the next
// one launch at once (a fused GEMV then streams its first weights meanwhile) and waits for its
// own inputs before it reads or writes anything.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define ATTN_WARPS 4
#define MAX_HEAD_DIM 256
// NVRTC has no math.h: -inf spelled out.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float((u32)b << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// q: (heads, rows, d); k, v: (kv_heads, capacity, d) buffers holding total positions a head
// (capacity >= total: a KV cache read in place). Row i sits at position total - rows + i and
// attends to positions 0..=that. Flash-decoding in one launch: the positions are cut into splits
// of ATTN_SPLIT, one block per (row, head, split) computes that split's unnormalised partial
// (running max m, sum l, acc[d]) into a record, and the last of a row's blocks to finish (an
// atomic count per (row, head)) merges the row's records in split order and writes the output.
// (Blocks serving all query heads of a key/value head, loading each key once for them, were
// slower up to 2048 positions: a third of the blocks, each three times the dependent math.)
// A lone decode step thus runs heads * splits blocks instead of heads, and a row's splits and
// their order depend only on its own position count, so a verify block's row is bit-identical
// to the single-token step. Inside a block, warp w takes positions w, w + ATTN_WARPS, ... of the
// split with an online softmax, lane l holds elements l * PL .. l * PL + PL - 1 of the head
// (PL = d / 32, a compile-time constant per kernel), and the warps' partials are merged in warp
// order. The merge used to be a second kernel: its launch and the wait between the two cost
// more than the merge (session 8, examples/layer_anatomy.rs).
#define ATTN_SPLIT 64

// Partials: (rows, heads, splits) records of PART_STRIDE(d) floats: m, l, acc[0..d).
#define PART_STRIDE(d) ((d) + 2)

// Online-softmax merge of (m2, l2, a2) into (m, l, a) for one element: NaN scores propagate,
// empty partials (m = -inf) add nothing.
__device__ __forceinline__ void merge_partial(float& m, float& l, float& a, float m2, float l2, float a2) {
    const float big = m2 != m2 ? m2 : fmaxf(m, m2);
    const float f1 = m == NEG_INF ? 0.f : __expf(m - big);
    const float f2 = m2 == NEG_INF ? 0.f : __expf(m2 - big);
    l = fmaf(l2, f2, l * f1);
    a = fmaf(a2, f2, a * f1);
    m = big;
}

// Positions a warp loads at once: its whole share of a split (one round trip to memory) while
// the keys and values (2 x UNROLL x PL 16-bit values a lane, a register each) stay within 128
// registers; heads wider than 128 take their share in two rounds or more.
template <int PL>
struct AttnUnroll {
    static constexpr int value = (ATTN_SPLIT / ATTN_WARPS) * PL <= 64 ? ATTN_SPLIT / ATTN_WARPS : 64 / PL;
};

template <int PL>
__device__ __forceinline__ void attention_block(const u16* __restrict__ q, const u16* __restrict__ k,
                                                const u16* __restrict__ v, u32 rows, u32 heads,
                                                u32 kv_heads, u32 total, u32 capacity, float scale,
                                                float* __restrict__ part, u32* __restrict__ arrivals,
                                                u16* __restrict__ y) {
    constexpr u32 D = 32 * PL;
    constexpr int UNROLL = AttnUnroll<PL>::value;
    __shared__ float part_m[ATTN_WARPS], part_l[ATTN_WARPS];
    __shared__ float part_acc[ATTN_WARPS][D];
    __shared__ bool merges;
    pdl_launch_dependents();
    pdl_wait();
    const u32 row = blockIdx.x, head = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 kvh = head / (heads / kv_heads);
    const u32 n = total - rows + row + 1;
    const u32 used = (n + ATTN_SPLIT - 1) / ATTN_SPLIT;
    const u32 first = split * ATTN_SPLIT, end = min(n, first + ATTN_SPLIT);
    if (split >= used) return;  // past this row's positions: neither counted nor merged
    const u16* qh = q + ((u64)head * rows + row) * D;
    const u16* kh = k + (u64)kvh * capacity * D + lane * PL;
    const u16* vh = v + (u64)kvh * capacity * D + lane * PL;

    float qv[PL], acc[PL];
#pragma unroll
    for (int e = 0; e < PL; ++e) {
        qv[e] = bf16_to_f32(qh[lane * PL + e]);
        acc[e] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    // UNROLL positions a step per warp (w + ATTN_WARPS * (UNROLL * step + u)), in increasing
    // order: all their loads go out before any is used. Positions past the row's end load
    // position 0 (an address known to be valid) and are skipped before their product: a
    // padded -inf score would still multiply position 0's value, and 0 x inf is NaN.
    for (u32 base = first + warp; base < end; base += ATTN_WARPS * UNROLL) {
        u16 kb[UNROLL][PL], vb[UNROLL][PL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const u32 j = base + ATTN_WARPS * u;
            const u64 at = (u64)(j < end ? j : 0u) * D;
#pragma unroll
            for (int e = 0; e < PL; ++e) {
                kb[u][e] = kh[at + e];
                vb[u][e] = vh[at + e];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            // Warp-uniform (base is per warp), and positions only grow with u.
            if (base + ATTN_WARPS * u >= end) break;
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < PL; ++e) dot = fmaf(qv[e], bf16_to_f32(kb[u][e]), dot);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, o);
            const float s = dot * scale;
            // NaN scores propagate; -inf ones add nothing.
            const float m_new = s != s ? s : fmaxf(m, s);
            const float keep = m_new == NEG_INF ? 1.f : __expf(m - m_new);
            const float p = m_new == NEG_INF ? 0.f : __expf(s - m_new);
            l = fmaf(l, keep, p);
#pragma unroll
            for (int e = 0; e < PL; ++e) acc[e] = fmaf(p, bf16_to_f32(vb[u][e]), acc[e] * keep);
            m = m_new;
        }
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < PL; ++e) part_acc[warp][lane * PL + e] = acc[e];
    __syncthreads();
    float* rec = part + ((u64)row * heads + head) * splits * PART_STRIDE(D);
    float* out = rec + (u64)split * PART_STRIDE(D);
    for (u32 t = threadIdx.x; t < D; t += ATTN_WARPS * 32) {
        float bm = NEG_INF, bl = 0.f, ba = 0.f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) merge_partial(bm, bl, ba, part_m[w], part_l[w], part_acc[w][t]);
        out[2 + t] = ba;
        if (t == 0) {
            out[0] = bm;
            out[1] = bl;
        }
    }
    // The record is out; the row's last block to get here merges (the threadfence pattern:
    // every writer fences before the count, the merging block fences after it).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* count = arrivals + (u64)row * heads + head;
        merges = used == 1 || atomicAdd(count, 1u) == used - 1;
        // Back to zero for the next launch: it touches the counts only after its pdl_wait(),
        // by which time this launch has ended.
        if (merges && used > 1) *count = 0u;
    }
    __syncthreads();
    if (!merges) return;
    __threadfence();
    for (u32 t = threadIdx.x; t < D; t += ATTN_WARPS * 32) {
        float mm = NEG_INF, ll = 0.f, a = 0.f;
        for (u32 s = 0; s < used; ++s) {
            const float* r = rec + (u64)s * PART_STRIDE(D);
            // Other blocks' records: read through L2 (never L1, which is not coherent).
            merge_partial(mm, ll, a, __ldcg(r), __ldcg(r + 1), __ldcg(r + 2 + t));
        }
        y[((u64)row * heads + head) * D + t] = f32_to_bf16(a / ll);
    }
}

// One kernel per d / 32 (1..8, d up to MAX_HEAD_DIM); arrivals: (rows, heads) counts, zero
// between launches.
#define ATTENTION_KERNEL(pl)                                                                       \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) jd_attention_bf16_pl##pl(        \
        const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, u32 rows, \
        u32 heads, u32 kv_heads, u32 total, u32 capacity, float scale, float* __restrict__ part,  \
        u32* __restrict__ arrivals, u16* __restrict__ y) {                                         \
        attention_block<pl>(q, k, v, rows, heads, kv_heads, total, capacity, scale, part, arrivals, y); \
    }
ATTENTION_KERNEL(1)
ATTENTION_KERNEL(2)
ATTENTION_KERNEL(3)
ATTENTION_KERNEL(4)
ATTENTION_KERNEL(5)
ATTENTION_KERNEL(6)
ATTENTION_KERNEL(7)
ATTENTION_KERNEL(8)

#define NORM_THREADS 1024
// Columns each thread keeps in registers (rows up to NORM_THREADS * NORM_HELD = 8192 columns
// are read once, with all of a thread's loads in flight together; longer rows loop).
#define NORM_HELD 8

// s = bf16(x + y) and h = bf16(s * rsqrt(mean(s^2) + eps) * w) for one row of cols a block,
// x, y, sum, out (rows, cols), w (cols). The squares are summed per thread in column order,
// then across each warp by shuffles and across warps in warp order: the same for every launch.
// A lone row is one block, so its latency is the kernel's: 1024 threads and unrolled loads
// (256 threads looping over a 4096-column row made the step slower than candle's two ops).
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
jd_add_rms_norm_bf16(const u16* __restrict__ x, const u16* __restrict__ y,
                     const u16* __restrict__ w, u32 cols, float eps, u16* __restrict__ sum,
                     u16* __restrict__ out) {
    __shared__ float part[NORM_THREADS / 32];
    pdl_launch_dependents();
    pdl_wait();
    const u64 base = (u64)blockIdx.x * cols;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    float held[NORM_HELD];
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_HELD; ++i) {
        const u32 c = threadIdx.x + i * NORM_THREADS;
        held[i] = c < cols ? bf16_to_f32(f32_to_bf16(bf16_to_f32(x[base + c]) + bf16_to_f32(y[base + c])))
                           : 0.f;
    }
#pragma unroll
    for (int i = 0; i < NORM_HELD; ++i) {
        const u32 c = threadIdx.x + i * NORM_THREADS;
        if (c < cols) sum[base + c] = f32_to_bf16(held[i]);
        sq = fmaf(held[i], held[i], sq);
    }
    for (u32 c = threadIdx.x + NORM_HELD * NORM_THREADS; c < cols; c += NORM_THREADS) {
        const u16 s = f32_to_bf16(bf16_to_f32(x[base + c]) + bf16_to_f32(y[base + c]));
        sum[base + c] = s;
        const float f = bf16_to_f32(s);
        sq = fmaf(f, f, sq);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xFFFFFFFFu, sq, o);
    if (lane == 0) part[warp] = sq;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) total += part[i];
    const float scale = rsqrtf(total / (float)cols + eps);
#pragma unroll
    for (int i = 0; i < NORM_HELD; ++i) {
        const u32 c = threadIdx.x + i * NORM_THREADS;
        if (c < cols) out[base + c] = f32_to_bf16(held[i] * scale * bf16_to_f32(w[c]));
    }
    // s recomputed rather than read back: the same bits, and no read of a written buffer.
    for (u32 c = threadIdx.x + NORM_HELD * NORM_THREADS; c < cols; c += NORM_THREADS) {
        const float s =
            bf16_to_f32(f32_to_bf16(bf16_to_f32(x[base + c]) + bf16_to_f32(y[base + c])));
        out[base + c] = f32_to_bf16(s * scale * bf16_to_f32(w[c]));
    }
}

// out = bf16(silu(gate) * up) over n elements, silu(g) = g / (1 + exp(-g)) in f32: one
// rounding where candle's silu and mul round twice.
extern "C" __global__ void jd_silu_mul_bf16(const u16* __restrict__ gate,
                                            const u16* __restrict__ up, u32 n,
                                            u16* __restrict__ out) {
    pdl_launch_dependents();
    pdl_wait();
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = bf16_to_f32(gate[i]);
    out[i] = f32_to_bf16(g / (1.f + expf(-g)) * bf16_to_f32(up[i]));
}

// Rotary embedding of a step's queries and keys, with its keys and values written into the KV
// cache: one launch for what took candle seven (the q/k/v head transposes, two ropes, two cache
// copies). qkv holds the q, k and v projections of the step's rows, each block row-major
// (rows, heads or kv_heads, d), starting at elements q_off, k_off, v_off; cos_sin is
// (2, rows, d/2): cos, then sin. Queries go to q_out as (heads, rows, d), the attention kernel's
// layout; keys and values to position start + row of kv, a (2, kv_heads, capacity, d) buffer
// (keys, then values). One block of d/2 threads per (row, head slot), slots: query heads, key
// heads, value heads. Rotate-half form, each output rounded once:
// bf16(x1 * c - x2 * s) and bf16(x1 * s + x2 * c), products exact in f32, the sum rounded to f32
// (the _rn intrinsics keep it from being contracted into an fma).
extern "C" __global__ void jd_rope_kv_bf16(const u16* __restrict__ qkv, u64 q_off, u64 k_off,
                                           u64 v_off, const u16* __restrict__ cos_sin, u32 rows,
                                           u32 heads, u32 kv_heads, u32 d, u32 capacity,
                                           u32 start, u16* __restrict__ q_out,
                                           u16* __restrict__ kv) {
    pdl_launch_dependents();
    pdl_wait();
    const u32 row = blockIdx.x, slot = blockIdx.y, i = threadIdx.x, half = d >> 1;
    const u16* src;
    u16* dst;
    if (slot < heads) {
        src = qkv + q_off + ((u64)row * heads + slot) * d;
        dst = q_out + ((u64)slot * rows + row) * d;
    } else if (slot < heads + kv_heads) {
        const u32 h = slot - heads;
        src = qkv + k_off + ((u64)row * kv_heads + h) * d;
        dst = kv + ((u64)h * capacity + start + row) * d;
    } else {
        const u32 h = slot - heads - kv_heads;
        src = qkv + v_off + ((u64)row * kv_heads + h) * d;
        dst = kv + (u64)kv_heads * capacity * d + ((u64)h * capacity + start + row) * d;
        dst[i] = src[i];
        dst[i + half] = src[i + half];
        return;
    }
    const float x1 = bf16_to_f32(src[i]), x2 = bf16_to_f32(src[i + half]);
    const float c = bf16_to_f32(cos_sin[(u64)row * half + i]);
    const float s = bf16_to_f32(cos_sin[((u64)rows + row) * half + i]);
    dst[i] = f32_to_bf16(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
    dst[i + half] = f32_to_bf16(__fadd_rn(__fmul_rn(x1, s), __fmul_rn(x2, c)));
}

// The reductions a greedy speculative draft reads from one row of n f32 logits (semantics and
// CPU reference: decoder_ops::logit_stats): out = [argmax, Z, S, l2, ties]. One block, two
// passes over the row; each reduction runs per thread in index order, then across each warp by
// shuffles and across warps in warp order, so every launch gives the same bits.
#define STATS_THREADS 1024
#define LOGIT_FLOOR (-1e30f)

// The larger value wins; equal values go to the smaller index (NaN never wins).
__device__ __forceinline__ void keep_max(float& m, u32& i, float om, u32 oi) {
    if (om > m || (om == m && oi < i)) {
        m = om;
        i = oi;
    }
}

extern "C" __global__ void __launch_bounds__(STATS_THREADS)
jd_logit_stats_f32(const float* __restrict__ logits, u32 n, float* __restrict__ out) {
    __shared__ float part_f[3][STATS_THREADS / 32];
    __shared__ u32 part_u[2][STATS_THREADS / 32];
    pdl_launch_dependents();
    pdl_wait();
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const float neg_inf = __int_as_float(0xFF800000);
    float m = neg_inf;
    u32 at = 0xFFFFFFFFu;
    for (u32 i = threadIdx.x; i < n; i += STATS_THREADS) keep_max(m, at, logits[i], i);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        keep_max(m, at, __shfl_xor_sync(0xFFFFFFFFu, m, o), __shfl_xor_sync(0xFFFFFFFFu, at, o));
    if (lane == 0) {
        part_f[0][warp] = m;
        part_u[0][warp] = at;
    }
    __syncthreads();
    m = neg_inf;
    at = 0xFFFFFFFFu;
    for (int w = 0; w < STATS_THREADS / 32; ++w) keep_max(m, at, part_f[0][w], part_u[0][w]);
    __syncthreads();
    float z = 0.f, s = 0.f, l2 = 2.f * LOGIT_FLOOR;
    u32 ties = 0;
    for (u32 i = threadIdx.x; i < n; i += STATS_THREADS) {
        const float d = fmaxf(logits[i] - m, LOGIT_FLOOR);
        const float e = expf(d);
        z += e;
        s += e * d;
        if (d >= 0.f) ++ties;
        else l2 = fmaxf(l2, d);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        z += __shfl_xor_sync(0xFFFFFFFFu, z, o);
        s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
        l2 = fmaxf(l2, __shfl_xor_sync(0xFFFFFFFFu, l2, o));
        ties += __shfl_xor_sync(0xFFFFFFFFu, ties, o);
    }
    if (lane == 0) {
        part_f[0][warp] = z;
        part_f[1][warp] = s;
        part_f[2][warp] = l2;
        part_u[1][warp] = ties;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        z = 0.f;
        s = 0.f;
        l2 = 2.f * LOGIT_FLOOR;
        ties = 0;
        for (int w = 0; w < STATS_THREADS / 32; ++w) {
            z += part_f[0][w];
            s += part_f[1][w];
            l2 = fmaxf(l2, part_f[2][w]);
            ties += part_u[1][w];
        }
        out[0] = (float)(at == 0xFFFFFFFFu ? 0u : at);
        out[1] = z;
        out[2] = s;
        out[3] = l2;
        out[4] = (float)ties;
    }
}
