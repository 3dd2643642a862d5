// y = x @ dequant(W)^T + b for a few rows of x with weight-only packed int8 / int4 weights and int8 activations.
//
// Why: a decoding step on a CPU is memory-bound only if the arithmetic keeps up. Packed weights read 8.5 (int8) or
// 5 (int4) bits per weight instead of 32, but unpacking each weight to fp32 and multiplying in fp32 made the step
// compute-bound on a 2-core CPU (2.6x its memory floor at 1 row, 5-8x at 4-8 rows). As llama.cpp does, the
// activations are quantized too (per row and block of 32: int8 and one fp32 scale, GGUF's Q8_0), and each block's
// dot products are integer multiply-adds: 64 of them per instruction with AVX-512 VNNI (vpdpbusd), 32 with AVX2
// (vpmaddubsw). The weights of 16 output rows are interleaved (a tile), so a vector's lanes are 16 (8) outputs and
// each block needs no horizontal sum: one int -> float conversion and one FMA per block, row and tile.
//
// What it computes, exactly (the Python reference is dlm/packed_linear.py's `reference_matmul`):
//   x is quantized per row and block b of 32: d_b = max|x| / 127, q_k = round(x_k / d_b) in -127..127 (nearest,
//   ties to even); y[n] = sum_b fma(isum_b, fl(dw_g * d_b), .) (+ fma(mw_g, fl(d_b * sum q), .) for int4) + bias,
//   in ascending b, isum_b = sum of the block's 32 integer products (exact). That is x^ @ dequant(W)^T for the
//   dequantized activations x^ = q * d, with one rounding per block term. Every path (portable C++, AVX2,
//   AVX-512 VNNI) does these same float operations in the same order, so they agree bit for bit, and a row never
//   depends on its batch-mates.
//
// Formats (blocks of 32 weights along K, one fp16 scale per group of `group` = 32 * j weights), stored tile-major:
//   int8: w = q * d, q int8 in -127..127                                               (GGUF Q8_0 for group 32)
//   int4: w = q * d + m, q in 0..15, scales (d, m)                                     (GGUF Q4_1 for group 32)
//   qweight [N, row_bytes] (row_bytes = K int8, K / 2 int4): rows 16t .. 16t + 15 (a tile; the last one may be
//   narrower, width w) hold, per block kb, chunks of 4 weight-bytes per row: [kb][chunk c][row n < w][4 bytes].
//   int8: chunk c holds k = 32 kb + 4c .. +3 (8 chunks); int4: 4 chunks, byte i of chunk c holds k = 32 kb + 4c + i
//   in its low nibble and k + 16 in its high nibble. scales [N, G(, 2)] fp16, per tile [g][(d, m)][row n < w].
//   A tile's bytes are those rows' bytes of the row-major layout, permuted: slicing or concatenating whole tiles
//   along N (multiples of 16 rows) keeps the format.
// Paths: 0 = portable C++ (any CPU), 1 = AVX2 + FMA + F16C, 2 = AVX-512 (F, BW, VL, VNNI); the caller picks
// (dlm/packed_linear.py: torch's CPU capability, so ATEN_CPU_CAPABILITY=default / avx2 selects them as it does for
// torch's kernels).
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

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#define DLM_X86 1
#include <immintrin.h>
#endif

namespace {

// ----- parallel loops that stay fast in any thread ----------------------------------------------------------------
// On the main thread the kernel's loops run on torch's OpenMP team (at::parallel_for). In any other thread they run
// on this pool instead: libgomp keeps a team per thread that starts parallel regions, and once the main thread has
// one, a second thread's team makes more threads than CPUs, whereupon libgomp spins only ~100 times before sleeping,
// so every loop wakes a sleeping thread (~50 us) and a decoding step has ~120 of them (a server's worker thread ran a
// verify forward in 21-27 ms against 13-17 on the main thread, 2-core Xeon). The pool's workers spin ~0.1 ms, then
// wait on a condition variable; calls from several threads take turns. Both split the range into contiguous parts,
// one per thread, and every output is computed the same way by whichever thread.
class KernelPool {
 public:
  template <class F>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
    const int64_t range = end - begin;
    if (range <= 0) return;
    if (threads_ <= 1 || range <= std::max<int64_t>(1, grain)) {
      f(begin, end);
      return;
    }
    std::lock_guard<std::mutex> call(call_mu_);
    const std::function<void(int64_t, int64_t)> job = [&](int64_t b, int64_t e) { f(b, e); };
    job_ = &job;   // every worker takes part in every call, so none can still be reading these in the next one
    begin_ = begin;
    end_ = end;
    chunk_ = (range + threads_ - 1) / threads_;
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(sleep_mu_);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    sleep_cv_.notify_all();
    f(begin, std::min(end, begin + chunk_));
    while (pending_.load(std::memory_order_acquire) != 0) relax();
  }

  // The pool for this process and torch's thread count (a forked child, or a new torch.set_num_threads, starts a
  // new one; an old one is never freed: its detached workers sleep on it until the process ends).
  static KernelPool& get(int threads) {
    static std::mutex mu;
    static KernelPool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lk(mu);
    if (pool == nullptr || owner != getpid() || pool->threads_ != threads) {
      pool = new KernelPool(threads);
      owner = getpid();
    }
    return *pool;
  }

