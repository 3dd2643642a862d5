// y = x @ W^T + b for a few rows of x (fp32, CPU, AVX2 + FMA): the linear layers of a decoding step.
//
// Why: a block-diffusion / speculative step runs every linear layer on 2-8 rows. With one row, MKL's gemv streams
// the weights once at memory speed; with 2-8 rows its AVX2 sgemm path (what AMD EPYC and other CPUs without
// AVX-512 get) costs about twice as much (it packs the weights on every call), so a 2-row step cost 1.7x a 1-row
// step and no decoder that reveals < 1.7 tokens per step could beat the AR model. Here every weight row is read
// once for all rows of x (register tiles of NB weight rows x M input rows), so a few rows cost about one.
//
// dlm/cpu_kernel.py builds this with torch.utils.cpp_extension (-O3 -mavx2 -mfma -fopenmp; at::parallel_for
// runs on torch's own OpenMP pool) and routes nn.Linear calls with <= 8 rows to it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kPrefetch = 256;  // floats ahead in each weight row: ~10% off the 2-4 row cost (measured)
constexpr int64_t kSlice = 96;      // weight rows per slice; every group of 4 input rows reuses it from cache

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// y[m, n0 + b] = x[m, :] . w[n0 + b, :] (+ bias) for m < M, b < NB: NB x M accumulators in registers.
template <int M, int NB>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy, int64_t n0,
                 const float* bias) {
  __m256 acc[NB][M];
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[b][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[M];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      const float* wr = w + (n0 + b) * K + k;
      if ((k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetch), _MM_HINT_T0);
      const __m256 wv = _mm256_loadu_ps(wr);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) acc[b][m] = _mm256_fmadd_ps(wv, xv[m], acc[b][m]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[b][m]);
      for (int64_t kk = k; kk < K; ++kk) s += w[(n0 + b) * K + kk] * x[m * ldx + kk];
      y[m * ldy + n0 + b] = s + (bias ? bias[n0 + b] : 0.f);
    }
}

// Weight rows [n_begin, n_end) for M input rows; the tile width NB keeps NB * M accumulators + M inputs in the
// 16 ymm registers (widths chosen by measurement: 8/4/3/2 for 1/2/3/4 rows).
template <int M>
void rows(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy, const float* bias,
          int64_t n_begin, int64_t n_end) {
  constexpr int NB = M == 1 ? 8 : M == 2 ? 4 : M == 3 ? 3 : 2;
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) tile<M, NB>(x, ldx, w, K, y, ldy, n, bias);
  for (; n < n_end; ++n) tile<M, 1>(x, ldx, w, K, y, ldy, n, bias);
}

at::Tensor small_rows_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "small_rows_linear: x [M, K] and weight [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "small_rows_linear: fp32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_rows_linear: CPU tensors only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "small_rows_linear: 1..", kMaxRows, " rows");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat, "small_rows_linear: bias [N] fp32");
    bc = bias->contiguous();
    bp = bc.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // ~4 chunks of output features per thread, in multiples of 24 (every tile width divides it)
  const int64_t grain = std::max<int64_t>(24, (N / (4 * at::get_num_threads())) / 24 * 24);
  at::parallel_for(0, (N + grain - 1) / grain, 1, [&](int64_t cb, int64_t ce) {
    const int64_t nb = cb * grain, ne = std::min(N, ce * grain);
    for (int64_t n0 = nb; n0 < ne; n0 += kSlice) {
      const int64_t n1 = std::min(ne, n0 + kSlice);
      for (int64_t m = 0; m < M; m += 4) {
        const float* xm = xp + m * K;
        float* ym = yp + m * N;
        switch (std::min<int64_t>(4, M - m)) {
          case 1: rows<1>(xm, K, wp, K, ym, N, bp, n0, n1); break;
          case 2: rows<2>(xm, K, wp, K, ym, N, bp, n0, n1); break;
          case 3: rows<3>(xm, K, wp, K, ym, N, bp, n0, n1); break;
          default: rows<4>(xm, K, wp, K, ym, N, bp, n0, n1); break;
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(dlm_cpu, m) { m.def("small_rows_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(dlm_cpu, CPU, m) { m.impl("small_rows_linear", &small_rows_linear); }
