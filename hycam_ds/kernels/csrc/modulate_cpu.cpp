// Fused CPU kernel of one layer's HyCAM after its joint projection proj = x [W_shared; A_k; router],
// forward and backward (layer_forward / layer_backward at the bottom; layer_infer, for decoding,
// computes the projection too):
//
//   mid_k = (A_k x) N_k,   w = softmax((logits + gumbel) / tau),   probs = softmax(logits),
//   out = residual + target * A,   A = SiLU(u) + sum_k w_k SiLU(z_k),   z_k = mid_k (scale B_k)
//
// Backward writes the gradient of every proj column (u, A_k x, logits, zero padding) in place.
//
// Why: with torch ops from Python, every chunk of token rows walks the transient [N_s, rows, d]
// expert tensor about ten times in backward (SiLU, products, a reduction, SiLU', ...), each pass
// a separate op with its own Python dispatch. Here each thread takes one contiguous range of
// token rows (deterministic for a given thread count) and walks it in cache-sized chunks: the
// chunk's z = mid B is computed into one reused buffer by register-blocked loops (K = r is tiny:
// the BLAS would run one GEMM per expert per chunk and spend as long setting up as computing),
// then everything elementwise is ONE pass per token row: each z_k element is read once, turned
// into SiLU(z_k), w_k's gradient and z_k's gradient (written in place, then turned into the
// gradients of mid and B). Nothing of size [N_s, T, d] ever exists.
//
// Shapes: residual, target, u, out [T, d] (rows may be strided, elements contiguous; u is a column
// block of proj); mid [T, N, r]; b [N, r, d]; weights [T, N]. u may be absent (no shared module).
// float is the fast path; double exists so that gradcheck tests this very code.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp for float that the compiler vectorises (std::exp stays a scalar libm call without
// -ffast-math; this needs only -fno-math-errno -fno-trapping-math, see fused_cpu.py).
// Cody-Waite reduction to [-ln2/2, ln2/2] and a degree-6 polynomial: relative error ~2 ulp on the
// clamped range, which is all SiLU needs (sigmoid of anything below -87 is 0 to float precision).
// e^(x - n ln2) for x - n ln2 in [-ln2/2, ln2/2]: the part shared by fast_exp and its 8-lane
// fast_exp8 (V = float or f32x8), which differ only in how they round n and build 2^n.
template <typename V>
inline V exp_of_remainder(V x, V n) {
  V r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  V p = V{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float p = exp_of_remainder(x, n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + fast_exp(-x)); }

// Number of contiguous row ranges (one per thread) that split_rows cuts `rows` into.
inline int64_t row_ranges(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
}

// Runs fn(range, begin, end) for each of row_ranges(rows) contiguous ranges of [0, rows), in parallel.
template <typename F>
void split_rows(int64_t rows, const F& fn) {
  const int64_t ranges = row_ranges(rows);
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t begin = rows * r / ranges, end = rows * (r + 1) / ranges;
      if (begin < end) fn(r, begin, end);
    }
  });
}

// Row views of one chunk: row i of a [T, d] operand starts at base + (first + i) * stride.
template <typename T>
struct Rows {
  T* base;
  int64_t stride;
  T* row(int64_t i) const { return base + i * stride; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.numel() ? t.data_ptr<T>() : nullptr, t.numel() ? t.stride(0) : 0};
}

// The small-K products of a chunk, written out rather than left to the BLAS: its batched matmul
// runs one tiny GEMM per expert per chunk, and at K = r = 8 the per-call set-up costs as much as
// the arithmetic.

// z[k, i, :] = mid[first + i, k, :] (scaled_b[k]) for the chunk's rows; mid is [T, N, r].
template <typename T>
void low_rank_chunk(T* __restrict z, const T* __restrict mid, const T* __restrict b, int64_t first, int64_t count,
                    int64_t experts, int64_t rank, int64_t d) {
  for (int64_t k = 0; k < experts; ++k) {
    const T* __restrict bk = b + k * rank * d;
    for (int64_t i = 0; i < count; ++i) {
      const T* __restrict m = mid + ((first + i) * experts + k) * rank;
      T* __restrict zr = z + (k * count + i) * d;
      for (int64_t c = 0; c < d; ++c) {
        T acc = 0;
        for (int64_t j = 0; j < rank; ++j) acc += m[j] * bk[j * d + c];
        zr[c] = acc;
      }
    }
  }
}

// float: four 8-lane accumulators per 32 columns, held in registers over the r terms.
typedef float f32x8 __attribute__((vector_size(32), aligned(4)));