 private:
  explicit KernelPool(int threads) : threads_(threads) {
    for (int i = 1; i < threads; ++i) std::thread([this, i] { loop(i); }).detach();   // worker i: part i
  }

  static void relax() {
#ifdef DLM_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t now;
      int spins = 0;
      while ((now = epoch_.load(std::memory_order_acquire)) == seen) {
        if (++spins < kSpins) {
          relax();
          continue;
        }
        std::unique_lock<std::mutex> lk(sleep_mu_);
        sleep_cv_.wait(lk, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
      }
      seen = now;
      const int64_t b = begin_ + index * chunk_, e = std::min(end_, b + chunk_);
      if (b < e) (*job_)(b, e);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  static constexpr int kSpins = 4000;   // pause instructions before sleeping (~0.1 ms)
  const int threads_;
  std::mutex call_mu_, sleep_mu_;
  std::condition_variable sleep_cv_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 0;
};

// at::parallel_for on the main thread, the pool elsewhere (see above).
template <class F>
void parallel_rows(int64_t begin, int64_t end, int64_t grain, const F& f) {
#ifdef SYS_gettid
  static thread_local const bool main_thread = syscall(SYS_gettid) == getpid();
#else
  static thread_local const bool main_thread = true;
#endif
  if (main_thread) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  KernelPool::get(std::max(1, at::get_num_threads())).parallel_for(begin, end, grain, f);
}

constexpr int64_t kBlock = 32;   // weights per packed block (and the smallest group)
constexpr int64_t kTile = 16;    // weight rows interleaved in a tile
constexpr int64_t kChunk = 4;    // bytes of one row in a chunk (one 32-bit lane)

// Activations quantized per row and block: q [M, K] int8, d [M, KB] fp32, s [M, KB] = sum of the block's q,
// ds = d * s (fp32: the block's sum of x^, for int4's minimum term), s128 = 128 * s (int8 on VNNI).
struct QRows {
  std::vector<int8_t> q;
  std::vector<float> d, ds;
  std::vector<int32_t> s, s128;
  int64_t K = 0, KB = 0;
  int32_t broadcast4(int64_t m, int64_t k) const {   // 4 consecutive int8 as one 32-bit lane
    int32_t v;
    std::memcpy(&v, q.data() + m * K + k, 4);
    return v;
  }
};

// One block of 32: d = max|x| / 127 (NaN propagates), q = nearest(x / d) (x * (1 / d), ties to even, as torch.round).
// Compiled per path below (the compiler vectorizes it); the same fp32 operations everywhere.
__attribute__((always_inline)) inline void quantize_block(const float* x, int8_t* q, float* d_out, int32_t* s_out) {
  float amax = 0.f;
  for (int j = 0; j < kBlock; ++j) {
    const float a = std::fabs(x[j]);
    amax = (a > amax || a != a) ? a : amax;
  }
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  int32_t s = 0;
  for (int j = 0; j < kBlock; ++j) {
    const float r = std::nearbyint(x[j] * id);
    const int v = static_cast<int>(std::min(127.f, std::max(-127.f, r == r ? r : 0.f)));
    q[j] = static_cast<int8_t>(v);
    s += v;
  }
  *d_out = d;
  *s_out = s;
}

__attribute__((always_inline)) inline void quantize_rows_impl(const float* x, int64_t M, int64_t K, QRows& out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < out.KB; ++b)
      quantize_block(x + m * K + b * kBlock, out.q.data() + m * K + b * kBlock, out.d.data() + m * out.KB + b,
                     out.s.data() + m * out.KB + b);
}
void quantize_rows_default(const float* x, int64_t M, int64_t K, QRows& out) { quantize_rows_impl(x, M, K, out); }
#ifdef DLM_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
void quantize_rows_avx2(const float* x, int64_t M, int64_t K, QRows& out) { quantize_rows_impl(x, M, K, out); }
#pragma GCC pop_options
#endif

QRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t path) {
  QRows out;
  out.K = K;
  out.KB = K / kBlock;
  out.q.resize(M * K);
  out.d.resize(M * out.KB);
  out.s.resize(M * out.KB);
#ifdef DLM_X86
  if (path != 0)
    quantize_rows_avx2(x, M, K, out);
  else
#endif
    quantize_rows_default(x, M, K, out);
  out.ds.resize(M * out.KB);
  out.s128.resize(M * out.KB);
  for (int64_t i = 0; i < M * out.KB; ++i) {
    out.ds[i] = out.d[i] * static_cast<float>(out.s[i]);
    out.s128[i] = 128 * out.s[i];
  }
  return out;
}

// The weight of tile row n (of width w) at k, as an integer (int8: -127..127; int4: 0..15).
inline int weight_q(const uint8_t* tw, int64_t w, int64_t k, int64_t n, bool i4) {
  const int64_t kb = k / kBlock, j = k % kBlock;
  if (i4) {
    const int64_t jj = j & 15;
    const uint8_t byte = tw[kb * 16 * w + (jj / kChunk) * kChunk * w + n * kChunk + jj % kChunk];
    return j < 16 ? (byte & 15) : (byte >> 4);
  }
  return static_cast<int8_t>(tw[kb * kBlock * w + (j / kChunk) * kChunk * w + n * kChunk + j % kChunk]);
}

// The first k (within its block) of unpacked chunk c: int4's 4 byte chunks give 8 (c < 4 the low nibbles, k = 4c;
// c >= 4 the high ones, k = 16 + 4 (c - 4)); int8's 8 chunks are k = 4c.
constexpr int64_t chunk_k(int c, bool i4) { return i4 && c >= 4 ? 16 + 4 * (c - 4) : 4 * c; }

