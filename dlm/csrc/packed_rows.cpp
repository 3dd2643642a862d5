// y = x @ dequant(W)^T + b for a few rows of x (fp32 activations) with weight-only packed int8 / int4 weights.
//
// Why: a decoding step on a CPU is memory-bound: every weight is read once per forward, so its time is the weight
// bytes over the memory bandwidth. Packed weights read 8.5 (int8) or 5 (int4) bits per weight instead of 32, and
// every weight block is unpacked once, in registers, for all (<= 4 per tile, any number per call) rows of x.
// torch's own `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` take 17-40x their memory floor with fp32
// activations on SmolLM2's shapes (bench/linear_kernels.py), so this file does it.
//
// Formats (both: blocks of 32 weights along K, one fp16 scale per group of `group` = 32 * j weights):
//   int8: qweight int8 [N, K]; scales fp16 [N, K / group]; w = q * d                       (GGUF Q8_0 for group 32)
//   int4: qweight uint8 [N, K / 2], byte j of block b holds q[32b + j] (low nibble) and q[32b + 16 + j] (high);
//         scales fp16 [N, K / group, 2] = (d, m); w = q * d + m, q in 0..15                 (GGUF Q4_1 for group 32)
// Paths: 0 = portable C++ (any CPU), 1 = AVX2 + FMA + F16C, 2 = AVX-512 (F, BW, VL); the caller picks (dlm/packed_linear.py:
// torch's CPU capability, so ATEN_CPU_CAPABILITY=default / avx2 selects them as it does for torch's kernels).
// Each output is one fixed-order sum per path whatever the number of rows, so a row does not depend on its batch-mates.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define DLM_X86 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;   // weights per packed block (and the smallest group)
constexpr int64_t kSlice = 64;   // weight rows per slice; each group of 4 input rows reuses it from cache

// The scales of rows [n0, n0 + nb) as fp32, [nb][G * P] (P = 1 for int8, 2 for int4), for broadcast loads.
inline void load_scales(const at::Half* sc, int64_t n0, int64_t nb, int64_t per_row, float* out) {
  const at::Half* p = sc + n0 * per_row;
  for (int64_t i = 0; i < nb * per_row; ++i) out[i] = static_cast<float>(p[i]);
}

// ----- portable path ----------------------------------------------------------------------------------------------
template <bool I4>
void rows_scalar(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, const at::Half* sc,
                 int64_t G, int64_t group, float* y, int64_t ldy, const float* bias, int64_t n_begin, int64_t n_end) {
  constexpr int64_t P = I4 ? 2 : 1;
  std::vector<float> wf(K), s(G * P);
  for (int64_t n = n_begin; n < n_end; ++n) {
    load_scales(sc, n, 1, G * P, s.data());
    const uint8_t* wr = w + n * row_bytes;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / group;
      if (I4) {
        const int64_t b = k / kBlock, j = k % kBlock;
        const uint8_t byte = wr[b * 16 + (j & 15)];
        const int q = j < 16 ? (byte & 15) : (byte >> 4);
        wf[k] = static_cast<float>(q) * s[2 * g] + s[2 * g + 1];
      } else {
        wf[k] = static_cast<float>(static_cast<int8_t>(wr[k])) * s[g];
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};   // 8 interleaved partial sums (the SIMD paths' order, roughly)
      for (int64_t k = 0; k < K; ++k) acc[k & 7] += wf[k] * xm[k];
      float t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
      y[m * ldy + n] = t + (bias ? bias[n] : 0.f);
    }
  }
}

#ifdef DLM_X86
// ----- AVX2 + FMA + F16C ------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// load_scales with F16C, 8 at a time.
inline void load_scales_f16c(const at::Half* sc, int64_t n0, int64_t nb, int64_t per_row, float* out) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(sc + n0 * per_row);
  const int64_t total = nb * per_row;
  int64_t i = 0;
  for (; i + 8 <= total; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  for (; i < total; ++i) out[i] = _cvtsh_ss(p[i]);
}

inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// The 32 weights of one block of one row as 4 x 8 fp32 (dequantized: q * d (+ m)).
template <bool I4>
inline void dequant_avx2(const uint8_t* blk, __m256 d, __m256 mn, __m256 out[4]) {
  if (I4) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    out[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, mn);
    out[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo))), d, mn);
    out[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, mn);
    out[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi))), d, mn);
  } else {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 8 * v));
      out[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
  }
}

// y[m, n0 + b] for m < M, b < NB: NB x M accumulators; each block is unpacked once for the M rows.
template <bool I4, int M, int NB>
inline void tile_avx2(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, const float* s, int64_t G,
                      int64_t group, float* y, int64_t ldy, int64_t n0, const float* bias) {
  constexpr int64_t P = I4 ? 2 : 1, BB = I4 ? 16 : 32;
  __m256 acc[NB][M];
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[b][m] = _mm256_setzero_ps();
  const int64_t per_group = group / kBlock;
  for (int64_t g = 0, kb = 0; g < G; ++g)
   for (int64_t kend = kb + per_group; kb < kend; ++kb) {
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      const uint8_t* blk = w + (n0 + b) * row_bytes + kb * BB;
      if ((kb & (64 / BB - 1)) == 0) _mm_prefetch(reinterpret_cast<const char*>(blk + 1024), _MM_HINT_T0);
      const float* sb = s + b * G * P + g * P;
      __m256 wv[4];
      dequant_avx2<I4>(blk, _mm256_broadcast_ss(sb), I4 ? _mm256_broadcast_ss(sb + 1) : _mm256_setzero_ps(), wv);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v)
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
          acc[b][m] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(x + m * K + kb * kBlock + 8 * v), acc[b][m]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int m = 0; m < M; ++m) y[m * ldy + n0 + b] = hsum8(acc[b][m]) + (bias ? bias[n0 + b] : 0.f);
}

template <bool I4, int M>
void rows_avx2(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, const at::Half* sc, int64_t G,
               int64_t group, float* y, int64_t ldy, const float* bias, int64_t n_begin, int64_t n_end, float* sbuf) {
  constexpr int NB = M == 1 ? 4 : M == 2 ? 4 : M == 3 ? 3 : 2;
  constexpr int64_t P = I4 ? 2 : 1;
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) {
    load_scales_f16c(sc, n, NB, G * P, sbuf);
    tile_avx2<I4, M, NB>(x, K, w, row_bytes, sbuf, G, group, y, ldy, n, bias);
  }
  for (; n < n_end; ++n) {
    load_scales_f16c(sc, n, 1, G * P, sbuf);
    tile_avx2<I4, M, 1>(x, K, w, row_bytes, sbuf, G, group, y, ldy, n, bias);
  }
}
#pragma GCC pop_options

// ----- AVX-512 (F, BW, VL) ----------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

// The 32 weights of one block of one row as 2 x 16 fp32. int4: a 16-entry table per group, T[q] = q * d + m (one
// FMA), indexed by each nibble with one permute (vpermps reads only an index's low 4 bits, so no mask is needed).
template <bool I4>
inline void dequant_avx512(const uint8_t* blk, __m512 d, __m512 mn, __m512 out[2]) {
  if (I4) {
    const __m512 table = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), d, mn);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    out[0] = _mm512_permutexvar_ps(q, table);
    out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
  } else {
    out[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)))), d);
    out[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)))), d);
  }
}