template <>
void low_rank_chunk<float>(float* __restrict z, const float* __restrict mid, const float* __restrict b, int64_t first,
                           int64_t count, int64_t experts, int64_t rank, int64_t d) {
  for (int64_t k = 0; k < experts; ++k) {
    const float* __restrict bk = b + k * rank * d;
    for (int64_t i = 0; i < count; ++i) {
      const float* __restrict m = mid + ((first + i) * experts + k) * rank;
      float* __restrict zr = z + (k * count + i) * d;
      int64_t c0 = 0;
      for (; c0 + 32 <= d; c0 += 32) {
        f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t j = 0; j < rank; ++j) {
          const float* bj = bk + j * d + c0;
          const float mj = m[j];
          a0 += mj * *reinterpret_cast<const f32x8*>(bj);
          a1 += mj * *reinterpret_cast<const f32x8*>(bj + 8);
          a2 += mj * *reinterpret_cast<const f32x8*>(bj + 16);
          a3 += mj * *reinterpret_cast<const f32x8*>(bj + 24);
        }
        *reinterpret_cast<f32x8*>(zr + c0) = a0;
        *reinterpret_cast<f32x8*>(zr + c0 + 8) = a1;
        *reinterpret_cast<f32x8*>(zr + c0 + 16) = a2;
        *reinterpret_cast<f32x8*>(zr + c0 + 24) = a3;
      }
      for (; c0 < d; ++c0) {
        float acc = 0;
        for (int64_t j = 0; j < rank; ++j) acc += m[j] * bk[j * d + c0];
        zr[c0] = acc;
      }
    }
  }
}

// grad_mid[first + i, k, j] = sum_c gz[k, i, c] b[k, j, c]; grad_mid is [T, N, r].
template <typename T>
void grad_mid_chunk(T* __restrict grad_mid, const T* __restrict gz, const T* __restrict b, int64_t first, int64_t count,
                    int64_t experts, int64_t rank, int64_t d) {
  for (int64_t k = 0; k < experts; ++k) {
    const T* __restrict bk = b + k * rank * d;
    for (int64_t i = 0; i < count; ++i) {
      const T* __restrict g = gz + (k * count + i) * d;
      T* __restrict out = grad_mid + ((first + i) * experts + k) * rank;
      for (int64_t j = 0; j < rank; ++j) {
        const T* __restrict bj = bk + j * d;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; ++c) acc += g[c] * bj[c];
        out[j] = acc;
      }
    }
  }
}

inline float horizontal_sum(f32x8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// float: four dot products per pass over the gradient row, 8-lane accumulators in registers.
template <>
void grad_mid_chunk<float>(float* __restrict grad_mid, const float* __restrict gz, const float* __restrict b,
                           int64_t first, int64_t count, int64_t experts, int64_t rank, int64_t d) {
  const int64_t vec_end = d - d % 8;
  for (int64_t k = 0; k < experts; ++k) {
    const float* __restrict bk = b + k * rank * d;
    for (int64_t i = 0; i < count; ++i) {
      const float* __restrict g = gz + (k * count + i) * d;
      float* __restrict out = grad_mid + ((first + i) * experts + k) * rank;
      int64_t j = 0;
      for (; j + 4 <= rank; j += 4) {
        const float *b0 = bk + j * d, *b1 = b0 + d, *b2 = b1 + d, *b3 = b2 + d;
        f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t c = 0; c < vec_end; c += 8) {
          const f32x8 gv = *reinterpret_cast<const f32x8*>(g + c);
          a0 += gv * *reinterpret_cast<const f32x8*>(b0 + c);
          a1 += gv * *reinterpret_cast<const f32x8*>(b1 + c);
          a2 += gv * *reinterpret_cast<const f32x8*>(b2 + c);
          a3 += gv * *reinterpret_cast<const f32x8*>(b3 + c);
        }
        float s0 = horizontal_sum(a0), s1 = horizontal_sum(a1), s2 = horizontal_sum(a2), s3 = horizontal_sum(a3);
        for (int64_t c = vec_end; c < d; ++c) {
          s0 += g[c] * b0[c];
          s1 += g[c] * b1[c];
          s2 += g[c] * b2[c];
          s3 += g[c] * b3[c];
        }
        out[j] = s0;
        out[j + 1] = s1;
        out[j + 2] = s2;
        out[j + 3] = s3;
      }
      for (; j < rank; ++j) {
        const float* bj = bk + j * d;
        float acc = 0;
        for (int64_t c = 0; c < d; ++c) acc += g[c] * bj[c];
        out[j] = acc;
      }
    }
  }
}

// grad_b[k, j, :] += sum_i mid[first + i, k, j] gz[k, i, :] over the chunk's rows.
template <typename T>
void grad_b_chunk(T* __restrict grad_b, const T* __restrict mid, const T* __restrict gz, int64_t first, int64_t count,
                  int64_t experts, int64_t rank, int64_t d) {
  for (int64_t k = 0; k < experts; ++k) {
    for (int64_t i = 0; i < count; ++i) {
      const T* __restrict m = mid + ((first + i) * experts + k) * rank;
      const T* __restrict g = gz + (k * count + i) * d;
      for (int64_t j = 0; j < rank; ++j) {
        T* __restrict gb = grad_b + (k * rank + j) * d;
        for (int64_t c = 0; c < d; ++c) gb[c] += m[j] * g[c];
      }
    }
  }
}