// ----- portable path (any tile width: also the narrower last tile on every path) ----------------------------------
template <bool I4>
void tile_scalar(const QRows& a, int64_t M, const uint8_t* tw, const at::Half* ts, int64_t w,
                 int64_t G, int64_t group, float* y, int64_t ldy, int64_t n0, const float* bias) {
  constexpr int64_t P = I4 ? 2 : 1;
  const int64_t per_group = group / kBlock;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < w; ++n) {
      float acc = 0.f;
      for (int64_t kb = 0; kb < a.KB; ++kb) {
        const int64_t g = kb / per_group;
        const float dw = static_cast<float>(ts[(g * P) * w + n]);
        const int8_t* xq = a.q.data() + m * a.K + kb * kBlock;
        int32_t isum = 0;
        for (int64_t j = 0; j < kBlock; ++j) isum += weight_q(tw, w, kb * kBlock + j, n, I4) * xq[j];
        const float da = a.d[m * a.KB + kb];
        acc = std::fma(static_cast<float>(isum), dw * da, acc);
        if (I4) acc = std::fma(static_cast<float>(ts[(g * P + 1) * w + n]), a.ds[m * a.KB + kb], acc);
      }
      y[m * ldy + n0 + n] = acc + (bias ? bias[n0 + n] : 0.f);
    }
}

#ifdef DLM_X86
// ----- AVX2 + FMA + F16C: a tile as two halves of 8 lanes; vpmaddubsw (u8 x s8 -> pairs of int16) ---------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// Rows [m0, m0 + MT) of one half (8 outputs) of a full tile. int4: the 8 chunk products of a block summed in int16
// (each <= 2 * 15 * 127 = 3810: 8 of them fit), then one vpmaddwd; int8: |w| x (x with w's sign), each product pair
// <= 2 * 127 * 127, widened to int32 at once.
template <bool I4, int MT>
inline void half_avx2(const QRows& a, int64_t m0, const uint8_t* tw, const at::Half* ts, int64_t G, int64_t group,
                      int h, float* y, int64_t ldy, int64_t n0, const float* bias) {
  constexpr int64_t P = I4 ? 2 : 1, BB = (I4 ? 16 : 32) * kTile, C = I4 ? 4 : 8;
  const int64_t per_group = group / kBlock;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(15);
  __m256 acc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0, kb = 0; g < G; ++g) {
    const uint16_t* sg = reinterpret_cast<const uint16_t*>(ts) + g * P * kTile + 8 * h;
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg)));
    const __m256 mw = I4 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + kTile)))
                         : _mm256_setzero_ps();
    for (int64_t kend = kb + per_group; kb < kend; ++kb) {
      const uint8_t* wb = tw + kb * BB + 32 * h;
      __m256i wv[8], ws[8];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * c));
        if (I4) {
          wv[c] = _mm256_and_si256(v, low4);
          wv[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        } else {
          wv[c] = _mm256_abs_epi8(v);
          ws[c] = v;
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const int64_t row = m0 + m, k0 = kb * kBlock;
        __m256i isum;
        if (I4) {
          __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 8
          for (int c = 0; c < 8; ++c) {
            const int64_t k = k0 + chunk_k(c, true);
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv[c], _mm256_set1_epi32(a.broadcast4(row, k))));
          }
          isum = _mm256_madd_epi16(s16, ones);
        } else {
          isum = _mm256_setzero_si256();
#pragma GCC unroll 8
          for (int c = 0; c < 8; ++c) {
            const __m256i xs =
                _mm256_sign_epi8(_mm256_set1_epi32(a.broadcast4(row, k0 + chunk_k(c, false))), ws[c]);
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(wv[c], xs), ones));
          }
        }
        const float da = a.d[row * a.KB + kb];
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(da)), acc[m]);
        if (I4) acc[m] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.ds[row * a.KB + kb]), acc[m]);
      }
    }
  }
  const __m256 b = bias ? _mm256_loadu_ps(bias + n0 + 8 * h) : _mm256_setzero_ps();
  for (int m = 0; m < MT; ++m) _mm256_storeu_ps(y + (m0 + m) * ldy + n0 + 8 * h, _mm256_add_ps(acc[m], b));
}

template <bool I4>
void tile_avx2(const QRows& a, int64_t M, const uint8_t* tw, const at::Half* ts, int64_t G, int64_t group, float* y,
               int64_t ldy, int64_t n0, const float* bias) {
  for (int h = 0; h < 2; ++h)
    for (int64_t m = 0; m < M; m += 4) {
      switch (std::min<int64_t>(4, M - m)) {
        case 1: half_avx2<I4, 1>(a, m, tw, ts, G, group, h, y, ldy, n0, bias); break;
        case 2: half_avx2<I4, 2>(a, m, tw, ts, G, group, h, y, ldy, n0, bias); break;
        case 3: half_avx2<I4, 3>(a, m, tw, ts, G, group, h, y, ldy, n0, bias); break;
        default: half_avx2<I4, 4>(a, m, tw, ts, G, group, h, y, ldy, n0, bias); break;
      }
    }
}
#pragma GCC pop_options

// ----- AVX-512 VNNI: a tile in 16 lanes; vpdpbusd (u8 x s8, 4 products a lane, into int32) -------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")