template <bool I4, int M, int NB>
inline void tile_avx512(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, const float* s, int64_t G,
                        int64_t group, float* y, int64_t ldy, int64_t n0, const float* bias) {
  constexpr int64_t P = I4 ? 2 : 1, BB = I4 ? 16 : 32;
  __m512 acc[NB][M];
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[b][m] = _mm512_setzero_ps();
  const int64_t per_group = group / kBlock;
  for (int64_t g = 0, kb = 0; g < G; ++g)
   for (int64_t kend = kb + per_group; kb < kend; ++kb) {
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      const uint8_t* blk = w + (n0 + b) * row_bytes + kb * BB;
      if ((kb & (64 / BB - 1)) == 0) _mm_prefetch(reinterpret_cast<const char*>(blk + 1024), _MM_HINT_T0);
      const float* sb = s + b * G * P + g * P;
      __m512 wv[2];
      dequant_avx512<I4>(blk, _mm512_set1_ps(sb[0]), I4 ? _mm512_set1_ps(sb[1]) : _mm512_setzero_ps(), wv);
#pragma GCC unroll 2
      for (int v = 0; v < 2; ++v)
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
          acc[b][m] = _mm512_fmadd_ps(wv[v], _mm512_loadu_ps(x + m * K + kb * kBlock + 16 * v), acc[b][m]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int m = 0; m < M; ++m) y[m * ldy + n0 + b] = _mm512_reduce_add_ps(acc[b][m]) + (bias ? bias[n0 + b] : 0.f);
}

template <bool I4, int M>
void rows_avx512(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, const at::Half* sc, int64_t G,
                 int64_t group, float* y, int64_t ldy, const float* bias, int64_t n_begin, int64_t n_end,
                 float* sbuf) {
  constexpr int NB = M == 1 ? 8 : M == 2 ? 6 : M == 3 ? 5 : 4;
  constexpr int64_t P = I4 ? 2 : 1;
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) {
    load_scales_f16c(sc, n, NB, G * P, sbuf);
    tile_avx512<I4, M, NB>(x, K, w, row_bytes, sbuf, G, group, y, ldy, n, bias);
  }
  for (; n < n_end; ++n) {
    load_scales_f16c(sc, n, 1, G * P, sbuf);
    tile_avx512<I4, M, 1>(x, K, w, row_bytes, sbuf, G, group, y, ldy, n, bias);
  }
}
#pragma GCC pop_options
#endif  // DLM_X86

template <bool I4>
void run(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t row_bytes, const at::Half* sp, int64_t G,
         int64_t group, float* yp, int64_t N, const float* bp, int64_t path) {
  constexpr int64_t P = I4 ? 2 : 1;
  const int64_t grain = std::max<int64_t>(kSlice, (N / (4 * at::get_num_threads())) / 24 * 24);
  at::parallel_for(0, (N + grain - 1) / grain, 1, [&](int64_t cb, int64_t ce) {
    const int64_t nb = cb * grain, ne = std::min(N, ce * grain);
    if (path == 0) {
      rows_scalar<I4>(xp, M, K, wp, row_bytes, sp, G, group, yp, N, bp, nb, ne);
      return;
    }
#ifdef DLM_X86
    std::vector<float> sbuf(8 * G * P);
    for (int64_t n0 = nb; n0 < ne; n0 += kSlice) {
      const int64_t n1 = std::min(ne, n0 + kSlice);
      for (int64_t m = 0; m < M; m += 4) {
        const float* xm = xp + m * K;
        float* ym = yp + m * N;
        const int64_t mm = std::min<int64_t>(4, M - m);
        if (path == 2) {
          switch (mm) {
            case 1: rows_avx512<I4, 1>(xm, K, wp, row_bytes, sp, G, group, ym, N, bp, n0, n1, sbuf.data()); break;
            case 2: rows_avx512<I4, 2>(xm, K, wp, row_bytes, sp, G, group, ym, N, bp, n0, n1, sbuf.data()); break;
            case 3: rows_avx512<I4, 3>(xm, K, wp, row_bytes, sp, G, group, ym, N, bp, n0, n1, sbuf.data()); break;
            default: rows_avx512<I4, 4>(xm, K, wp, row_bytes, sp, G, group, ym, N, bp, n0, n1, sbuf.data()); break;
          }
        } else {
          switch (mm) {
            case 1: rows_avx2<I4, 1>(xm, K, wp, row_bytes, sp, G, group, ym, N, bp, n0, n1, sbuf.data()); break;
            case 2: rows_avx2<I4, 2>(xm, K, wp, row_bytes, sp, G, group, ym, N, bp, n0, n1, sbuf.data()); break;
            case 3: rows_avx2<I4, 3>(xm, K, wp, row_bytes, sp, G, group, ym, N, bp, n0, n1, sbuf.data()); break;
            default: rows_avx2<I4, 4>(xm, K, wp, row_bytes, sp, G, group, ym, N, bp, n0, n1, sbuf.data()); break;
          }
        }
      }
    }
#endif
  });
}