// float: 4 x 16 accumulators in registers over the chunk's rows, one read-modify-write per block.
template <>
void grad_b_chunk<float>(float* __restrict grad_b, const float* __restrict mid, const float* __restrict gz,
                         int64_t first, int64_t count, int64_t experts, int64_t rank, int64_t d) {
  const int64_t vec_end = d - d % 16;
  for (int64_t k = 0; k < experts; ++k) {
    const float* __restrict mk = mid + first * experts * rank + k * rank;  // row i at mk + i * experts * rank
    const float* __restrict gk = gz + k * count * d;
    int64_t j = 0;
    for (; j + 4 <= rank; j += 4) {
      float* gb = grad_b + (k * rank + j) * d;
      for (int64_t c = 0; c < vec_end; c += 16) {
        f32x8 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
        for (int64_t i = 0; i < count; ++i) {
          const float* m = mk + i * experts * rank + j;
          const f32x8 g0 = *reinterpret_cast<const f32x8*>(gk + i * d + c);
          const f32x8 g1 = *reinterpret_cast<const f32x8*>(gk + i * d + c + 8);
          a00 += m[0] * g0; a01 += m[0] * g1;
          a10 += m[1] * g0; a11 += m[1] * g1;
          a20 += m[2] * g0; a21 += m[2] * g1;
          a30 += m[3] * g0; a31 += m[3] * g1;
        }
        f32x8* r0 = reinterpret_cast<f32x8*>(gb + c);
        f32x8* r1 = reinterpret_cast<f32x8*>(gb + d + c);
        f32x8* r2 = reinterpret_cast<f32x8*>(gb + 2 * d + c);
        f32x8* r3 = reinterpret_cast<f32x8*>(gb + 3 * d + c);
        r0[0] += a00; r0[1] += a01;
        r1[0] += a10; r1[1] += a11;
        r2[0] += a20; r2[1] += a21;
        r3[0] += a30; r3[1] += a31;
      }
      for (int64_t c = vec_end; c < d; ++c) {
        for (int64_t q = 0; q < 4; ++q) {
          float acc = 0;
          for (int64_t i = 0; i < count; ++i) acc += mk[i * experts * rank + j + q] * gk[i * d + c];
          gb[q * d + c] += acc;
        }
      }
    }
    for (; j < rank; ++j) {
      float* gb = grad_b + (k * rank + j) * d;
      for (int64_t i = 0; i < count; ++i) {
        const float mj = mk[i * experts * rank + j];
        const float* g = gk + i * d;
        for (int64_t c = 0; c < d; ++c) gb[c] += mj * g[c];
      }
    }
  }
}

// The per-expert work of one token row, the innermost loops of the kernel (N_s x d per row):
//   forward:  a += w_k SiLU(z_k)
//   backward: a += w_k SiLU(z_k); returns d loss / d w_k = sum_c ga_c SiLU(z_k)_c; z_k becomes
//             d loss / d (mid_k B_k) = gz_scale ga SiLU'(z_k), gz_scale = w_k scale.
// The generic versions are the reference (and the float64 path that gradcheck tests); the float
// versions below are written on 8-lane vectors, several times faster than the compiler's own
// vectorisation of these loops (docs/performance.md).
template <typename T>
inline void expert_mix_row(T* __restrict a, const T* __restrict z, T w, int64_t d) {
  for (int64_t c = 0; c < d; ++c) a[c] += w * z[c] * sigmoid(z[c]);
}

template <typename T>
inline T expert_grad_row(T* __restrict z, const T* __restrict ga, T* __restrict a, T w, T gz_scale, int64_t d) {
  T gw = 0;
  for (int64_t c = 0; c < d; ++c) {
    const T zc = z[c];
    const T sg = sigmoid(zc);
    const T e = zc * sg;
    gw += ga[c] * e;
    a[c] += w * e;
    z[c] = gz_scale * ga[c] * sg * (T(1) + zc * (T(1) - sg));
  }
  return gw;
}

typedef int32_t i32x8 __attribute__((vector_size(32), aligned(4)));

inline f32x8 load8(const float* p) { return *reinterpret_cast<const f32x8*>(p); }
inline void store8(float* p, f32x8 v) { *reinterpret_cast<f32x8*>(p) = v; }
inline f32x8 splat8(float x) { return f32x8{} + x; }

// fast_exp on 8 lanes (the same exp_of_remainder); rounding to the nearest integer by the
// 1.5 * 2^23 shifter (exact for |x log2 e| < 2^22, which the clamp guarantees).
inline f32x8 fast_exp8(f32x8 x) {
  x = x < -87.0f ? splat8(-87.0f) : x;
  x = x > 88.0f ? splat8(88.0f) : x;
  const f32x8 shifter = splat8(12582912.0f);
  const f32x8 n = (x * 1.44269504088896341f + shifter) - shifter;
  const f32x8 p = exp_of_remainder(x, n);
  const i32x8 bits = (__builtin_convertvector(n, i32x8) + 127) << 23;
  return p * reinterpret_cast<const f32x8&>(bits);
}

inline f32x8 sigmoid8(f32x8 x) { return 1.0f / (1.0f + fast_exp8(-x)); }