// int8 weights enter vpdpbusd's unsigned operand as q + 128 (xor 0x80); the block's sum then exceeds the true one
// by 128 * sum(x's q), which is subtracted (exactly, in int32).
template <bool I4, int MT>
inline void tile_rows_vnni(const QRows& a, int64_t m0, const uint8_t* tw, const at::Half* ts, int64_t G,
                           int64_t group, float* y, int64_t ldy, int64_t n0, const float* bias) {
  constexpr int64_t P = I4 ? 2 : 1, BB = (I4 ? 16 : 32) * kTile;
  const int64_t per_group = group / kBlock;
  const __m512i low4 = _mm512_set1_epi8(15), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0, kb = 0; g < G; ++g) {
    const uint16_t* sg = reinterpret_cast<const uint16_t*>(ts) + g * P * kTile;
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg)));
    const __m512 mw = I4 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + kTile)))
                         : _mm512_setzero_ps();
    for (int64_t kend = kb + per_group; kb < kend; ++kb) {
      const uint8_t* wb = tw + kb * BB;
      __m512i wv[8];
#pragma GCC unroll 8
      for (int c = 0; c < (I4 ? 4 : 8); ++c) {
        const __m512i v = _mm512_loadu_si512(wb + 64 * c);
        if (I4) {
          wv[c] = _mm512_and_si512(v, low4);
          wv[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        } else {
          wv[c] = _mm512_xor_si512(v, flip);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const int64_t row = m0 + m, k0 = kb * kBlock;
        __m512i part[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};   // two chains: vpdpbusd's latency
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
          const int64_t k = k0 + chunk_k(c, I4);
          part[c & 1] = _mm512_dpbusd_epi32(part[c & 1], wv[c], _mm512_set1_epi32(a.broadcast4(row, k)));
        }
        __m512i isum = _mm512_add_epi32(part[0], part[1]);
        if (!I4) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(a.s128[row * a.KB + kb]));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(a.d[row * a.KB + kb])),
                                 acc[m]);
        if (I4) acc[m] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.ds[row * a.KB + kb]), acc[m]);
      }
    }
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y + (m0 + m) * ldy + n0, _mm512_add_ps(acc[m], b));
}

constexpr int64_t kRowsVnni = 4;   // rows per pass over a tile (8 ran no faster on the 2-core Xeon)
template <bool I4>
void tile_vnni(const QRows& a, int64_t M, const uint8_t* tw, const at::Half* ts, int64_t G, int64_t group, float* y,
               int64_t ldy, int64_t n0, const float* bias) {
  for (int64_t m = 0; m < M; m += kRowsVnni) {
    switch (std::min<int64_t>(kRowsVnni, M - m)) {
      case 1: tile_rows_vnni<I4, 1>(a, m, tw, ts, G, group, y, ldy, n0, bias); break;
      case 2: tile_rows_vnni<I4, 2>(a, m, tw, ts, G, group, y, ldy, n0, bias); break;
      case 3: tile_rows_vnni<I4, 3>(a, m, tw, ts, G, group, y, ldy, n0, bias); break;
      default: tile_rows_vnni<I4, 4>(a, m, tw, ts, G, group, y, ldy, n0, bias); break;
    }
  }
}
#pragma GCC pop_options
#endif  // DLM_X86

// Every tile of the weight, in parallel over tiles; the last (narrower) tile on the portable path.
template <bool I4>
void run(const QRows& a, int64_t M, const uint8_t* wp, int64_t row_bytes, const at::Half* sp, int64_t G,
         int64_t group, float* yp, int64_t N, const float* bp, int64_t path, bool parallel = true) {
  constexpr int64_t P = I4 ? 2 : 1;
  const int64_t tiles = (N + kTile - 1) / kTile;
  const int64_t grain = parallel ? std::max<int64_t>(4, tiles / (4 * at::get_num_threads())) : tiles;
  parallel_rows(0, tiles, grain, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * kTile, w = std::min(kTile, N - n0);
      const uint8_t* tw = wp + n0 * row_bytes;
      const at::Half* ts = sp + n0 * G * P;
#ifdef DLM_X86
      if (w == kTile && path == 2) { tile_vnni<I4>(a, M, tw, ts, G, group, yp, N, n0, bp); continue; }
      if (w == kTile && path == 1) { tile_avx2<I4>(a, M, tw, ts, G, group, yp, N, n0, bp); continue; }
#endif
      tile_scalar<I4>(a, M, tw, ts, w, G, group, yp, N, n0, bp);
    }
  });
}

// x [..., K] -> [..., N], every row on the kernel: a row's result never depends on how many rows share the call (a
// prompt's prefill and a 1-row step compute a position's keys alike, which exact speculative decoding needs).
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
  const QRows a = quantize_rows(xc.data_ptr<float>(), M, K, path);
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return y.view(shape);
  if (bits == 4)
    run<true>(a, M, wp, row_bytes, sc.data_ptr<at::Half>(), G, group, y.data_ptr<float>(), N, bp, path);
  else
    run<false>(a, M, wp, row_bytes, sc.data_ptr<at::Half>(), G, group, y.data_ptr<float>(), N, bp, path);
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
// These two ops do its work from C++ (the attention itself stays in Python, the model's own implementation), the
// glue in plain loops below: transformers' layer within fp32 rounding, every row on its own (dlm/lean_layers.py).