// The fp32 weight [N, K] a packed weight stands for (the large-M path: torch's GEMM is faster there).
at::Tensor dequantize(const uint8_t* wp, int64_t row_bytes, const at::Half* sp, int64_t N, int64_t K, int64_t G,
                      int64_t group, bool i4) {
  at::Tensor w = at::empty({N, K}, at::kFloat);
  float* out = w.data_ptr<float>();
  const int64_t P = i4 ? 2 : 1;
  at::parallel_for(0, N, 16, [&](int64_t nb, int64_t ne) {
    for (int64_t n = nb; n < ne; ++n) {
      const uint8_t* wr = wp + n * row_bytes;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / group;
        const float d = static_cast<float>(sp[(n * G + g) * P]);
        if (i4) {
          const int64_t j = k % kBlock;
          const uint8_t byte = wr[(k / kBlock) * 16 + (j & 15)];
          const int q = j < 16 ? (byte & 15) : (byte >> 4);
          out[n * K + k] = std::fma(static_cast<float>(q), d, static_cast<float>(sp[(n * G + g) * P + 1]));
        } else {
          out[n * K + k] = static_cast<float>(static_cast<int8_t>(wr[k])) * d;
        }
      }
    }
  });
  return w;
}

// x [..., K] -> [..., N]. Up to kMaxKernelRows rows run the packed kernel; more (a long prefill) torch's linear on the
// dequantized weight.
constexpr int64_t kMaxKernelRows = 32;

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group, int64_t path) {
  TORCH_CHECK(bits == 8 || bits == 4, "packed_linear: bits 8 or 4");
  TORCH_CHECK(group >= kBlock && group % kBlock == 0, "packed_linear: group a multiple of 32");
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "packed_linear: x [..., K] fp32 CPU");
  TORCH_CHECK(qweight.dim() == 2 && qweight.device().is_cpu() && qweight.element_size() == 1,
              "packed_linear: qweight [N, K or K/2] of bytes");
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "packed_linear: fp16 scales");
#ifndef DLM_X86
  path = 0;
#endif
  TORCH_CHECK(path >= 0 && path <= 2, "packed_linear: path 0 (portable), 1 (avx2) or 2 (avx512)");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  const at::Tensor xc = x.reshape({M, K}).contiguous(), wc = qweight.contiguous(), sc = scales.contiguous();
  const int64_t N = wc.size(0);
  TORCH_CHECK(K % group == 0, "packed_linear: K (", K, ") a multiple of the group (", group, ")");
  const int64_t row_bytes = bits == 8 ? K : K / 2, G = K / group;
  TORCH_CHECK(wc.size(1) == row_bytes, "packed_linear: qweight has ", wc.size(1), " bytes a row, expected ", row_bytes);
  TORCH_CHECK(sc.numel() == N * G * (bits == 4 ? 2 : 1), "packed_linear: scales [N, K / group", bits == 4 ? ", 2]" : "]");
  const float* bp = nullptr;
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat, "packed_linear: bias [N] fp32");
    bc = bias->contiguous();
    bp = bc.data_ptr<float>();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  const uint8_t* wp = static_cast<const uint8_t*>(wc.data_ptr());
  if (M > kMaxKernelRows) {
    at::Tensor w = dequantize(wp, row_bytes, sc.data_ptr<at::Half>(), N, K, G, group, bits == 4);
    return at::linear(xc, w, bc.defined() ? c10::optional<at::Tensor>(bc) : c10::nullopt).view(shape);
  }
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y.view(shape);
  if (bits == 4)
    run<true>(xc.data_ptr<float>(), M, K, wp, row_bytes, sc.data_ptr<at::Half>(), G, group, y.data_ptr<float>(), N, bp, path);
  else
    run<false>(xc.data_ptr<float>(), M, K, wp, row_bytes, sc.data_ptr<at::Half>(), G, group, y.data_ptr<float>(), N, bp, path);
  return y.view(shape);
}