template <>
inline void expert_mix_row<float>(float* __restrict a, const float* __restrict z, float w, int64_t d) {
  const int64_t vec_end = d - d % 8;
  for (int64_t c = 0; c < vec_end; c += 8) {
    const f32x8 zc = load8(z + c);
    store8(a + c, load8(a + c) + w * zc * sigmoid8(zc));
  }
  for (int64_t c = vec_end; c < d; ++c) a[c] += w * z[c] * sigmoid(z[c]);
}

template <>
inline float expert_grad_row<float>(float* __restrict z, const float* __restrict ga, float* __restrict a, float w,
                                    float gz_scale, int64_t d) {
  const int64_t vec_end = d - d % 8;
  f32x8 acc0 = {}, acc1 = {};  // two accumulators: the sum's add latency is not the loop's pace
  int64_t c = 0;
  auto step = [&](int64_t col, f32x8& acc) {
    const f32x8 zc = load8(z + col), g = load8(ga + col);
    const f32x8 sg = sigmoid8(zc);
    const f32x8 e = zc * sg;
    acc += g * e;
    store8(a + col, load8(a + col) + w * e);
    store8(z + col, gz_scale * g * sg * (1.0f + zc * (1.0f - sg)));
  };
  for (; c + 16 <= vec_end; c += 16) {
    step(c, acc0);
    step(c + 8, acc1);
  }
  if (c < vec_end) {
    step(c, acc0);
    c += 8;
  }
  float gw = horizontal_sum(acc0 + acc1);
  for (; c < d; ++c) {
    const float zc = z[c];
    const float sg = sigmoid(zc);
    const float e = zc * sg;
    gw += ga[c] * e;
    a[c] += w * e;
    z[c] = gz_scale * ga[c] * sg * (1.0f + zc * (1.0f - sg));
  }
  return gw;
}

// Forward, one chunk of `count` rows starting at `first` (one thread); z [N, count, d] holds
// mid_k (scale B_k). Adds the chunk's |SiLU(u)| and |specialised| sums to sums[0], sums[1].
template <typename T>
void forward_rows(int64_t first, int64_t count, int64_t d, int64_t experts, const T* z, const T* w,
                  Rows<T> residual, Rows<T> target, Rows<T> u, Rows<T> out, double* sums) {
  std::vector<T> a(d);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t t = first + i;
    T* __restrict ap = a.data();
    for (int64_t c = 0; c < d; ++c) ap[c] = T(0);
    for (int64_t k = 0; k < experts; ++k) {
      const T wk = w[t * experts + k];
      if (wk == T(0)) continue;  // hard routing: only the chosen expert counts in forward
      expert_mix_row<T>(ap, z + (k * count + i) * d, wk, d);
    }
    T spec_acc = 0;
#pragma omp simd reduction(+ : spec_acc)
    for (int64_t c = 0; c < d; ++c) spec_acc += std::abs(ap[c]);
    sums[1] += spec_acc;
    if (u.base) {
      const T* __restrict ur = u.row(t);
      T shared_acc = 0;
#pragma omp simd reduction(+ : shared_acc)
      for (int64_t c = 0; c < d; ++c) {
        const T sh = ur[c] * sigmoid(ur[c]);
        shared_acc += std::abs(sh);
        ap[c] += sh;
      }
      sums[0] += shared_acc;
    }
    const T* __restrict rr = residual.row(t);
    const T* __restrict tr = target.row(t);
    T* __restrict orow = out.row(t);
    for (int64_t c = 0; c < d; ++c) orow[c] = rr[c] + tr[c] * ap[c];
  }
}

// Backward, one chunk (one thread). z [N, count, d] holds mid_k (scale B_k) on entry and
// d loss / d (mid_k B_k) on exit; the caller turns it into the gradients of mid and B (matmuls).
// residual_share = 1 when the target is also the residual (site="attention": out = h + h * A),
// so grad_target carries the whole gradient of h, g * (1 + A), without a separate add pass.
template <typename T>
void backward_rows(int64_t first, int64_t count, int64_t d, int64_t experts, T scale, T* z, const T* w,
                   Rows<T> grad_out, Rows<T> target, Rows<T> u, Rows<T> grad_target, Rows<T> grad_u, T* grad_w,
                   T residual_share) {
  std::vector<T> ga(d), a(d);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t t = first + i;
    T* __restrict gap = ga.data();
    T* __restrict ap = a.data();
    const T* __restrict gr = grad_out.row(t);
    const T* __restrict tr = target.row(t);
    for (int64_t c = 0; c < d; ++c) {
      gap[c] = gr[c] * tr[c];  // d loss / d A
      ap[c] = T(0);
    }
    for (int64_t k = 0; k < experts; ++k) {
      const T wk = w[t * experts + k];
      grad_w[t * experts + k] = expert_grad_row<T>(z + (k * count + i) * d, gap, ap, wk, wk * scale, d);
    }
    if (u.base) {
      const T* __restrict ur = u.row(t);
      T* __restrict gur = grad_u.row(t);
      for (int64_t c = 0; c < d; ++c) {
        const T sg = sigmoid(ur[c]);
        gur[c] = gap[c] * sg * (T(1) + ur[c] * (T(1) - sg));
        ap[c] += ur[c] * sg;
      }
    }
    T* __restrict gtr = grad_target.row(t);
    for (int64_t c = 0; c < d; ++c) gtr[c] = gr[c] * (residual_share + ap[c]);
  }
}