// y [M, N] = x [M, K] @ dequant(W)^T for a packed int8 W (group 32), in this thread: the LoRA's few rows of small
// matrices, where ATen calls and thread hand-offs cost more than the arithmetic.
void int8_rows_serial(const float* x, int64_t M, int64_t K, const at::Tensor& q, const at::Tensor& s, float* y,
                      int64_t path) {
  run<false>(quantize_rows(x, M, K, path), M, static_cast<const uint8_t*>(q.data_ptr()), K, s.data_ptr<at::Half>(),
             K / kBlock, kBlock, y, q.size(0), nullptr, path, false);
}

// A fused packed linear (x2 [M, K] contiguous): packed_linear + the LoRA update of each member j, whose outputs are
// columns [off_j, off_j + n_j): lora = [A (the members' A stacked, [sum r_j, K]) as packed int8 (qweight, scales),
// then per member B_j [n_j, r_j] as packed int8 (qweight, scales)] or empty, ranks padded to multiples of 32 with
// zeros; y[m, member j] += scale_j * gate[m] * B_j (A_j x_m) on the same kernel (int8 weights and rows: the adapter's
// 39 MB of fp32 A and B a forward were a third of a DLM verify step). A member with r_j = 0 has no adapter. Rows
// whose gate is 0 are not touched at all (the packed layer's result, as `+ 0` would leave it).
at::Tensor fused_linear(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& bias, int64_t bits, int64_t group, int64_t path, at::TensorList lora,
                        at::ArrayRef<double> lora_scales, const c10::optional<at::Tensor>& gate) {
  at::Tensor y = packed_linear(x2, qweight, scales, bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt,
                               bits, group, path);
  const int64_t M = x2.size(0), K = x2.size(1), N = y.size(1);
  if (lora.empty() || M == 0) return y;
  TORCH_CHECK(lora.size() >= 4 && lora.size() % 2 == 0 && lora_scales.size() + 1 == lora.size() / 2,
              "fused_linear: LoRA [A q, A scales, B_j q, B_j scales, ...], one scale per member");
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
  const at::Tensor& aq = lora[0];
  const int64_t R = aq.size(0);
  TORCH_CHECK(aq.dim() == 2 && aq.size(1) == K && lora[1].scalar_type() == at::kHalf && lora[1].numel() == R * (K / kBlock),
              "fused_linear: LoRA A packed int8 [sum r, K]");
  std::vector<float> xg(Mg * K), low(Mg * R), part, out;
  const float* xp = x2.data_ptr<float>();
  for (int64_t i = 0; i < Mg; ++i) std::copy(xp + rows[i] * K, xp + (rows[i] + 1) * K, xg.begin() + i * K);
  int8_rows_serial(xg.data(), Mg, K, aq, lora[1], low.data(), path);
  for (int64_t i = 0; i < Mg; ++i)
    for (int64_t r = 0; r < R; ++r) low[i * R + r] *= row_gate[i];
  float* yp = y.data_ptr<float>();
  int64_t off = 0, r0 = 0;
  for (size_t j = 0; j + 1 < lora.size() / 2; ++j) {
    const at::Tensor& bq = lora[2 + 2 * j];
    const int64_t nj = bq.size(0), rj = bq.size(1);
    if (rj > 0) {
      TORCH_CHECK(rj % kBlock == 0 && r0 + rj <= R && lora[3 + 2 * j].numel() == nj * (rj / kBlock),
                  "fused_linear: LoRA B packed int8 [n, r], r a multiple of 32");
      part.resize(Mg * rj);
      out.resize(Mg * nj);
      for (int64_t i = 0; i < Mg; ++i) std::copy(low.begin() + i * R + r0, low.begin() + i * R + r0 + rj, part.begin() + i * rj);
      int8_rows_serial(part.data(), Mg, rj, bq, lora[3 + 2 * j], out.data(), path);
      const float sj = static_cast<float>(lora_scales[j]);
      for (int64_t i = 0; i < Mg; ++i) {
        float* yr = yp + rows[i] * N + off;
        for (int64_t n = 0; n < nj; ++n) yr[n] += sj * out[i * nj + n];
      }
    }
    off += nj;
    r0 += rj;
  }
  TORCH_CHECK(off == N && r0 == R, "fused_linear: the LoRA members cover ", off, " of ", N, " outputs, ", r0, " of ",
              R, " ranks");
  return y;
}

// The layer's glue, row by row in plain loops (ATen calls from C++ still cost ~1-2 us of dispatch each, and ~25 of
// them a layer were a fifth of a 1-row step): each row's result depends on that row alone, in a fixed order of fp32
// operations, so a position gets the same bits in an AR step, a prefill or a verify forward.

// transformers' LlamaRMSNorm on fp32 rows: w * (x * 1 / sqrt(mean(x^2) + eps)); the sum of squares in 8 lanes
// (fixed order), then the lanes in order.
void rms_rows(const float* x, int64_t M, int64_t K, const float* w, float eps, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float lane[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      for (int j = 0; j < 8; ++j) lane[j] += xr[k + j] * xr[k + j];
    float ss = 0.f;
    for (int j = 0; j < 8; ++j) ss += lane[j];
    for (; k < K; ++k) ss += xr[k] * xr[k];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(K) + eps);
    float* o = out + m * K;
    for (k = 0; k < K; ++k) o[k] = w[k] * (xr[k] * r);
  }
}