// packed_linear(x) + alpha * gate * (x @ a^T) @ b^T: an unmerged LoRA on a packed base in one call (from Python,
// each of these ATen calls costs several microseconds of dispatch; ~10 of them a layer were a third of a step).
// gate [M] (1 = the adapter's row, 0 = the base's) or undefined = every row. A row whose gate is 0 adds alpha * 0,
// so it is the packed layer's result exactly.
at::Tensor packed_linear_lora(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group, int64_t path,
                              const at::Tensor& a, const at::Tensor& b, double alpha,
                              const c10::optional<at::Tensor>& gate) {
  at::Tensor y = packed_linear(x, qweight, scales, bias, bits, group, path);
  const int64_t K = x.size(-1), N = y.size(-1), M = K ? x.numel() / K : 0;
  TORCH_CHECK(a.dim() == 2 && a.size(1) == K && b.dim() == 2 && b.size(0) == N && b.size(1) == a.size(0) &&
              a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "packed_linear_lora: a [r, K], b [N, r] fp32");
  if (M == 0) return y;
  at::Tensor low = at::mm(x.reshape({M, K}), a.t());
  if (gate.has_value() && gate->defined()) {
    TORCH_CHECK(gate->numel() == M, "packed_linear_lora: gate has ", gate->numel(), " entries for ", M, " rows");
    low.mul_(gate->reshape({M, 1}).to(low.scalar_type()));
  }
  y.view({M, N}).addmm_(low, b.t(), 1.0, alpha);
  return y;
}

// ----- a LLaMA-style decoder layer in two calls ------------------------------------------------------------------
// From Python each ATen call costs a few microseconds of dispatch; a decoder layer of transformers is ~50 of them
// plus nine module calls, ~5 ms of a 1-row step over SmolLM2's 30 layers (more than its int4 weights take to read).
// These two ops run the same ATen calls, in the same order, from C++ (the attention itself stays in Python, the
// model's own implementation): the results are transformers' bit for bit where no LoRA runs (dlm/lean_layers.py).

// The LoRA update of the gated rows, in loops without horizontal sums (the compiler vectorizes the inner ones):
//   low[i, :] = gate_i * sum_k x[rows_i, k] * at[k, :]                 at = A^T [K, R] (every member's ranks)
//   y[rows_i, member j] += scale_j * sum_r low[i, r0_j + r] * bt_j[r, :]    bt_j = B_j^T [r_j, n_j]
// Each output is summed in ascending k / r whatever the vector width.
struct LoraArgs {
  const float* x; int64_t K; const int64_t* rows; const float* gate; int64_t Mg;
  const float* at; int64_t R; float* low;
  const std::vector<const float*>* bt; const std::vector<int64_t>* r_of; const std::vector<int64_t>* off;
  const std::vector<int64_t>* r0; const double* scale; float* y; int64_t N;
};

__attribute__((always_inline)) inline void lora_low(const LoraArgs& a, int64_t rb, int64_t re) {
  for (int64_t i = 0; i < a.Mg; ++i) {
    float* __restrict low = a.low + i * a.R;
    for (int64_t r = rb; r < re; ++r) low[r] = 0.f;
    const float* xr = a.x + a.rows[i] * a.K;
    for (int64_t k = 0; k < a.K; ++k) {
      const float xk = xr[k];
      const float* __restrict ak = a.at + k * a.R;
#pragma GCC ivdep
      for (int64_t r = rb; r < re; ++r) low[r] += xk * ak[r];
    }
    for (int64_t r = rb; r < re; ++r) low[r] *= a.gate[i];
  }
}