// The joint projection's column layout: [u (d, if shared) | A_k x for all k (N*r) | router logits (N) | zero padding].
struct Layout {
  int64_t u_col;  // -1: no shared module
  int64_t low_col;
  int64_t logit_col;
};

void check_operand(const at::Tensor& t, at::ScalarType dtype, const char* name, bool rows_only) {
  TORCH_CHECK(t.device().is_cpu(), "hycam fused kernel: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, "hycam fused kernel: ", name, " has dtype ", t.scalar_type(), ", expected ",
              dtype);
  if (rows_only) {
    TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, "hycam fused kernel: ", name, " must be [T, d] with contiguous rows");
  } else {
    TORCH_CHECK(t.is_contiguous(), "hycam fused kernel: ", name, " must be contiguous");
  }
}

void check_layer(const at::Tensor& first, const at::Tensor& target, const at::Tensor& proj, const at::Tensor& n,
                 const at::Tensor& b, const Layout& layout) {
  const auto dtype = target.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "hycam fused kernel: float32 or float64 only, got ", dtype);
  check_operand(first, dtype, "residual/grad_out", true);
  check_operand(target, dtype, "target", true);
  check_operand(proj, dtype, "proj", true);
  check_operand(n, dtype, "n", false);
  check_operand(b, dtype, "b", false);
  const int64_t experts = b.size(0), rank = b.size(1), d = b.size(2);
  TORCH_CHECK(n.dim() == 3 && n.size(0) == experts && n.size(1) == rank && n.size(2) == rank,
              "hycam fused kernel: n must be [N, r, r] = [", experts, ", ", rank, ", ", rank, "], got ", n.sizes());
  TORCH_CHECK(target.size(1) == d && first.size(1) == d && first.size(0) == target.size(0),
              "hycam fused kernel: residual/grad_out ", first.sizes(), " and target ", target.sizes(),
              " must both be [T, ", d, "]");
  const int64_t low_col = layout.u_col < 0 ? 0 : d;
  TORCH_CHECK((layout.u_col == 0 || layout.u_col == -1) && layout.low_col == low_col &&
                  layout.logit_col == low_col + experts * rank && proj.size(0) == target.size(0) &&
                  proj.size(1) >= layout.logit_col + experts,
              "hycam fused kernel: proj ", proj.sizes(),
              " does not hold the packed columns [u | A_k x | logits | padding]",
              " (u at ", layout.u_col, ", A_k x at ", layout.low_col, ", logits at ", layout.logit_col, ")");
}

template <typename T>
inline void softmax_row(const T* x, T* y, int64_t n) {
  T top = x[0];
  for (int64_t k = 1; k < n; ++k) top = std::max(top, x[k]);
  T total = 0;
  for (int64_t k = 0; k < n; ++k) total += (y[k] = std::exp(x[k] - top));
  for (int64_t k = 0; k < n; ++k) y[k] /= total;
}

// The router and the N_k products, one pass per token row (N * r * r + a few N operations per row):
//   mid[t, k] = (A_k x)[t] N_k,   weights = softmax((logits + noise) / tau),   probs = softmax(logits),
//   mix = weights, or the one-hot of their argmax when hard (ties: the first, as torch's argmax).
template <typename T>
void route_rows(const at::Tensor& proj, const Layout& layout, const at::Tensor& n, const at::Tensor& noise, T tau,
                bool hard, at::Tensor& mid, at::Tensor& weights, at::Tensor& probs, at::Tensor& mix) {
  const int64_t rows = proj.size(0), stride = proj.stride(0), experts = n.size(0), rank = n.size(1);
  const T* p = proj.data_ptr<T>();
  const T* nw = n.data_ptr<T>();
  const T* g = noise.numel() ? noise.data_ptr<T>() : nullptr;
  T *m = mid.data_ptr<T>(), *w = weights.data_ptr<T>(), *pr = probs.data_ptr<T>(), *mx = mix.data_ptr<T>();
  split_rows(rows, [&](int64_t, int64_t begin, int64_t end) {
    std::vector<T> scores(experts);
    for (int64_t t = begin; t < end; ++t) {
      const T* row = p + t * stride;
      for (int64_t k = 0; k < experts; ++k) {
        const T* low = row + layout.low_col + k * rank;
        const T* nk = nw + k * rank * rank;
        T* out = m + (t * experts + k) * rank;
        for (int64_t i = 0; i < rank; ++i) out[i] = T(0);
        for (int64_t j = 0; j < rank; ++j)
          for (int64_t i = 0; i < rank; ++i) out[i] += low[j] * nk[j * rank + i];
      }
      const T* logits = row + layout.logit_col;
      for (int64_t k = 0; k < experts; ++k) scores[k] = (logits[k] + (g ? g[t * experts + k] : T(0))) / tau;
      softmax_row(scores.data(), w + t * experts, experts);
      softmax_row(logits, pr + t * experts, experts);
      T* mrow = mx + t * experts;
      if (hard) {
        int64_t best = 0;
        for (int64_t k = 1; k < experts; ++k) best = w[t * experts + k] > w[t * experts + best] ? k : best;
        for (int64_t k = 0; k < experts; ++k) mrow[k] = T(k == best);
      } else {
        for (int64_t k = 0; k < experts; ++k) mrow[k] = w[t * experts + k];
      }
    }
  });
}

