"""C++ kernels for HTS-AT's CPU inference, compiled on first use: fused window attention; LayerNorm with the residual
add and the biases around it; bias and GELU in place. They replace the PyTorch ops where those leave most of the
machine idle or make extra passes over memory.

Window attention: Swin attends within 64-token windows with 24-wide heads, products of 64 x 64 x 24, too small for
any BLAS to run near its peak: PyTorch's SDPA CPU kernel reached about 45-50 GFLOP/s on them and `bmm` + softmax +
`bmm` about 40, on 2 cores of an AMD EPYC Zen 4 whose large matmuls run at about 200. The kernel does one (window,
head) at a time with everything in L1, k and v read straight from the qkv projection (no permute copies), queries
transposed once in registers, and every step running down vectors of queries: scores (key, query) in register tiles
with the bias-plus-shift mask (cached transposed by the model) added there, the softmax's maximum and sum lane-wise,
the context as one broadcast of v per head dim and key (a 24-wide head is no whole number of 16-float vectors), and
transposed back into (window, token, head, head_dim) order, ready for the output projection: 2.2-2.4x SDPA on the
Zen 4 with an earlier, query-per-row version, and 1.24x that version on an AMD EPYC Zen 5 (0.164 against 0.203 ms
per stage chunk; 1.13x with AVX2). The code is written once for the CPU's vector width: 16 floats and 32 registers
with AVX-512, 8 floats and 16 registers with AVX2 (on 2 cores of an AMD EPYC Zen 3 the earlier version reached 57-61
GFLOP/s against SDPA's 31-42). A CPU with neither takes PyTorch's ops. It takes the qkv projection without its bias
(`addmm` would first copy the bias into every row of its output): q's bias is added to the transposed queries, v's to
the context (each query's probabilities sum to one), and k's nowhere (it adds the same q . b_k to every score of a
query, which the softmax takes out).

LayerNorm: PyTorch's CPU LayerNorm moved 18-35 GB/s on the blocks' (tokens, 96..768) chunks, which sit in cache; one
pass per row here is about 2x faster. The same pass adds the attention's residual with the output projection's bias,
and carries fc2's bias into the tokens that fc2's GEMM then accumulates into (no bias copies, no separate adds).

Row copies: tokens gathered into a chunk from, and written back to, rows given by index (one threaded pass each way),
so that a Swin stage's blocks take their windows straight from the grid-ordered tokens.

Spectrogram image: the bicubic stretch of a clip's 1001 frames to 1024 (with PyTorch's own tap weights), and the
cut of the time axis into pieces stacked along frequency, in one pass: 0.13 against 3.3 ms for `F.interpolate`, a
permute and a reshape copy at batch 16 (AMD EPYC Zen 5, 2 cores).

GELU: the exact (erf) form, with fc1's bias, in place on fc1's bias-free output; its erf is the 1.5e-7 approximation
that PyTorch's own vectorised CPU GELU uses, so the two agree to about 1 ulp.

All are threaded by PyTorch's own OpenMP runtime with `torch.get_num_threads()` threads: the library asks for
`libgomp.so.1`, which the loader resolves to the runtime PyTorch already loaded under that name (checked at load with
`openmp_runtime`), also where another wheel brought its own renamed copy (scikit-learn's `libgomp-<hash>.so`).
They are compiled with the system's C++ compiler (`$CXX`, else `c++`) for this CPU (`-march=native`, a few seconds)
into `$HTSAT_HF_CACHE` (default `~/.cache/htsat_hf/kernels`), once per source, compiler and CPU. They apply only to
fp32 CPU inference on Linux x86-64, with no autograd, autocast, compiler tracing, ONNX export or dispatch mode (such
as `FlopCounterMode`) active; elsewhere, or on a machine without a compiler, PyTorch's ops run.
`HTSAT_HF_NATIVE_KERNELS=0` turns them off; `torch_ops_instead()` does so within a block of code.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

ATTENTION_TOKENS = (16, 32, 48, 64)
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

KERNEL_SOURCE = r"""
// HTS-AT's CPU inference kernels: fused window attention, and LayerNorm with the residual add before it.
// Written once for the widest vector the CPU has: 16 floats with AVX-512, 8 with AVX2. (GCC lowers vectors wider
// than the machine's registers through the stack, several times slower than scalar code.)
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define VW 16     // floats per vector register
#define REGS 32   // vector registers
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
#define REGS 16
#else
#error "HTS-AT's native kernels need AVX2 and FMA (or AVX-512)"
#endif

extern "C" int htsat_vector_width() { return VW; }

typedef float vec __attribute__((vector_size(4 * VW)));
typedef int32_t ivec __attribute__((vector_size(4 * VW)));
typedef float uvec __attribute__((vector_size(4 * VW), aligned(4)));
typedef float vec8 __attribute__((vector_size(32)));  // 8 floats: the context rows' unit (head_dim % 8 == 0)
typedef float uvec8 __attribute__((vector_size(32), aligned(4)));

static inline vec fast_exp(vec x) {
    // e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln(2) / 2; degree-7 Taylor series for e^r (relative error
    // below 1e-8). Inputs are <= 0 (the row maximum is subtracted); below -87 the result is clamped near 1e-38.
    x = x < -87.0f ? -87.0f : x;
    vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vec r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    vec p = r * 0.0013941108481958508f + 0.00837512593716383f;
    p = p * r + 0.04166635125875473f;
    p = p * r + 0.16666415333747864f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return p * (vec)bits;
}