__attribute__((always_inline)) inline void lora_out(const LoraArgs& a, int64_t j, int64_t nb, int64_t ne) {
  const int64_t rj = (*a.r_of)[j], n_j = ne - nb;
  const float* bt = (*a.bt)[j];
  const int64_t width = (j + 1 < static_cast<int64_t>(a.off->size()) ? (*a.off)[j + 1] : a.N) - (*a.off)[j];
  for (int64_t i = 0; i < a.Mg; ++i) {
    float* __restrict yr = a.y + a.rows[i] * a.N + (*a.off)[j] + nb;
    const float* low = a.low + i * a.R + (*a.r0)[j];
    for (int64_t r = 0; r < rj; ++r) {
      const float c = static_cast<float>(a.scale[j]) * low[r];
      const float* __restrict br = bt + r * width + nb;
#pragma GCC ivdep
      for (int64_t n = 0; n < n_j; ++n) yr[n] += c * br[n];
    }
  }
}

void lora_low_default(const LoraArgs& a, int64_t rb, int64_t re) { lora_low(a, rb, re); }
void lora_out_default(const LoraArgs& a, int64_t j, int64_t nb, int64_t ne) { lora_out(a, j, nb, ne); }
#ifdef DLM_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
void lora_low_avx2(const LoraArgs& a, int64_t rb, int64_t re) { lora_low(a, rb, re); }
void lora_out_avx2(const LoraArgs& a, int64_t j, int64_t nb, int64_t ne) { lora_out(a, j, nb, ne); }
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
void lora_low_avx512(const LoraArgs& a, int64_t rb, int64_t re) { lora_low(a, rb, re); }
void lora_out_avx512(const LoraArgs& a, int64_t j, int64_t nb, int64_t ne) { lora_out(a, j, nb, ne); }
#pragma GCC pop_options
#endif

// A fused packed linear (x2 [M, K] contiguous): packed_linear + the LoRA update of each member j, whose outputs are
// columns [off_j, off_j + n_j): lora = [at (the members' A stacked and transposed, [K, sum r_j]), bt_0 [r_0, n_0],
// bt_1, ...] (B_j transposed) or empty; y[m, member j] += scale_j * gate[m] * (x_m A_j^T) B_j^T. A member with
// r_j = 0 has no adapter. Rows whose gate is 0 are not touched at all (the packed layer's result, as `+ 0` would
// leave it); ATen's mm / addmm per member cost more in dispatch than their arithmetic at a few rows.
at::Tensor fused_linear(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& bias, int64_t bits, int64_t group, int64_t path, at::TensorList lora,
                        at::ArrayRef<double> lora_scales, const c10::optional<at::Tensor>& gate) {
  at::Tensor y = packed_linear(x2, qweight, scales, bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt,
                               bits, group, path);
  const int64_t M = x2.size(0), K = x2.size(1), N = y.size(1);
  if (lora.empty() || M == 0) return y;
  TORCH_CHECK(lora_scales.size() + 1 == lora.size(), "fused_linear: one scale per LoRA member");
  at::Tensor g;
  if (gate.has_value() && gate->defined()) {
    g = gate->to(at::kFloat).contiguous();
    TORCH_CHECK(g.numel() == M, "fused_linear: gate has ", g.numel(), " entries for ", M, " rows");
  }
  std::vector<int64_t> rows;
  std::vector<float> row_gate;
  for (int64_t m = 0; m < M; ++m) {
    const float gm = g.defined() ? g.data_ptr<float>()[m] : 1.f;
    if (gm != 0.f) {
      rows.push_back(m);
      row_gate.push_back(gm);
    }
  }
  const int64_t Mg = static_cast<int64_t>(rows.size());
  if (Mg == 0) return y;
  const at::Tensor& at_ = lora[0];
  TORCH_CHECK(at_.dim() == 2 && at_.size(0) == K && at_.scalar_type() == at::kFloat && at_.is_contiguous(),
              "fused_linear: LoRA A^T [K, sum r] fp32 contiguous");
  const int64_t R = at_.size(1);
  std::vector<const float*> bt;
  std::vector<int64_t> r_of, off, r0;
  int64_t o = 0, rr = 0;
  for (size_t j = 1; j < lora.size(); ++j) {
    const at::Tensor& b = lora[j];
    TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kFloat && b.is_contiguous(),
                "fused_linear: LoRA B^T [r, n] fp32 contiguous");
    bt.push_back(b.data_ptr<float>());
    r_of.push_back(b.size(0));
    off.push_back(o);
    r0.push_back(rr);
    o += b.size(1);
    rr += b.size(0);
  }
  TORCH_CHECK(o == N && rr == R, "fused_linear: the LoRA members cover ", o, " of ", N, " outputs, ", rr, " of ", R,
              " ranks");
  std::vector<float> low(Mg * R);
  const LoraArgs args{x2.data_ptr<float>(), K, rows.data(), row_gate.data(), Mg, at_.data_ptr<float>(), R,
                      low.data(), &bt, &r_of, &off, &r0, lora_scales.data(), y.data_ptr<float>(), N};
  auto low_fn = lora_low_default;
  auto out_fn = lora_out_default;