// Backward of route_rows for one chunk of rows: the gradients of A_k x and of the logits go
// straight into grad_proj's columns (no [T, C] concatenation afterwards), the padding columns get
// zeros, and the chunk's share of grad N_k is added to grad_n (this thread's partial sum).
// grad_mix is d loss / d mix from the modulation; grad_weights_ext and grad_probs_ext are the
// gradients of the weights and probs outputs from elsewhere (the balance loss), or null.
template <typename T>
void route_backward_rows(int64_t first, int64_t count, const T* proj, int64_t stride, const Layout& layout,
                         const T* n, const T* grad_mid, const T* grad_mix, const T* weights, const T* probs,
                         const T* grad_weights_ext, const T* grad_probs_ext, T tau, int64_t experts, int64_t rank,
                         int64_t width, T* grad_proj, T* grad_n) {
  const int64_t logit_end = layout.logit_col + experts;
  for (int64_t t = first; t < first + count; ++t) {
    const T* row = proj + t * stride;
    T* grow = grad_proj + t * stride;
    for (int64_t k = 0; k < experts; ++k) {
      const T* low = row + layout.low_col + k * rank;
      const T* gm = grad_mid + (t * experts + k) * rank;
      const T* nk = n + k * rank * rank;
      T* gl = grow + layout.low_col + k * rank;
      T* gn = grad_n + k * rank * rank;
      for (int64_t j = 0; j < rank; ++j) {  // mid_i = sum_j low_j N[j, i]
        T acc = 0;
        for (int64_t i = 0; i < rank; ++i) {
          acc += gm[i] * nk[j * rank + i];
          gn[j * rank + i] += low[j] * gm[i];
        }
        gl[j] = acc;
      }
    }
    // Softmax backward, twice: weights = softmax(scores), scores = (logits + noise) / tau (hard
    // routing hands the gradient of its one-hot mix straight through to the weights), and
    // probs = softmax(logits).
    const T* w = weights + t * experts;
    const T* gmx = grad_mix + t * experts;
    T dot_w = 0;
    for (int64_t k = 0; k < experts; ++k)
      dot_w += w[k] * (gmx[k] + (grad_weights_ext ? grad_weights_ext[t * experts + k] : T(0)));
    const T* pr = probs + t * experts;
    T dot_p = 0;
    if (grad_probs_ext)
      for (int64_t k = 0; k < experts; ++k) dot_p += pr[k] * grad_probs_ext[t * experts + k];
    T* glog = grow + layout.logit_col;
    for (int64_t k = 0; k < experts; ++k) {
      const T gy = gmx[k] + (grad_weights_ext ? grad_weights_ext[t * experts + k] : T(0));
      T value = w[k] * (gy - dot_w) / tau;
      if (grad_probs_ext) value += pr[k] * (grad_probs_ext[t * experts + k] - dot_p);
      glog[k] = value;
    }
    for (int64_t c = logit_end; c < width; ++c) grow[c] = T(0);  // the padding columns
  }
}

// Each thread takes one contiguous range of token rows and walks it in chunks, so every chunk's z
// is produced and consumed by the same core, in that core's cache (a multi-threaded matmul
// splitting the experts over threads would write z on one core and read it on another).
// fn(range, first, count, z) gets each chunk with z [N, count, d] (a prefix of the thread's own
// buffer) already holding mid_k (scale B_k).
template <typename T, typename F>
void for_each_chunk(const at::Tensor& mid, const at::Tensor& scaled_b, int64_t chunk_elements, const F& fn) {
  const int64_t rows = mid.size(0), experts = mid.size(1), rank = mid.size(2), d = scaled_b.size(2);
  const int64_t step = std::max<int64_t>(1, std::min<int64_t>(rows, chunk_elements / (experts * d)));
  split_rows(rows, [&](int64_t range, int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // grad mode is per thread: worker threads do not inherit the caller's
    std::vector<T> z(experts * std::min(step, end - begin) * d);
    for (int64_t first = begin; first < end; first += step) {
      const int64_t count = std::min(step, end - first);
      low_rank_chunk<T>(z.data(), mid.data_ptr<T>(), scaled_b.data_ptr<T>(), first, count, experts, rank, d);
      fn(range, first, count, z.data());
    }
  });
}

template <typename T>
Rows<T> columns_of(const at::Tensor& proj, int64_t col) {
  return col < 0 ? Rows<T>{nullptr, 0} : Rows<T>{proj.data_ptr<T>() + col, proj.stride(0)};
}