static inline void transpose_8x8(const float* src, long src_stride, float* dst, long dst_stride) {
    // dst[c][r] = src[r][c] for an 8 x 8 block, in registers: three rounds of pairwise shuffles
    vec8 r[8], t[8], u[8];
    for (int a = 0; a < 8; ++a) r[a] = *(const uvec8*)(src + a * src_stride);
    for (int a = 0; a < 8; a += 2) {
        t[a] = __builtin_shufflevector(r[a], r[a + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[a + 1] = __builtin_shufflevector(r[a], r[a + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int a = 0; a < 8; a += 4)
        for (int b = 0; b < 2; ++b) {
            u[a + 2 * b] = __builtin_shufflevector(t[a + b], t[a + b + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[a + 2 * b + 1] = __builtin_shufflevector(t[a + b], t[a + b + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int c = 0; c < 4; ++c) {
        *(uvec8*)(dst + c * dst_stride) = __builtin_shufflevector(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        *(uvec8*)(dst + (c + 4) * dst_stride) = __builtin_shufflevector(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

// Tree reductions over a vector's lanes: each step folds the upper half of every group onto the lower.
#if VW == 16
#define FOLDS(v)                                                                          \
    FOLD(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)                         \
    FOLD(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)                         \
    FOLD(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)                         \
    FOLD(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)
#else
#define FOLDS(v)                          \
    FOLD(v, 4, 5, 6, 7, 0, 1, 2, 3)       \
    FOLD(v, 2, 3, 0, 1, 6, 7, 4, 5)       \
    FOLD(v, 1, 0, 3, 2, 5, 4, 7, 6)
#endif

static inline float lane_sum(vec v) {
#define FOLD(v, ...) v += __builtin_shufflevector(v, v, __VA_ARGS__);
    FOLDS(v)
#undef FOLD
    return v[0];
}

// ------------------------------------------------------------------------------------------- window attention
// Register blocking, from the vector registers there are. Everything runs with queries along the vectors: scores in
// tiles of QB query vectors x KJ keys, the context in tiles of QB query vectors x DB head dims.
constexpr int query_block(int query_vectors) { return REGS == 32 ? query_vectors : 2; }
constexpr int key_block(int qb) {
    int keys = 16;
    while (keys > 1 && keys * qb > (REGS == 32 ? 16 : 8)) keys /= 2;
    return keys;
}
constexpr int dims_block(int qb, int head_dim) {
    int dims = (REGS == 32 ? 24 : 12) / qb;
    while (dims > 1 && head_dim % dims != 0) --dims;
    return dims;
}

template <int T, int ND>  // tokens T (a multiple of 16), head_dim = 8 * ND
static void attend_one(const float* qkv, const float* q_bias, const float* v_bias, const float* mask_t,
                       const float* window_mask_t, float* out, int heads, int h, float scale) {
    // Scores are computed transposed, (key, query), so that every step runs down whole vectors of queries: the
    // softmax's maximum and sum are lane-wise (no reductions across a vector), and the context's head dims take one
    // broadcast each (no partial vectors where head_dim is not a multiple of the vector width).
    constexpr int D = 8 * ND, NQ = T / VW, QB = query_block(NQ), KJ = key_block(QB), DB = dims_block(QB, D);
    const long stride = 3L * heads * D;  // between tokens in qkv
    const float* q = qkv + (long)h * D;
    const float* k = q + (long)heads * D;
    const float* v = k + (long)heads * D;
    alignas(64) float q_t[D * T];  // (head dim, query): the queries with their bias
    alignas(64) float p_t[T * T];  // (key, query): scores, then unnormalised probabilities
    alignas(64) float o_t[D * T];  // (head dim, query): the context, before it is transposed into out
    alignas(64) float inv[T];      // 1 / each query's sum of probabilities
    for (int i = 0; i < T; i += 8)
        for (int d = 0; d < D; d += 8) transpose_8x8(q + i * stride + d, stride, q_t + d * T + i, T);
    for (int d = 0; d < D; ++d) {
        const float b = q_bias != nullptr ? q_bias[d] : 0.0f;
        for (int i = 0; i < T; i += VW) *(vec*)(q_t + d * T + i) += b;
    }
    for (int i0 = 0; i0 < T; i0 += QB * VW) {  // scores and softmax, QB vectors of queries at a time
        vec m[QB];
        for (int a = 0; a < QB; ++a) m[a] = vec{} - INFINITY;
        for (int j = 0; j < T; j += KJ) {
            vec acc[KJ][QB] = {};
            for (int d = 0; d < D; ++d) {
                vec qd[QB];
                for (int a = 0; a < QB; ++a) qd[a] = *(const vec*)(q_t + d * T + i0 + VW * a);
                for (int b = 0; b < KJ; ++b) {
                    const float kd = k[(j + b) * stride + d];
                    for (int a = 0; a < QB; ++a) acc[b][a] += kd * qd[a];
                }
            }
            // scaled, plus the masks (scaling the sums, not the queries: as accurate as SDPA against float64, where
            // scaled queries were up to 1.5x less accurate)
            for (int b = 0; b < KJ; ++b)
                for (int a = 0; a < QB; ++a) {
                    const long at = (j + b) * T + i0 + VW * a;
                    vec score = acc[b][a] * scale + *(const vec*)(mask_t + at);
                    if (window_mask_t != nullptr) score += *(const vec*)(window_mask_t + at);
                    *(vec*)(p_t + at) = score;
                    m[a] = score > m[a] ? score : m[a];  // each query's running maximum
                }
        }
        vec sum[QB] = {};
        for (int j = 0; j < T; ++j)
            for (int a = 0; a < QB; ++a) {
                vec* p = (vec*)(p_t + j * T + i0 + VW * a);
                *p = fast_exp(*p - m[a]);
                sum[a] += *p;
            }
        for (int a = 0; a < QB; ++a) *(vec*)(inv + i0 + VW * a) = 1.0f / sum[a];
    }
    for (int i0 = 0; i0 < T; i0 += QB * VW)  // context: sum_j v[j][d] p[j][i], DB head dims at a time
        for (int d0 = 0; d0 < D; d0 += DB) {
            vec acc[DB][QB] = {};
            for (int j = 0; j < T; ++j) {
                vec pj[QB];
                for (int a = 0; a < QB; ++a) pj[a] = *(const vec*)(p_t + j * T + i0 + VW * a);
                for (int c = 0; c < DB; ++c) {
                    const float vd = v[j * stride + d0 + c];
                    for (int a = 0; a < QB; ++a) acc[c][a] += vd * pj[a];
                }
            }
            // v's bias: the probabilities of a query sum to one, so it adds to the context as it is
            for (int c = 0; c < DB; ++c) {
                const float b = v_bias != nullptr ? v_bias[d0 + c] : 0.0f;
                for (int a = 0; a < QB; ++a) {
                    const long at = (d0 + c) * T + i0 + VW * a;
                    *(vec*)(o_t + at) = acc[c][a] * *(const vec*)(inv + i0 + VW * a) + b;
                }
            }
        }
    const long out_stride = (long)heads * D;
    float* o = out + (long)h * D;
    for (int i = 0; i < T; i += 8)
        for (int d = 0; d < D; d += 8) transpose_8x8(o_t + d * T + i, T, o + i * out_stride + d, out_stride);
}

struct AttentionMasks {  // the additive masks; windows are counted from `offset` (the call's first window)
    const float* mask;          // (mask_windows, heads, key, query): window w takes mask[w % mask_windows]
    long mask_windows;
    const float* window_masks;  // null, or (kinds, key, query) for all heads: window w adds window_masks[kind[w % period]]
    const int64_t* kind;
    long period;
    long offset;
};

template <int T, int ND>
static void attend_all(const float* qkv, const float* qkv_bias, const AttentionMasks& masks, float* out, long windows,
                       int heads, float scale, int threads) {
    constexpr long D = 8 * ND;
    const long tasks = windows * heads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long task = 0; task < tasks; ++task) {
        const long w = task / heads, window = masks.offset + w;
        const int h = (int)(task % heads);
        const float* mask = masks.mask + ((window % masks.mask_windows) * heads + h) * T * T;
        const float* window_mask =
            masks.window_masks != nullptr ? masks.window_masks + masks.kind[window % masks.period] * T * T : nullptr;
        const float* q_bias = qkv_bias != nullptr ? qkv_bias + h * D : nullptr;
        const float* v_bias = qkv_bias != nullptr ? qkv_bias + (2L * heads + h) * D : nullptr;
        attend_one<T, ND>(qkv + w * T * 3 * heads * D, q_bias, v_bias, mask, window_mask, out + w * T * heads * D,
                          heads, h, scale);
    }
}

template <int T>
static int dispatch_head_dim(const float* qkv, const float* qkv_bias, const AttentionMasks& masks, float* out,
                             long windows, int heads, int head_dim, float scale, int threads) {
    switch (head_dim) {
#define CASE(ND)                                                                        \
    case 8 * ND:                                                                        \
        attend_all<T, ND>(qkv, qkv_bias, masks, out, windows, heads, scale, threads);   \
        return 0;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        default: return 1;
    }
}

// qkv: (windows, tokens, 3, heads, head_dim), the projection without its bias; qkv_bias: (3, heads, head_dim) or
// null. q's bias is added to the queries, v's to the context, k's nowhere: it adds q . b_k to all of a query's scores,
// which the softmax takes out. mask: (mask_windows, heads, key, query), transposed, window w takes
// mask[(mask_offset + w) % mask_windows]; window_masks: null, or (kinds, key, query), transposed, added for every head,
// window w taking window_masks[window_kind[(mask_offset + w) % kind_period]]; out: (windows, tokens, heads,
// head_dim). Returns 0, 1 for a shape this kernel does not take (tokens 16/32/48/64, head_dim a multiple of 8 up to
// 64), or 2 for a window kind outside [0, kinds).
extern "C" int htsat_window_attention(const float* qkv, const float* qkv_bias, const float* mask,
                                      const float* window_masks, const int64_t* window_kind, float* out,
                                      long windows, int tokens, int heads, int head_dim, long mask_windows,
                                      long kinds, long kind_period, long mask_offset, float scale, int threads) {
    if (mask_windows < 1 || heads < 1 || windows < 0 || (window_masks != nullptr && kind_period < 1)) return 1;
    if (window_masks != nullptr)
        for (long w = 0; w < kind_period; ++w)
            if (window_kind[w] < 0 || window_kind[w] >= kinds) return 2;
    const AttentionMasks masks{mask, mask_windows, window_masks, window_kind, kind_period, mask_offset};
    switch (tokens) {
#define CASE(T)                                                                                                 \
    case T: return dispatch_head_dim<T>(qkv, qkv_bias, masks, out, windows, heads, head_dim, scale, threads);
        CASE(16) CASE(32) CASE(48) CASE(64)
#undef CASE
        default: return 1;
    }
}

// ------------------------------------------------------------------------------------------------ LayerNorm
static inline void copy_row(const float* from, float* to, int dim) {
    const int body = dim - dim % VW;
    for (int c = 0; c < body; c += VW) *(uvec*)(to + c) = *(const uvec*)(from + c);
    for (int c = body; c < dim; ++c) to[c] = from[c];
}

// out = LayerNorm(row) for one row of `dim` floats (in L1): biased variance, two passes, weight and bias.
static inline void normalise_row(const float* row, float* out, int dim, const float* weight, const float* bias,
                                 float eps) {
    const int body = dim - dim % VW;
    vec sum = {};
    for (int c = 0; c < body; c += VW) sum += *(const uvec*)(row + c);
    float total = lane_sum(sum);
    for (int c = body; c < dim; ++c) total += row[c];
    const float mean = total / dim;
    vec squares = {};
    for (int c = 0; c < body; c += VW) {
        vec centred = *(const uvec*)(row + c) - mean;
        squares += centred * centred;
    }
    float variance = lane_sum(squares);
    for (int c = body; c < dim; ++c) variance += (row[c] - mean) * (row[c] - mean);
    const float inv_std = 1.0f / sqrtf(variance / dim + eps);
    for (int c = 0; c < body; c += VW)
        *(uvec*)(out + c) =
            (*(const uvec*)(row + c) - mean) * inv_std * *(const uvec*)(weight + c) + *(const uvec*)(bias + c);
    for (int c = body; c < dim; ++c) out[c] = (row[c] - mean) * inv_std * weight[c] + bias[c];
}

// For each of `rows` rows of `dim` floats of x, in order (each step only where its pointers are not null):
//   x += delta (+ delta_bias)         a residual add, with the bias of the layer that made delta;
//   out = LayerNorm(x)                weight and bias;
//   x += carry_bias                   a bias for a later layer whose output is accumulated into x, after the norm.
// x, delta and out are contiguous rows; out may be x itself (a norm in place) where carry_bias is null.
extern "C" int htsat_layer_norm(float* x, const float* delta, const float* delta_bias, const float* carry_bias,
                                const float* weight, const float* bias, float* out, long rows, int dim, float eps,
                                int threads) {
    if (dim < 1 || rows < 0) return 1;
    const int body = dim - dim % VW;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; ++r) {
        float* row = x + r * dim;
        if (delta != nullptr) {
            const float* add = delta + r * dim;
            if (delta_bias != nullptr) {
                for (int c = 0; c < body; c += VW)
                    *(uvec*)(row + c) += *(const uvec*)(add + c) + *(const uvec*)(delta_bias + c);
                for (int c = body; c < dim; ++c) row[c] += add[c] + delta_bias[c];
            } else {
                for (int c = 0; c < body; c += VW) *(uvec*)(row + c) += *(const uvec*)(add + c);
                for (int c = body; c < dim; ++c) row[c] += add[c];
            }
        }
        normalise_row(row, out + r * dim, dim, weight, bias, eps);
        if (carry_bias != nullptr) {
            for (int c = 0; c < body; c += VW) *(uvec*)(row + c) += *(const uvec*)(carry_bias + c);
            for (int c = body; c < dim; ++c) row[c] += carry_bias[c];
        }
    }
    return 0;
}

// Swin's patch merging up to its linear layer, for merged tokens first .. first + rows - 1 of the (batch, grid / 2,
// grid / 2) grid: out[r] = LayerNorm(x[2i, 2j] ++ x[2i + 1, 2j] ++ x[2i, 2j + 1] ++ x[2i + 1, 2j + 1]) over the
// 4 * dim floats, from x (batch, grid, grid, dim), contiguous; out holds `rows` rows of 4 * dim.
extern "C" int htsat_merge_norm(const float* x, const float* weight, const float* bias, float* out, long first,
                                long rows, int grid, int dim, float eps, int threads) {
    if (dim < 1 || rows < 0 || grid < 2 || grid % 2 != 0) return 1;
    const long half = grid / 2, per_image = half * half;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; ++r) {
        const long merged = first + r, image = merged / per_image, i = (merged % per_image) / half, j = merged % half;
        float* row = out + r * 4 * dim;
        for (int part = 0; part < 4; ++part) {  // the concatenation's order: (0, 0), (1, 0), (0, 1), (1, 1)
            const long source_row = (image * grid + 2 * i + part % 2) * grid + 2 * j + part / 2;
            copy_row(x + source_row * dim, row + part * dim, dim);
        }
        normalise_row(row, row, 4 * dim, weight, bias, eps);
    }
    return 0;
}

// -------------------------------------------------------------------------------------------- bias and GELU
// GELU's exact form x Phi(x), with 1 - Phi(|x|) = erfc(|x| / sqrt 2) / 2 from Abramowitz and Stegun's 7.1.26 (absolute
// error below 1.5e-7, the approximation PyTorch's vectorised CPU erf uses). Negative x take x (1 - Phi(|x|)) directly,
// with no cancellation.
static inline vec gelu(vec x) {
    const vec z = (x < 0.0f ? -x : x) * 0.70710678118654752f;
    const vec t = 1.0f / (1.0f + 0.3275911f * z);
    const vec poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
    const vec upper_tail = 0.5f * poly * fast_exp(-z * z);  // 1 - Phi(|x|)
    return x * (x < 0.0f ? upper_tail : 1.0f - upper_tail);
}

// x <- GELU(x + bias) in place for `rows` contiguous rows of `cols` floats; bias (cols floats) may be null.
extern "C" int htsat_bias_gelu(float* x, const float* bias, long rows, int cols, int threads) {
    if (cols < 1 || rows < 0) return 1;
    const int body = cols - cols % VW;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; ++r) {
        float* row = x + r * cols;
        for (int c = 0; c < body; c += VW) {
            vec v = *(const uvec*)(row + c);
            if (bias != nullptr) v += *(const uvec*)(bias + c);
            *(uvec*)(row + c) = gelu(v);
        }
        for (int c = body; c < cols; ++c) {
            vec v = {};
            v[0] = row[c] + (bias != nullptr ? bias[c] : 0.0f);
            row[c] = gelu(v)[0];
        }
    }
    return 0;
}

// ------------------------------------------------------------------------------------------------ row copies
// dst[dst_index[r]] = src[src_index[r]] for r < rows, rows of `dim` floats; a null index means row r itself.
// Tokens move between the blocks' window orders this way, one cache-sized chunk at a time.
extern "C" int htsat_copy_rows(const float* src, const int64_t* src_index, float* dst, const int64_t* dst_index,
                               long rows, int dim, int threads) {
    if (dim < 1 || rows < 0) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; ++r) {
        const long from = src_index != nullptr ? src_index[r] : r, to = dst_index != nullptr ? dst_index[r] : r;
        copy_row(src + from * dim, dst + to * dim, dim);
    }
    return 0;
}


// ------------------------------------------------------------------------------------------- spectrogram image
// HTS-AT's image from `batch` spectrograms x (frames at time_stride, mel bins contiguous, inputs batch_stride apart):
// the time axis stretched to `target` frames, stretched[t] = sum_k tap_weight[t][k] * x[tap_index[t][k]] over `taps`
// taps, then cut into `ratio` pieces stacked along frequency: out (batch, ratio * mel, target / ratio), contiguous,
// out[b][r * mel + m][c] = stretched[r * target / ratio + c][m]. Eight frames at a time are stretched into L1 and
// transposed into the image in registers. Returns 1 for shapes it does not take (mel or target / ratio not a
// multiple of 8, more than 256 mel bins).
extern "C" int htsat_fold_image(const float* x, long batch_stride, long time_stride, const int64_t* tap_index,
                                const float* tap_weight, int taps, float* out, long batch, int target, int mel,
                                int ratio, int threads) {
    if (batch < 0 || taps < 1 || ratio < 1 || mel < 8 || mel % 8 != 0 || mel > 256 || target % ratio != 0 ||
        (target / ratio) % 8 != 0)
        return 1;
    const int width = target / ratio, body = mel - mel % VW;
    const long tiles_per_image = target / 8, tiles = batch * tiles_per_image;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long tile = 0; tile < tiles; ++tile) {
        const long b = tile / tiles_per_image;
        const int t0 = (int)(tile % tiles_per_image) * 8;
        const float* spectrogram = x + b * batch_stride;
        alignas(64) float stretched[8 * 256];
        for (int a = 0; a < 8; ++a) {
            const int64_t* index = tap_index + (long)(t0 + a) * taps;
            const float* weight = tap_weight + (long)(t0 + a) * taps;
            float* row = stretched + a * mel;
            for (int m = 0; m < body; m += VW) {
                vec sum = weight[0] * *(const uvec*)(spectrogram + index[0] * time_stride + m);
                for (int k = 1; k < taps; ++k) sum += weight[k] * *(const uvec*)(spectrogram + index[k] * time_stride + m);
                *(uvec*)(row + m) = sum;
            }
            for (int m = body; m < mel; ++m) {
                float sum = weight[0] * spectrogram[index[0] * time_stride + m];
                for (int k = 1; k < taps; ++k) sum += weight[k] * spectrogram[index[k] * time_stride + m];
                row[m] = sum;
            }
        }
        float* piece = out + (b * ratio + t0 / width) * mel * (long)width + t0 % width;
        for (int m = 0; m < mel; m += 8) transpose_8x8(stretched + m, mel, piece + (long)m * width, width);
    }
    return 0;
}
"""


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: `$HTSAT_HF_CACHE`, else `$XDG_CACHE_HOME/htsat_hf/kernels` (~/.cache)."""
    if os.environ.get("HTSAT_HF_CACHE"):
        return Path(os.environ["HTSAT_HF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "htsat_hf" / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags (what `-march=native` compiles for), so a cache shared by machines stays right."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler_version(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{compiler} --version failed: {result.stderr.strip()[-500:]}")
    return result.stdout


class _SymbolInfo(ctypes.Structure):
    """glibc's `Dl_info`, filled by `dladdr`."""

    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


def openmp_runtime(library: ctypes.CDLL) -> str | None:
    """The file of the OpenMP runtime that `library`'s calls go to (where its `omp_get_max_threads` resolves, found
    with `dladdr`), or None where it has none. A library built with `-fopenmp` asks for `libgomp.so.1`, and the loader
    gives it the object already loaded under that name: PyTorch's own. Other wheels' runtimes (scikit-learn's
    `libgomp-<hash>.so`) are loaded under other names and are never chosen."""
    try:
        address = ctypes.cast(library.omp_get_max_threads, ctypes.c_void_p).value
    except AttributeError:
        return None
    process = ctypes.CDLL(None)
    process.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_SymbolInfo)]
    info = _SymbolInfo()
    if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def torch_openmp_runtime() -> str | None:
    """The OpenMP runtime PyTorch's CPU ops run on (see `openmp_runtime`), or None where it cannot be found."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return openmp_runtime(ctypes.CDLL(str(library), mode=os.RTLD_NOLOAD | os.RTLD_LAZY))
    except OSError:  # another build layout
        return None


def build_kernels(cache_dir: Path | None = None, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compiles the kernels (or reuses the cached build) and loads them; raises RuntimeError saying why it cannot.
    `extra_flags` go after the usual ones (the tests build the AVX2 variant on AVX-512 machines with `-mno-avx512f`)."""
    flags = (*COMPILE_FLAGS, *extra_flags)
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX, or install g++)")
    cache_dir = Path(cache_dir) if cache_dir is not None else kernel_cache_dir()
    key = "\n".join([KERNEL_SOURCE, " ".join(flags), _compiler_version(compiler), cpu_flags()])
    library = cache_dir / f"htsat_kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not library.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        logger.info(f"Compiling HTS-AT's CPU kernels into {library} (once, a few seconds)")
        with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
            source, built = Path(scratch) / "htsat_kernels.cpp", Path(scratch) / library.name
            source.write_text(KERNEL_SOURCE)
            command = [compiler, *flags, "-o", str(built), str(source)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed to compile the kernels:\n{result.stderr[-2000:]}")
            os.replace(built, library)  # atomic: processes compiling at once all end with a whole file
    loaded = ctypes.CDLL(str(library))
    ours, pytorch = openmp_runtime(loaded), torch_openmp_runtime()
    if ours is None or ours != pytorch:  # two thread pools would fight over the cores
        raise RuntimeError(f"they would run on the OpenMP runtime {ours}, not on PyTorch's ({pytorch})")
    pointer, long, int_, float_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    loaded.htsat_window_attention.restype = int_
    loaded.htsat_window_attention.argtypes = [pointer] * 6 + [long, int_, int_, int_, long, long, long, long, float_, int_]
    loaded.htsat_vector_width.restype = int_
    loaded.htsat_vector_width.argtypes = []
    loaded.htsat_layer_norm.restype = int_
    loaded.htsat_layer_norm.argtypes = [pointer] * 7 + [long, int_, float_, int_]
    loaded.htsat_bias_gelu.restype = int_
    loaded.htsat_bias_gelu.argtypes = [pointer] * 2 + [long, int_, int_]
    loaded.htsat_merge_norm.restype = int_
    loaded.htsat_merge_norm.argtypes = [pointer] * 4 + [long, long, int_, int_, float_, int_]
    loaded.htsat_copy_rows.restype = int_
    loaded.htsat_copy_rows.argtypes = [pointer] * 4 + [long, int_, int_]
    loaded.htsat_fold_image.restype = int_
    loaded.htsat_fold_image.argtypes = [pointer, long, long, pointer, pointer, int_, pointer, long, int_, int_, int_, int_]
    return loaded


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning saying why) where they cannot be used on this machine."""
    if os.environ.get("HTSAT_HF_NATIVE_KERNELS", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return build_kernels()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        logger.warning(f"HTS-AT's native CPU kernels are off, PyTorch's ops run instead: {error}")
        return None


_switched_off = False  # by `torch_ops_instead()`


@contextlib.contextmanager
def torch_ops_instead():
    """Within this context the kernels are not used: for comparisons in one process, such as the benchmark's."""
    global _switched_off
    previous, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = previous


def _onnx_export_check():
    """`torch.onnx.is_in_onnx_export` without the two imports it makes on every call (0.9 us, asked before every
    kernel and GEMM of CPU inference, about 1500 times per batch-16 pass): the same two flags, read directly where this
    PyTorch has them where that function reads them; the function itself elsewhere."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export
    if not hasattr(_flags, "_is_onnx_exporting") or not hasattr(GLOBALS, "in_onnx_export"):
        return torch.onnx.is_in_onnx_export
    return lambda: bool(GLOBALS.in_onnx_export or _flags._is_onnx_exporting)


in_onnx_export = _onnx_export_check()


def _dispatch_mode_active() -> bool:
    """Whether a TorchDispatchMode (FLOP counting, fake tensors, ...) is watching: it would not see a C call."""
    return torch._C._len_torch_dispatch_stack() > 0


def named_in_profiles(name: str) -> contextlib.AbstractContextManager:
    """`torch.profiler.record_function(name)` while a profiler records, else nothing: opening one costs about 5 us
    even then, several times a small kernel call's own overhead."""
    return torch.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


def kernels_apply(inputs: torch.Tensor, *parameters: torch.Tensor) -> bool:
    """Whether the kernels may run on `inputs` with these parameters: fp32 CPU inference (no gradient wanted for any
    of them), nothing tracing it."""
    return (
        not _switched_off
        and inputs.is_cpu
        and inputs.dtype == torch.float32
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (inputs, *parameters)))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not in_onnx_export()
        and not _dispatch_mode_active()
        and native_library() is not None
    )


def fused_attention_applies(windows: torch.Tensor, num_heads: int, head_dim: int, *parameters: torch.Tensor) -> bool:
    """Whether `window_attention` takes attention over `windows` (windows, tokens, dim) with these heads; `parameters`
    are those its inputs are computed with (the qkv projection's), which must not want gradients either."""
    shape_fits = windows.shape[-2] in ATTENTION_TOKENS and head_dim % 8 == 0 and head_dim <= 64
    return shape_fits and kernels_apply(windows, *parameters)


def window_attention(
    qkv: torch.Tensor,
    mask: torch.Tensor,
    num_heads: int,
    scale: float,
    first_window: int = 0,
    qkv_bias: torch.Tensor | None = None,
    window_masks: torch.Tensor | None = None,
    window_kinds: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v per window and head, for qkv (windows, tokens, 3 * dim) laid out as
    (3, heads, head_dim) along the last axis, and an additive mask (mask_windows, heads, query, key) of which
    window w takes `mask[(first_window + w) % mask_windows]`. Returns the context (windows, tokens, dim).

    `window_masks` (kinds, query, key) with `window_kinds` (period,) int64: a second additive mask, the same for all
    heads, window w adding `window_masks[window_kinds[(first_window + w) % period]]`. Swin's shifted windows take
    few kinds (the interior's, the edges', the corner's): kept apart from the per-head position bias, the masks of a
    chunk stay in cache instead of one per window and head.

    The kernel reads the masks key-major (queries varying fastest in memory): a mask laid out so, such as
    `mask_by_key.transpose(-1, -2)`, is read as it is; any other is copied into that layout on each call.

    `qkv_bias` (3 * dim,): the projection's bias, when `qkv` was computed without it (saving the GEMM a pass that
    writes the bias into its output). The queries get theirs; v's is added to the context, since each query's
    probabilities sum to one; k's changes nothing, since it adds q . b_k to all the scores of a query."""
    windows, tokens, width = qkv.shape
    dim = width // 3
    if qkv.dtype != torch.float32 or mask.dtype != torch.float32:
        raise TypeError(f"window_attention takes float32 tensors, got qkv {qkv.dtype} and mask {mask.dtype}")
    if mask.dim() != 4 or tuple(mask.shape[1:]) != (num_heads, tokens, tokens):
        raise ValueError(f"mask must be (mask_windows, {num_heads}, {tokens}, {tokens}), got {tuple(mask.shape)}")
    if qkv_bias is not None and (qkv_bias.shape != (width,) or qkv_bias.dtype != torch.float32):
        raise ValueError(f"qkv_bias must be float32 of shape ({width},), got {qkv_bias.dtype} {tuple(qkv_bias.shape)}")
    if (window_masks is None) != (window_kinds is None):
        raise ValueError("window_masks and window_kinds go together: pass both or neither")
    if window_masks is not None and (
        window_masks.dtype != torch.float32
        or window_masks.dim() != 3
        or tuple(window_masks.shape[1:]) != (tokens, tokens)
        or window_kinds.dtype != torch.int64
        or window_kinds.dim() != 1
        or window_kinds.numel() == 0
    ):
        raise ValueError(
            f"window_masks must be float32 (kinds, {tokens}, {tokens}) and window_kinds a non-empty 1-D int64 tensor, "
            f"got {window_masks.dtype} {tuple(window_masks.shape)} and {window_kinds.dtype} {tuple(window_kinds.shape)}"
        )
    if first_window < 0:
        raise ValueError(f"first_window must be >= 0, got {first_window}")
    kernels = native_library()
    if kernels is None:
        raise RuntimeError("HTS-AT's native CPU kernels are not available here (see `kernels_apply`)")
    qkv, mask_by_key = qkv.contiguous(), mask.transpose(-1, -2).contiguous()  # (mask_windows, heads, key, query)
    qkv_bias = None if qkv_bias is None else qkv_bias.contiguous()
    kinds_by_key = None if window_masks is None else window_masks.transpose(-1, -2).contiguous()
    window_kinds = None if window_kinds is None else window_kinds.contiguous()
    context = qkv.new_empty(windows, tokens, dim)
    with named_in_profiles("htsat_window_attention"):
        status = kernels.htsat_window_attention(
            qkv.data_ptr(), _pointer(qkv_bias), mask_by_key.data_ptr(), _pointer(kinds_by_key), _pointer(window_kinds),
            context.data_ptr(), windows, tokens, num_heads, dim // num_heads, mask.shape[0],
            0 if window_masks is None else window_masks.shape[0], 0 if window_kinds is None else window_kinds.numel(),
            first_window, scale, torch.get_num_threads(),
        )
    if status == 2:
        raise ValueError(f"window_kinds must index the {window_masks.shape[0]} window_masks, got {window_kinds.tolist()}")
    if status != 0:
        raise ValueError(f"window_attention does not take {tokens} tokens with {dim // num_heads}-wide heads")
    return context


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _norm_fuses(norm: nn.Module, hidden: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the LayerNorm kernel takes `norm` on contiguous fp32 `hidden`, with these other fp32 inputs."""
    if type(norm) is not nn.LayerNorm or not norm.elementwise_affine or len(norm.normalized_shape) != 1:
        return False
    weight, bias = norm.weight, norm.bias  # a module's parameters cost about 0.4 us per access
    others = tuple(t for t in others if t is not None)
    return (
        bias is not None
        and hidden.is_contiguous()
        and weight.dtype == torch.float32
        and all(t.dtype == torch.float32 for t in others)
        and kernels_apply(hidden, weight, bias, *others)
    )


def _check_bias(name: str, bias: torch.Tensor | None, dim: int) -> None:
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"{name} must have shape ({dim},), got {tuple(bias.shape)}")


def layer_norm(
    hidden: torch.Tensor,
    norm: nn.Module,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
    carry_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`norm(hidden)` for an nn.LayerNorm over the last axis. With `residual`, `hidden += residual (+ residual_bias)`
    first; with `carry_bias`, `hidden += carry_bias` after the norm (the bias of a layer whose output is later added
    to `hidden`). Both change `hidden` in place, so it must be a tensor of its own. One pass of the kernel where it
    applies, PyTorch's ops elsewhere."""
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match hidden {tuple(hidden.shape)}")
    if residual is None and residual_bias is not None:
        raise ValueError("residual_bias is the bias of the layer that made `residual`: pass the residual too")
    _check_bias("residual_bias", residual_bias, hidden.shape[-1])
    _check_bias("carry_bias", carry_bias, hidden.shape[-1])
    if not _norm_fuses(norm, hidden, residual, residual_bias, carry_bias):
        if residual is not None:
            hidden += residual if residual_bias is None else residual + residual_bias
        output = norm(hidden)
        if carry_bias is not None:
            hidden += carry_bias
        return output
    added = [None if t is None else t.contiguous() for t in (residual, residual_bias, carry_bias)]
    return _layer_norm_kernel(hidden, norm, torch.empty_like(hidden), *added)


def _layer_norm_kernel(
    hidden: torch.Tensor, norm: nn.Module, output: torch.Tensor, residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None, carry_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LayerNorm kernel on checked, contiguous inputs; `output` may be `hidden` where there is no carry_bias."""
    dim = hidden.shape[-1]
    with named_in_profiles("htsat_layer_norm"):
        native_library().htsat_layer_norm(
            hidden.data_ptr(), *map(_pointer, (residual, residual_bias, carry_bias)), norm.weight.data_ptr(),
            norm.bias.data_ptr(), output.data_ptr(), hidden.numel() // dim, dim, norm.eps, torch.get_num_threads(),
        )
    return output


def bias_gelu_(hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`hidden <- F.gelu(hidden + bias)` in place (exact erf GELU; bias over the last axis, or none), in one pass of the
    kernel where it applies (`hidden` contiguous), PyTorch's ops elsewhere. Returns `hidden`."""
    if bias is not None and bias.shape != hidden.shape[-1:]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match the last axis of hidden {tuple(hidden.shape)}")
    fused = (
        hidden.is_contiguous()
        and hidden.numel() > 0
        and (bias is None or (bias.dtype == torch.float32 and bias.device == hidden.device))
        and kernels_apply(hidden, *(() if bias is None else (bias,)))
    )
    if not fused:
        if bias is not None:
            hidden += bias
        return hidden.copy_(F.gelu(hidden))
    bias = None if bias is None else bias.contiguous()
    cols = hidden.shape[-1]
    with named_in_profiles("htsat_bias_gelu"):
        native_library().htsat_bias_gelu(
            hidden.data_ptr(), _pointer(bias), hidden.numel() // cols, cols, torch.get_num_threads(),
        )
    return hidden


def layer_norm_(hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """`hidden = norm(hidden)` in place (nothing new written where the kernel applies); returns `hidden`."""
    if not _norm_fuses(norm, hidden):
        return hidden.copy_(norm(hidden))
    return _layer_norm_kernel(hidden, norm, hidden)


def merge_norm_applies(hidden: torch.Tensor, norm: nn.Module) -> bool:
    """Whether `merge_norm` takes its kernel for these tokens and this LayerNorm (elsewhere it concatenates the whole
    grid for every call)."""
    return _norm_fuses(norm, hidden)


def merge_norm(
    hidden: torch.Tensor, grid: int, norm: nn.Module, first: int = 0, count: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Swin's patch merging up to its linear layer, for `count` merged tokens from `first` on of the flattened
    (batch * (grid / 2) ** 2) merged grid: the 2 x 2 neighbourhoods of (batch, grid * grid, dim) tokens concatenated
    as (0, 0), (1, 0), (0, 1), (1, 1) (row, column) and LayerNorm'ed over 4 * dim -> (count, 4 * dim), into `out` where
    given. One pass of the kernel where it applies (nothing of the whole concatenation is written), PyTorch's ops
    elsewhere."""
    batch, tokens, dim = hidden.shape
    if grid % 2 or grid * grid != tokens:
        raise ValueError(f"{tokens} tokens are not an even grid of {grid} x {grid}")
    total = batch * (grid // 2) ** 2
    count = total - first if count is None else count
    if not 0 <= first <= first + count <= total:
        raise ValueError(f"merged tokens {first} to {first + count} are outside the {total} there are")
    if out is None:
        out = hidden.new_empty(count, 4 * dim)
    elif out.shape != (count, 4 * dim) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({count}, {4 * dim}) tensor, got {tuple(out.shape)}")
    if not (merge_norm_applies(hidden, norm) and out.dtype == torch.float32):
        image = hidden.reshape(batch, grid, grid, dim)
        parts = [image[:, row::2, column::2] for row, column in ((0, 0), (1, 0), (0, 1), (1, 1))]
        merged = torch.cat(parts, dim=-1).reshape(total, 4 * dim)[first : first + count]
        return out.copy_(norm(merged))
    with named_in_profiles("htsat_merge_norm"):
        native_library().htsat_merge_norm(
            hidden.data_ptr(), norm.weight.data_ptr(), norm.bias.data_ptr(), out.data_ptr(), first, count, grid, dim,
            norm.eps, torch.get_num_threads(),
        )
    return out


def copy_rows(
    source: torch.Tensor,
    target: torch.Tensor,
    source_rows: torch.Tensor | None = None,
    target_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """`target[target_rows] = source[source_rows]` for (rows, dim) tensors and int64 row indices (None: all rows in
    order; the two sides copy the same number of rows). Indices are not bounds-checked by the kernel: callers pass
    the model's own permutations. One threaded pass where the kernel applies (both tensors contiguous fp32),
    PyTorch's `index_select` / `index_copy_` elsewhere. Returns `target`."""
    count = (source if source_rows is None else source_rows).shape[0]
    if count != (target if target_rows is None else target_rows).shape[0]:
        raise ValueError(f"{count} source rows do not match {(target if target_rows is None else target_rows).shape[0]}")
    indices = [t for t in (source_rows, target_rows) if t is not None]
    fused = (
        source.is_contiguous()
        and target.is_contiguous()
        and source.dim() == target.dim() == 2
        and source.shape[1] == target.shape[1]
        and target.dtype == torch.float32
        and all(t.dtype == torch.int64 and t.is_contiguous() and t.device == source.device for t in indices)
        and kernels_apply(source, target)
    )
    if not fused:
        picked = source if source_rows is None else source.index_select(0, source_rows)
        if target_rows is None:
            return target.copy_(picked)
        return target.index_copy_(0, target_rows, picked)
    with named_in_profiles("htsat_copy_rows"):
        native_library().htsat_copy_rows(
            source.data_ptr(), _pointer(source_rows), target.data_ptr(), _pointer(target_rows), count,
            source.shape[1], torch.get_num_threads(),
        )
    return target


@functools.lru_cache(maxsize=16)
def stretch_taps(frames: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, taps) frame indices and weights of the bicubic stretch of `frames` frames to `target` (align_corners,
    as `fold_spectrogram` stretches): taken from `F.interpolate` itself, applied to the identity, so that they are
    PyTorch's own weights, with the taps that clamping at the edges merges counted once. One tap of weight 1 per
    frame where nothing is stretched."""
    if frames == target:
        return torch.arange(target).view(target, 1), torch.ones(target, 1)
    if not 1 < frames < target:
        raise ValueError(f"the stretch takes 2 to {target - 1} frames to {target}, not {frames}")
    identity = torch.eye(frames).view(1, 1, frames, frames)
    weights = F.interpolate(identity, (target, frames), mode="bicubic", align_corners=True).view(target, frames)
    first = (weights != 0).int().argmax(dim=1, keepdim=True)  # each row's taps are 4 consecutive frames, clamped
    index = (first + torch.arange(4)).clamp(max=frames - 1)
    tap_weight = weights.gather(1, index)
    tap_weight[:, 1:][index[:, 1:] == index[:, :-1]] = 0.0  # a frame repeated by clamping is counted once
    if not torch.equal((tap_weight != 0).sum(1), (weights != 0).sum(1)):
        raise RuntimeError("bicubic stretch weights span more than 4 frames")  # PyTorch's kernel changed
    return index.contiguous(), tap_weight.contiguous()


def fold_image_applies(features: torch.Tensor, target: int, ratio: int) -> bool:
    """Whether `fold_image` takes these (batch, 1, frames, mel) features to an image of `target` frames."""
    batch, channels, frames, mel = features.shape
    return (
        channels == 1
        and 1 < frames <= target
        and mel % 8 == 0
        and mel <= 256
        and target % ratio == 0
        and (target // ratio) % 8 == 0
        and kernels_apply(features)
    )


def fold_image(features: torch.Tensor, target: int, ratio: int) -> torch.Tensor:
    """HTS-AT's spectrogram image from (batch, 1, frames, mel) features in one pass: the time axis stretched
    bicubically to `target` frames (`stretch_taps`), cut into `ratio` pieces stacked along frequency ->
    (batch, 1, ratio * mel, target // ratio). `modeling_htsat.fold_spectrogram` with PyTorch's ops makes the same
    image (within float32 rounding) in three passes: `F.interpolate`, a permute and a reshape copy."""
    if not fold_image_applies(features, target, ratio):
        raise ValueError(f"fold_image does not take features {tuple(features.shape)} to {target} frames in {ratio}")
    batch, _, frames, mel = features.shape
    if features.stride(-1) != 1:
        features = features.contiguous()
    index, weight = stretch_taps(frames, target)
    image = features.new_empty(batch, 1, ratio * mel, target // ratio)
    with named_in_profiles("htsat_fold_image"):
        status = native_library().htsat_fold_image(
            features.data_ptr(), features.stride(0), features.stride(2), index.data_ptr(), weight.data_ptr(),
            index.shape[1], image.data_ptr(), batch, target, mel, ratio, torch.get_num_threads(),
        )
    if status != 0:
        raise ValueError(f"the fold_image kernel refused features {tuple(features.shape)}")
    return image


__all__ = [
    "bias_gelu_", "build_kernels", "copy_rows", "fold_image", "fold_image_applies", "fused_attention_applies",
    "kernel_cache_dir", "kernels_apply", "layer_norm", "layer_norm_", "merge_norm", "merge_norm_applies",
    "stretch_taps", "torch_ops_instead", "window_attention",
]