#ifdef DLM_X86
  if (path == 2) low_fn = lora_low_avx512, out_fn = lora_out_avx512;
  if (path == 1) low_fn = lora_low_avx2, out_fn = lora_out_avx2;
#endif
  at::parallel_for(0, R, 32, [&](int64_t rb, int64_t re) { low_fn(args, rb, re); });
  const int64_t members = static_cast<int64_t>(off.size()), chunk = 256;
  std::vector<std::pair<int64_t, int64_t>> tasks;   // (member, first output of a chunk)
  for (int64_t j = 0; j < members; ++j)
    for (int64_t n = 0; r_of[j] && n < (j + 1 < members ? off[j + 1] : N) - off[j]; n += chunk) tasks.emplace_back(j, n);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t j = tasks[t].first, width = (j + 1 < members ? off[j + 1] : N) - off[j];
      out_fn(args, j, tasks[t].second, std::min(width, tasks[t].second + chunk));
    }
  });
  return y;
}

// transformers' LlamaRMSNorm on fp32: weight * (x * rsqrt(mean(x^2) + eps)).
at::Tensor rms_norm_hf(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return weight * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps));
}

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, h, x.size(-1) - h), x.narrow(-1, 0, h)}, -1);
}

// input norm -> fused q|k|v projection -> rotary embedding: (q, k, v) as [B, heads, T, head_dim], as the model's
// attention module hands them to the cache and the attention function. x [B, T, K] fp32; cos / sin [B, T, hd].
std::tuple<at::Tensor, at::Tensor, at::Tensor> lean_attn_in(
    const at::Tensor& x, const at::Tensor& norm_w, double eps, const at::Tensor& qweight, const at::Tensor& scales,
    const at::Tensor& bias, int64_t bits, int64_t group, int64_t path, at::TensorList lora,
    at::ArrayRef<double> lora_scales, const c10::optional<at::Tensor>& gate, const at::Tensor& cos,
    const at::Tensor& sin, int64_t n_q, int64_t n_kv, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "lean_attn_in: x [B, T, K] fp32");
  const int64_t B = x.size(0), T = x.size(1), K = x.size(2);
  const at::Tensor h = rms_norm_hf(x, norm_w, eps);
  const at::Tensor y = fused_linear(h.reshape({B * T, K}).contiguous(), qweight, scales, bias, bits, group, path,
                                    lora, lora_scales, gate).view({B, T, -1});
  const int64_t nq = n_q * head_dim, nk = n_kv * head_dim;
  TORCH_CHECK(y.size(2) == nq + 2 * nk, "lean_attn_in: the fused projection has ", y.size(2), " outputs");
  const at::Tensor q = y.narrow(2, 0, nq).view({B, T, n_q, head_dim}).transpose(1, 2);
  const at::Tensor k = y.narrow(2, nq, nk).view({B, T, n_kv, head_dim}).transpose(1, 2);
  const at::Tensor v = y.narrow(2, nq + nk, nk).view({B, T, n_kv, head_dim}).transpose(1, 2);
  const at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  return {q * c + rotate_half(q) * s, k * c + rotate_half(k) * s, v};
}