// The whole HyCAM modulation of one layer after its joint projection `proj` (see Layout):
// routing, the N_k products, and out = residual + target * A. noise: [T, N] Gumbel noise, or
// empty (no sampling). Returns out, weights (the router's soft weights), probs (softmax of the
// logits, for the balance loss), mid and mix (saved for backward), and the summed |SiLU(u)| and
// |sum_k w_k SiLU(z_k)| (float64 scalars, for the statistics).
//
// scale_b: B is scaled once per call, a copy every chunk of thousands of training rows reuses;
// otherwise each chunk's z = mid B is scaled after the products, as the paper writes it
// (decoding: a few rows, where writing the scaled copy of every B_k costs more than the
// products). The two orders agree to the bit when scale is a power of two (alpha / rank = 4 at
// the defaults), else to rounding.
std::vector<at::Tensor> modulate_rows(const at::Tensor& residual, const at::Tensor& target, const at::Tensor& proj,
                                      const at::Tensor& n, const at::Tensor& b, const at::Tensor& noise, int64_t u_col,
                                      int64_t low_col, int64_t logit_col, double tau, double scale, bool hard,
                                      int64_t chunk_elements, bool scale_b) {
  const Layout layout{u_col, low_col, logit_col};
  check_layer(residual, target, proj, n, b, layout);
  const int64_t rows = target.size(0), d = target.size(1), experts = b.size(0), rank = b.size(1);
  if (noise.numel()) {
    check_operand(noise, target.scalar_type(), "noise", false);
    TORCH_CHECK(noise.dim() == 2 && noise.size(0) == rows && noise.size(1) == experts,
                "hycam fused kernel: noise must be [T, N] = [", rows, ", ", experts, "], got ", noise.sizes());
  }
  auto out = at::empty({rows, d}, target.options());
  auto mid = at::empty({rows, experts, rank}, target.options());
  auto weights = at::empty({rows, experts}, target.options());
  auto probs = at::empty_like(weights), mix = at::empty_like(weights);
  const auto products_b = scale_b ? b * scale : b;
  std::vector<double> sums(2 * row_ranges(rows), 0.0);
  AT_DISPATCH_FLOATING_TYPES(target.scalar_type(), "hycam_layer_forward", [&] {
    route_rows<scalar_t>(proj, layout, n, noise, static_cast<scalar_t>(tau), hard, mid, weights, probs, mix);
    for_each_chunk<scalar_t>(mid, products_b, chunk_elements,
                             [&](int64_t range, int64_t first, int64_t count, scalar_t* z) {
      if (!scale_b) {
        const scalar_t s = static_cast<scalar_t>(scale);
        for (int64_t i = 0, size = experts * count * d; i < size; ++i) z[i] *= s;
      }
      forward_rows<scalar_t>(first, count, d, experts, z, mix.data_ptr<scalar_t>(), rows_of<scalar_t>(residual),
                             rows_of<scalar_t>(target), columns_of<scalar_t>(proj, u_col), rows_of<scalar_t>(out),
                             sums.data() + 2 * range);
    });
  });
  double shared_sum = 0, spec_sum = 0;
  for (size_t r = 0; r < sums.size(); r += 2) {  // in range order: deterministic
    shared_sum += sums[r];
    spec_sum += sums[r + 1];
  }
  auto opts = at::TensorOptions().dtype(at::kDouble);
  return {out, weights, probs, mid, mix, at::full({}, shared_sum, opts), at::full({}, spec_sum, opts)};
}

std::vector<at::Tensor> layer_forward(at::Tensor residual, at::Tensor target, at::Tensor proj, at::Tensor n,
                                      at::Tensor b, at::Tensor noise, int64_t u_col, int64_t low_col, int64_t logit_col,
                                      double tau, double scale, bool hard, int64_t chunk_elements) {
  return modulate_rows(residual, target, proj, n, b, noise, u_col, low_col, logit_col, tau, scale, hard,
                       chunk_elements, /*scale_b=*/true);
}

// Inference of one layer from x itself: its projection (one product per weight, the outputs side
// by side without padding: concatenating the weights would copy all of them) and layer_forward.
// Why: a decoding step hands over one token row per sequence, and the dozen torch calls from
// Python this replaces cost several times their arithmetic there. No autograd: the caller takes
// this path only when nothing needs a gradient. x, residual and target come as the model holds
// them, [..., d] (flattened to token rows here, where a reshape costs nothing next to Python's).
// Returns out (shaped like residual), and as token rows weights, probs, proj and the two sums of
// layer_forward; z = mid B is scaled after the products (see modulate_rows).
std::vector<at::Tensor> layer_infer(at::Tensor x, at::Tensor residual, at::Tensor target,
                                    std::optional<at::Tensor> w_shared, std::optional<at::Tensor> b_shared,
                                    at::Tensor spec_a, at::Tensor router_w, std::optional<at::Tensor> router_b,
                                    at::Tensor n, at::Tensor b, at::Tensor noise, double tau, double scale, bool hard,
                                    int64_t chunk_elements) {
  at::NoGradGuard no_grad;
  const auto shape = residual.sizes().vec();
  const auto as_rows = [](const at::Tensor& t) {
    auto rows = t.reshape({-1, t.size(-1)});
    return rows.stride(1) == 1 ? rows : rows.contiguous();
  };
  x = as_rows(x), residual = as_rows(residual), target = as_rows(target);
  std::vector<at::Tensor> parts;
  if (w_shared) parts.push_back(at::linear(x, *w_shared, b_shared));
  parts.push_back(at::linear(x, spec_a));
  parts.push_back(at::linear(x, router_w, router_b));
  auto proj = at::cat(parts, 1);
  const int64_t low_col = w_shared ? x.size(1) : 0, logit_col = low_col + b.size(0) * b.size(1);
  auto result = modulate_rows(residual, target, proj, n, b, noise, w_shared ? 0 : -1, low_col, logit_col, tau, scale,
                              hard, chunk_elements, /*scale_b=*/false);
  return {result[0].view(shape), result[1], result[2], proj, result[5], result[6]};
}