// Rotary embedding of one head's row (transformers' x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]).
inline void rope_row(const float* x, const float* c, const float* s, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) out[d] = x[d] * c[d] + (-x[d + h]) * s[d];
  for (int64_t d = h; d < D; ++d) out[d] = x[d] * c[d] + x[d - h] * s[d];
}

// input norm -> fused q|k|v projection -> rotary embedding: (q, k, v) as [B, heads, T, head_dim] (contiguous), as the
// model's attention module hands them to the cache and the attention function. x [B, T, K] fp32; cos / sin
// [B or 1, T, hd].
std::tuple<at::Tensor, at::Tensor, at::Tensor> lean_attn_in(
    const at::Tensor& x, const at::Tensor& norm_w, double eps, const at::Tensor& qweight, const at::Tensor& scales,
    const at::Tensor& bias, int64_t bits, int64_t group, int64_t path, at::TensorList lora,
    at::ArrayRef<double> lora_scales, const c10::optional<at::Tensor>& gate, const at::Tensor& cos,
    const at::Tensor& sin, int64_t n_q, int64_t n_kv, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "lean_attn_in: x [B, T, K] fp32");
  const int64_t B = x.size(0), T = x.size(1), K = x.size(2), D = head_dim;
  TORCH_CHECK(norm_w.numel() == K && norm_w.scalar_type() == at::kFloat, "lean_attn_in: norm weight [K] fp32");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(1) == T && cos.size(2) == D &&
              (cos.size(0) == B || cos.size(0) == 1) && cos.scalar_type() == at::kFloat &&
              sin.scalar_type() == at::kFloat, "lean_attn_in: cos / sin [B or 1, T, head_dim] fp32");
  const at::Tensor xc = x.contiguous(), wn = norm_w.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor h = at::empty({B * T, K}, xc.options());
  rms_rows(xc.data_ptr<float>(), B * T, K, wn.data_ptr<float>(), static_cast<float>(eps), h.data_ptr<float>());
  const at::Tensor y = fused_linear(h, qweight, scales, bias, bits, group, path, lora, lora_scales, gate);
  const int64_t nq = n_q * D, nk = n_kv * D, N = nq + 2 * nk;
  TORCH_CHECK(y.size(1) == N, "lean_attn_in: the fused projection has ", y.size(1), " outputs");
  at::Tensor q = at::empty({B, n_q, T, D}, xc.options()), k = at::empty({B, n_kv, T, D}, xc.options()),
             v = at::empty({B, n_kv, T, D}, xc.options());
  const float *yp = y.data_ptr<float>(), *cp = cc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* yr = yp + (b * T + t) * N;
      const int64_t rot = ((cos.size(0) == 1 ? 0 : b) * T + t) * D;
      for (int64_t hd = 0; hd < n_q; ++hd)
        rope_row(yr + hd * D, cp + rot, sp + rot, D, qp + ((b * n_q + hd) * T + t) * D);
      for (int64_t hd = 0; hd < n_kv; ++hd) {
        rope_row(yr + nq + hd * D, cp + rot, sp + rot, D, kp + ((b * n_kv + hd) * T + t) * D);
        std::copy(yr + nq + nk + hd * D, yr + nq + nk + (hd + 1) * D, vp + ((b * n_kv + hd) * T + t) * D);
      }
    }
  return {q, k, v};
}

// o projection + residual -> post-attention norm -> fused gate|up -> silu(gate) * up -> down + residual.
// attn [B, T, heads * hd], residual [B, T, K]; weights / scales / biases / lora in the order o, gate|up, down (a
// bias of 0 elements: none); lora_scales: o's, gate's and up's, down's.
at::Tensor lean_mlp_out(const at::Tensor& attn, const at::Tensor& residual, at::TensorList qweights,
                        at::TensorList scales, at::TensorList biases, int64_t bits, int64_t group, int64_t path,
                        at::TensorList lora_o, at::TensorList lora_gu, at::TensorList lora_down,
                        at::ArrayRef<double> lora_scales, const c10::optional<at::Tensor>& gate,
                        const at::Tensor& norm_w, double eps) {
  TORCH_CHECK(qweights.size() == 3 && scales.size() == 3 && biases.size() == 3, "lean_mlp_out: o, gate|up, down");
  TORCH_CHECK(lora_scales.size() == (lora_o.empty() ? 0 : 1) + (lora_gu.empty() ? 0 : 2) +
                                         (lora_down.empty() ? 0 : 1), "lean_mlp_out: one LoRA scale per member");
  TORCH_CHECK(residual.dim() == 3 && residual.scalar_type() == at::kFloat, "lean_mlp_out: residual [B, T, K] fp32");
  const int64_t B = residual.size(0), T = residual.size(1), K = residual.size(2), M = B * T;
  TORCH_CHECK(norm_w.numel() == K && norm_w.scalar_type() == at::kFloat, "lean_mlp_out: norm weight [K] fp32");
  size_t si = 0;
  auto next_scales = [&](const at::TensorList& lora) {
    const size_t n = lora.empty() ? 0 : lora.size() / 2 - 1;   // [A q, A scales, (B_j q, B_j scales)...]
    at::ArrayRef<double> out = lora_scales.slice(si, n);
    si += n;
    return out;
  };
  const at::ArrayRef<double> s_o = next_scales(lora_o), s_gu = next_scales(lora_gu), s_d = next_scales(lora_down);
  const at::Tensor res = residual.contiguous(), wn = norm_w.contiguous();
  at::Tensor hs = fused_linear(attn.reshape({M, attn.size(2)}).contiguous(), qweights[0], scales[0], biases[0], bits,
                               group, path, lora_o, s_o, gate);
  TORCH_CHECK(hs.size(1) == K, "lean_mlp_out: o projection has ", hs.size(1), " outputs for a residual of ", K);
  float* hp = hs.data_ptr<float>();
  const float* rp = res.data_ptr<float>();
  for (int64_t i = 0; i < M * K; ++i) hp[i] = rp[i] + hp[i];
  at::Tensor h = at::empty({M, K}, res.options());
  rms_rows(hp, M, K, wn.data_ptr<float>(), static_cast<float>(eps), h.data_ptr<float>());
  const at::Tensor g = fused_linear(h, qweights[1], scales[1], biases[1], bits, group, path, lora_gu, s_gu, gate);
  const int64_t I = g.size(1) / 2;
  at::Tensor act = at::silu(g.narrow(1, 0, I)).contiguous();   // ATen's vectorized exp (a scalar exp costs more)
  float* ap = act.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < I; ++i) ap[m * I + i] = ap[m * I + i] * gp[m * 2 * I + I + i];
  at::Tensor out = fused_linear(act, qweights[2], scales[2], biases[2], bits, group, path, lora_down, s_d, gate);
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < M * K; ++i) op[i] = hp[i] + op[i];
  return out.view({B, T, K});
}