// o projection + residual -> post-attention norm -> fused gate|up -> silu(gate) * up -> down + residual.
// attn [B, T, heads * hd] (contiguous), residual [B, T, K]; weights / scales / biases / lora in the order o, gate|up,
// down (a bias of 0 elements: none); lora_scales: o's, gate's and up's, down's.
at::Tensor lean_mlp_out(const at::Tensor& attn, const at::Tensor& residual, at::TensorList qweights,
                        at::TensorList scales, at::TensorList biases, int64_t bits, int64_t group, int64_t path,
                        at::TensorList lora_o, at::TensorList lora_gu, at::TensorList lora_down,
                        at::ArrayRef<double> lora_scales, const c10::optional<at::Tensor>& gate,
                        const at::Tensor& norm_w, double eps) {
  TORCH_CHECK(qweights.size() == 3 && scales.size() == 3 && biases.size() == 3, "lean_mlp_out: o, gate|up, down");
  TORCH_CHECK(lora_scales.size() == (lora_o.empty() ? 0 : 1) + (lora_gu.empty() ? 0 : 2) +
                                         (lora_down.empty() ? 0 : 1), "lean_mlp_out: one LoRA scale per member");
  const int64_t B = residual.size(0), T = residual.size(1), K = residual.size(2), M = B * T;
  size_t si = 0;
  auto next_scales = [&](const at::TensorList& lora) {
    const size_t n = lora.empty() ? 0 : lora.size() - 1;
    at::ArrayRef<double> out = lora_scales.slice(si, n);
    si += n;
    return out;
  };
  const at::ArrayRef<double> s_o = next_scales(lora_o), s_gu = next_scales(lora_gu), s_d = next_scales(lora_down);
  const at::Tensor hs = residual + fused_linear(attn.reshape({M, attn.size(2)}), qweights[0], scales[0], biases[0],
                                                bits, group, path, lora_o, s_o, gate).view({B, T, K});
  const at::Tensor h = rms_norm_hf(hs, norm_w, eps);
  const at::Tensor g = fused_linear(h.reshape({M, K}).contiguous(), qweights[1], scales[1], biases[1], bits, group,
                                    path, lora_gu, s_gu, gate);
  const int64_t I = g.size(1) / 2;
  const at::Tensor act = at::silu(g.narrow(1, 0, I)) * g.narrow(1, I, I);
  return hs + fused_linear(act, qweights[2], scales[2], biases[2], bits, group, path, lora_down, s_d, gate)
                  .view({B, T, K});
}

}  // namespace

TORCH_LIBRARY(dlm_packed, m) {
  m.def("packed_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int bits, int group, int path) -> Tensor");
  m.def("packed_linear_lora(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int bits, int group, int path, "
        "Tensor a, Tensor b, float alpha, Tensor? gate) -> Tensor");
  m.def("lean_attn_in(Tensor x, Tensor norm_w, float eps, Tensor qweight, Tensor scales, Tensor bias, int bits, "
        "int group, int path, Tensor[] lora, float[] lora_scales, Tensor? gate, Tensor cos, Tensor sin, int n_q, "
        "int n_kv, int head_dim) -> (Tensor, Tensor, Tensor)");
  m.def("lean_mlp_out(Tensor attn, Tensor residual, Tensor[] qweights, Tensor[] scales, Tensor[] biases, int bits, "
        "int group, int path, Tensor[] lora_o, Tensor[] lora_gu, Tensor[] lora_down, float[] lora_scales, "
        "Tensor? gate, Tensor norm_w, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(dlm_packed, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("packed_linear_lora", &packed_linear_lora);
  m.impl("lean_attn_in", &lean_attn_in);
  m.impl("lean_mlp_out", &lean_mlp_out);
}