// Returns grad_target, grad_proj (every column written: u, A_k x, logits, zeros in the padding),
// grad_n, grad_b. With target_is_residual, grad_target includes the residual's gradient
// (grad_out). grad_weights / grad_probs: the gradients of the forward's weights and probs
// outputs, or empty when nothing used them.
std::vector<at::Tensor> layer_backward(at::Tensor grad_out, at::Tensor grad_weights, at::Tensor grad_probs,
                                       at::Tensor target, at::Tensor proj, at::Tensor n, at::Tensor b, at::Tensor mid,
                                       at::Tensor mix, at::Tensor weights, at::Tensor probs, int64_t u_col,
                                       int64_t low_col, int64_t logit_col, double tau, double scale,
                                       int64_t chunk_elements, bool target_is_residual) {
  const Layout layout{u_col, low_col, logit_col};
  if (grad_out.dim() != 2 || grad_out.stride(1) != 1) grad_out = grad_out.contiguous();
  check_layer(grad_out, target, proj, n, b, layout);
  const int64_t rows = target.size(0), d = target.size(1), experts = b.size(0), rank = b.size(1);
  const auto dtype = target.scalar_type();
  for (auto* t : {&grad_weights, &grad_probs})
    if (t->numel()) *t = t->to(dtype).contiguous();
  auto grad_target = at::empty({rows, d}, target.options());
  auto grad_proj = at::empty_strided(proj.sizes(), {proj.stride(0), 1}, proj.options());
  auto grad_mid = at::empty_like(mid);
  auto grad_mix = at::empty_like(mix);
  auto grad_b_per_range = at::zeros({row_ranges(rows), experts, rank, d}, b.options());
  auto grad_n_per_range = at::zeros({row_ranges(rows), experts, rank, rank}, n.options());
  auto scaled_b = b * scale;
  AT_DISPATCH_FLOATING_TYPES(dtype, "hycam_layer_backward", [&] {
    const scalar_t* gw_ext = grad_weights.numel() ? grad_weights.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp_ext = grad_probs.numel() ? grad_probs.data_ptr<scalar_t>() : nullptr;
    // z is recomputed (nothing per expert was saved), turned into d loss / d (mid B) in place by
    // backward_rows, then into the chunk's share of the gradients of B and mid, and those of mid
    // into the gradients of A_k x, N_k and the logits.
    for_each_chunk<scalar_t>(mid, scaled_b, chunk_elements,
                             [&](int64_t range, int64_t first, int64_t count, scalar_t* z) {
      backward_rows<scalar_t>(first, count, d, experts, static_cast<scalar_t>(scale), z, mix.data_ptr<scalar_t>(),
                              rows_of<scalar_t>(grad_out), rows_of<scalar_t>(target),
                              columns_of<scalar_t>(proj, u_col),
                              rows_of<scalar_t>(grad_target), columns_of<scalar_t>(grad_proj, u_col),
                              grad_mix.data_ptr<scalar_t>(), scalar_t(target_is_residual ? 1 : 0));
      grad_b_chunk<scalar_t>(grad_b_per_range[range].data_ptr<scalar_t>(), mid.data_ptr<scalar_t>(), z, first, count,
                             experts, rank, d);
      grad_mid_chunk<scalar_t>(grad_mid.data_ptr<scalar_t>(), z, b.data_ptr<scalar_t>(), first, count, experts,
                               rank, d);
      route_backward_rows<scalar_t>(first, count, proj.data_ptr<scalar_t>(), proj.stride(0), layout,
                                    n.data_ptr<scalar_t>(), grad_mid.data_ptr<scalar_t>(),
                                    grad_mix.data_ptr<scalar_t>(),
                                    weights.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(), gw_ext, gp_ext,
                                    static_cast<scalar_t>(tau), experts, rank, proj.size(1),
                                    grad_proj.data_ptr<scalar_t>(), grad_n_per_range[range].data_ptr<scalar_t>());
    });
  });
  // Partial sums in range order: deterministic for a given thread count.
  return {grad_target, grad_proj, grad_n_per_range.sum(0), grad_b_per_range.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_forward", &layer_forward, "HyCAM routing + modulation of one layer, forward (CPU, fused)");
  m.def("layer_backward", &layer_backward, "HyCAM routing + modulation of one layer, backward (CPU, fused)");
  m.def("layer_infer", &layer_infer, "HyCAM of one layer from its input, without autograd (CPU, fused)");
}