// ----- attention whose every row is the same bits however it is called ------------------------------------------
// With int8 rows in the packed kernel, a last-bit difference in one position's attention output can round an
// activation to its neighbouring step and grow from there, so exact speculative decoding (an AR step and a verify
// forward computing the same position) needs each row's attention to depend on its own query and allowed keys only:
// not on the other rows of the call, nor on keys its mask hides (torch's SDPA blocks its GEMMs by the call's shape).
// Per (batch, head, row): each key's score as a dot product over the head dimension in 16 fixed lanes, summed in a
// fixed order (the cache's keys read where they lie: no transposed copy per call), the softmax over the allowed keys
// in ascending order (std::exp), and sum_j p_j v_j in ascending j.
struct AttnArgs {
  const float *q, *k, *v; const bool* mask; int64_t mask_b, B, H, Hkv, Q, K, D; float scale; float* out;
};

__attribute__((always_inline)) inline void attn_rows(const AttnArgs& a, int64_t begin, int64_t end) {
  std::vector<float> s(a.K), o(a.D);
  const int64_t groups = a.H / a.Hkv;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t i = item % a.Q, h = (item / a.Q) % a.H, b = item / (a.Q * a.H), g = h / groups;
    const float* qi = a.q + ((b * a.H + h) * a.Q + i) * a.D;
    const float* k = a.k + (b * a.Hkv + g) * a.K * a.D;      // [K, D]
    const float* v = a.v + (b * a.Hkv + g) * a.K * a.D;      // [K, D]
    const bool* allowed = a.mask ? a.mask + ((b % a.mask_b) * a.Q + i) * a.K : nullptr;
    const int64_t last = allowed ? a.K : a.K - a.Q + i + 1;   // no mask: causal, the rows the last Q positions
    float* __restrict sc = s.data();
    for (int64_t j = 0; j < last; ++j) {
      const float* __restrict kj = k + j * a.D;
      float lane[16] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t d = 0;
      for (; d + 16 <= a.D; d += 16)
        for (int l = 0; l < 16; ++l) lane[l] += qi[d + l] * kj[d + l];
      for (; d < a.D; ++d) lane[d % 16] += qi[d] * kj[d];
      for (int w = 8; w >= 1; w /= 2)                        // lanes summed pairwise, always the same tree
        for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
      sc[j] = lane[0];
    }
    float m = -INFINITY;
    for (int64_t j = 0; j < last; ++j)
      if (!allowed || allowed[j]) m = std::max(m, sc[j] * a.scale);
    float* __restrict oi = o.data();
    for (int64_t d = 0; d < a.D; ++d) oi[d] = 0.f;
    float sum = 0.f;
    if (m != -INFINITY) {
      for (int64_t j = 0; j < last; ++j) {
        if (allowed && !allowed[j]) continue;
        const float e = std::exp(sc[j] * a.scale - m);
        sum += e;
        const float* __restrict vj = v + j * a.D;
#pragma GCC ivdep
        for (int64_t d = 0; d < a.D; ++d) oi[d] += e * vj[d];
      }
    }
    float* dst = a.out + ((b * a.Q + i) * a.H + h) * a.D;   // [B, Q, H, D]
    const float inv = sum > 0.f ? 1.f / sum : 0.f;          // a row that may see nothing: zeros
    for (int64_t d = 0; d < a.D; ++d) dst[d] = oi[d] * inv;
  }
}
void attn_rows_default(const AttnArgs& a, int64_t b, int64_t e) { attn_rows(a, b, e); }
#ifdef DLM_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
void attn_rows_avx2(const AttnArgs& a, int64_t b, int64_t e) { attn_rows(a, b, e); }
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
void attn_rows_avx512(const AttnArgs& a, int64_t b, int64_t e) { attn_rows(a, b, e); }
#pragma GCC pop_options
#endif

// q [B, H, Q, D], k / v [B, Hkv, K, D] (H a multiple of Hkv), mask bool [B or 1, 1, Q, K] (True = may attend) or
// none (causal: row i sees keys up to K - Q + i) -> [B, Q, H, D].
at::Tensor row_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask, double scale, int64_t path) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.scalar_type() == at::kFloat &&
              k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "row_attention: fp32 [B, H, T, D]");
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3), Hkv = k.size(1), K = k.size(2);
  TORCH_CHECK(H % Hkv == 0 && k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D && K >= Q,
              "row_attention: q [B, H, Q, D], k / v [B, Hkv, K >= Q, D]");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor mc;
  int64_t mask_b = 1;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(1) == 1 && mask->size(2) == Q &&
                mask->size(3) == K && (mask->size(0) == 1 || mask->size(0) == B),
                "row_attention: a bool mask [B or 1, 1, Q, K]");
    mc = mask->contiguous();
    mask_b = mc.size(0);
  }
  at::Tensor out = at::empty({B, Q, H, D}, q.options());
  const AttnArgs args{qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                      mc.defined() ? mc.data_ptr<bool>() : nullptr, mask_b, B, H, Hkv, Q, K, D,
                      static_cast<float>(scale), out.data_ptr<float>()};
  auto fn = attn_rows_default;
#ifdef DLM_X86
  if (path == 2) fn = attn_rows_avx512;
  if (path == 1) fn = attn_rows_avx2;
#endif
  // a decoding step's few rows in one thread (a thread hand-off costs more than their arithmetic)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, K * D));
  parallel_rows(0, B * H * Q, grain, [&](int64_t b, int64_t e) { fn(args, b, e); });
  return out;
}

// ----- top-p (nucleus) filtering without sorting the vocabulary ------------------------------------------------
// transformers' TopPLogitsWarper removes a token when the tokens more probable than it hold >= top_p of the mass
// (from its full sort of the vocabulary: ~3.4 ms a row for 49,152 tokens on a 2-core CPU). If the tokens above a
// probability t hold more than top_p, no token at or below t is kept, so only those candidates are sorted.
// scores / probs [N, V] (probs = softmax(scores)) -> (scores with the removed tokens set to filter_value, decided
// [N]): a row no threshold bounds (the nucleus may reach below the last one) is left as it was and not decided, for
// the caller's full sort. The masses are summed in double.
std::tuple<at::Tensor, at::Tensor> nucleus_filter(const at::Tensor& scores, const at::Tensor& probs, double top_p,
                                                  int64_t min_keep, double filter_value) {
  TORCH_CHECK(scores.dim() == 2 && probs.sizes() == scores.sizes() && scores.scalar_type() == at::kFloat &&
              probs.scalar_type() == at::kFloat, "nucleus_filter: scores and probs [N, V] fp32");
  const int64_t N = scores.size(0), V = scores.size(1);
  const at::Tensor sc = scores.contiguous(), pc = probs.contiguous();
  at::Tensor out = at::empty_like(sc), decided = at::zeros({N}, scores.options().dtype(at::kBool));
  const float *pp = pc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  bool* dp = decided.data_ptr<bool>();
  const float fv = static_cast<float>(filter_value);
  std::vector<int32_t> wide, cand;
  for (int64_t n = 0; n < N; ++n) {
    const float *p = pp + n * V, *src = sp + n * V;
    float* row = op + n * V;
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0}, total = 0.0;
    int64_t v = 0;
    for (; v + 8 <= V; v += 8)
      for (int j = 0; j < 8; ++j) lane[j] += p[v + j];
    for (int j = 0; j < 8; ++j) total += lane[j];
    for (; v < V; ++v) total += p[v];
    wide.clear();
    for (v = 0; v < V; ++v)
      if (p[v] > 1e-6f) wide.push_back(static_cast<int32_t>(v));
    size_t kept = 0;
    bool ok = false;
    for (const float t : {1e-4f, 1e-6f}) {          // the narrow candidates first; most rows need no more
      cand.clear();
      for (const int32_t i : wide)
        if (p[i] > t) cand.push_back(i);
      std::sort(cand.begin(), cand.end(), [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      double above = 0.0;
      for (kept = 0; kept < cand.size(); ++kept) {
        if (static_cast<int64_t>(kept) >= min_keep && !(total - above > 1.0 - top_p)) break;
        above += p[cand[kept]];
      }
      // decided if the nucleus ended among the candidates, or right after them (every token below t has all of
      // them above it); else it may reach below t
      if (kept < cand.size() || (static_cast<int64_t>(kept) >= min_keep && !(total - above > 1.0 - top_p))) {
        ok = true;
        break;
      }
    }
    if (!ok) {
      std::copy(src, src + V, row);
      continue;
    }
    std::fill(row, row + V, fv);
    for (size_t i = 0; i < kept; ++i) row[cand[i]] = src[cand[i]];
    dp[n] = true;
  }
  return {out, decided};
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
  m.def("row_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int path) -> Tensor");
  m.def("nucleus_filter(Tensor scores, Tensor probs, float top_p, int min_keep, float filter_value) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(dlm_packed, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("packed_linear_lora", &packed_linear_lora);
  m.impl("lean_attn_in", &lean_attn_in);
  m.impl("lean_mlp_out", &lean_mlp_out);
  m.impl("row_attention", &row_attention);
  m.impl("nucleus_filter", &nucleus_filter);
}
