// Small-batch bfloat16 matmul for XLA:CPU, registered as an XLA FFI custom call.
//
//   y[m, n] (float32) = x[m, k] (bfloat16) . W[k, n] (bfloat16), float32 accumulation.
//
// W arrives pre-packed (jaxaccel/backends/cpu/packed.py) as [n/64, k/2, 4, 16, 2]: a group of 64
// output columns is one contiguous stream; in it, each pair of k rows is 4 lines of 64 bytes,
// one per panel of 16 columns, and each line is exactly one AVX512-BF16 `vdpbf16ps` operand
// (16 columns x 2 k). W[k, n] in its natural layout would put 2n bytes between the pieces a
// tile needs from each k row, and separate streams per panel restart the CPU's prefetchers
// every few pages (measured: one stream per group read ~1.2x faster than one per panel).
//
// Decode steps are matrix-vector products, bound by reading W once; the work is split over
// XLA's intra-op thread pool (parallel_chunks.h) because one core cannot pull the machine's
// memory bandwidth.
// scripts/bench_bf16_matmul.py measures it against XLA's own bf16 dot.

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "bf16_dot.h"
#include "parallel_chunks.h"
#include "row_tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;   // output columns per 64-byte line
constexpr int64_t kPanels = 4;   // lines (panels) per pair of k rows in a group
constexpr int64_t kGroupWords = kPanels * kPanel;  // uint32 pairs per k pair of a group
constexpr int64_t kPrefetchPairs = 12;  // software prefetch distance, in k pairs (3 KiB)
// Work is handed out in chunks of whole groups, about kChunks per call: small enough that
// two threads finish together on a 768-wide weight (12 groups), large enough to keep
// claiming cheap.
constexpr int64_t kChunks = 16;
// x rows as (bf16, bf16) pairs along k, one uint32 per pair: the broadcast operand of
// vdpbf16ps and of the portable loop alike.
struct Problem {
  const uint32_t* x_pairs;  // [m, k/2]
  const uint32_t* w_lines;  // [n/64, k/2, 4, 16] pairs
  float* y;                 // [m, n]
  int64_t m, half_k, n;
};

inline float bf16_low(uint32_t pair) {  // the even-k element of a pair, as float32
  uint32_t bits = pair << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_high(uint32_t pair) {  // the odd-k element
  uint32_t bits = pair & 0xFFFF0000u;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(__AVX512F__)
inline __m512 dot_pairs(__m512 acc, __m512i w, __m512i x) {
  return jaxaccel::bf16_dot_pairs(acc, x, w);
}

// ROWS rows of x against one group: ROWS x 4 accumulators of 16 columns in registers, each
// broadcast of x feeding 4 `vdpbf16ps` (the broadcast loads are the limit once m is large).
// 6 rows keep 24 accumulators, 4 lines and a broadcast within the 32 vector registers.
template <int ROWS>
void group_tile(const Problem& p, int64_t row0, int64_t group) {
  __m512 acc[ROWS][kPanels];
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < kPanels; ++q) acc[r][q] = _mm512_setzero_ps();
  const uint32_t* w = p.w_lines + group * p.half_k * kGroupWords;
  const uint32_t* x = p.x_pairs + row0 * p.half_k;
  for (int64_t i = 0; i < p.half_k; ++i, w += kGroupWords) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchPairs * kGroupWords), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchPairs * kGroupWords + 32),
                 _MM_HINT_T0);
    __m512i line[kPanels];
    for (int q = 0; q < kPanels; ++q) line[q] = _mm512_loadu_si512(w + q * kPanel);
    for (int r = 0; r < ROWS; ++r) {
      __m512i xr = _mm512_set1_epi32(x[r * p.half_k + i]);
      for (int q = 0; q < kPanels; ++q) acc[r][q] = dot_pairs(acc[r][q], line[q], xr);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < kPanels; ++q)
      _mm512_storeu_ps(p.y + (row0 + r) * p.n + (group * kPanels + q) * kPanel, acc[r][q]);
}
constexpr int kTileRows = 6;
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 + FMA (x86-64-v3): each 64-byte line is two ymm of 8 (even k, odd k) pairs, widened to
// float32 in registers (a bf16 is the top half of a float32) for two FMAs per half. With 16
// ymm registers a tile keeps ROWS x LINES x 2 <= 8 accumulators: one row against all 4 lines
// (decode: the group stream is read once), or up to 4 rows against fewer lines, the stream
// read again per pass (it stays in L2: k/2 x 256 bytes).
template <int ROWS, int LINES>
void panel_tile(const Problem& p, int64_t row0, int64_t group, int q0) {
  __m256 acc[ROWS][LINES][2];
  for (int r = 0; r < ROWS; ++r)
    for (int l = 0; l < LINES; ++l) acc[r][l][0] = acc[r][l][1] = _mm256_setzero_ps();
  const uint32_t* w = p.w_lines + group * p.half_k * kGroupWords + q0 * kPanel;
  const uint32_t* x = p.x_pairs + row0 * p.half_k;
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t i = 0; i < p.half_k; ++i, w += kGroupWords) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchPairs * kGroupWords), _MM_HINT_T0);
    __m256 w_lo[LINES][2], w_hi[LINES][2];
    for (int l = 0; l < LINES; ++l)
      for (int h = 0; h < 2; ++h) {
        __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + l * kPanel + h * 8));
        w_lo[l][h] = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
        w_hi[l][h] = _mm256_castsi256_ps(_mm256_and_si256(bits, high));
      }
    for (int r = 0; r < ROWS; ++r) {
      uint32_t pair = x[r * p.half_k + i];
      __m256 x_lo = _mm256_set1_ps(bf16_low(pair)), x_hi = _mm256_set1_ps(bf16_high(pair));
      for (int l = 0; l < LINES; ++l)
        for (int h = 0; h < 2; ++h)
          acc[r][l][h] = _mm256_fmadd_ps(w_hi[l][h], x_hi,
                                         _mm256_fmadd_ps(w_lo[l][h], x_lo, acc[r][l][h]));
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int l = 0; l < LINES; ++l)
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_ps(p.y + (row0 + r) * p.n + (group * kPanels + q0 + l) * kPanel + h * 8,
                         acc[r][l][h]);
}

template <int ROWS>
void group_tile(const Problem& p, int64_t row0, int64_t group) {
  constexpr int kLines = ROWS == 1 ? 4 : ROWS == 2 ? 2 : 1;
  for (int q = 0; q < kPanels; q += kLines) panel_tile<ROWS, kLines>(p, row0, group, q);
}
constexpr int kTileRows = 4;
#else
template <int ROWS>
void group_tile(const Problem& p, int64_t row0, int64_t group) {
  constexpr int64_t kColumns = kPanels * kPanel;
  float acc[ROWS][kColumns] = {};
  const uint32_t* w = p.w_lines + group * p.half_k * kGroupWords;
  for (int64_t i = 0; i < p.half_k; ++i, w += kGroupWords) {
    for (int r = 0; r < ROWS; ++r) {
      uint32_t xp = p.x_pairs[(row0 + r) * p.half_k + i];
      float x_lo = bf16_low(xp), x_hi = bf16_high(xp);
      for (int64_t c = 0; c < kColumns; ++c) {
        acc[r][c] += bf16_low(w[c]) * x_lo + bf16_high(w[c]) * x_hi;
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    std::memcpy(p.y + (row0 + r) * p.n + group * kColumns, acc[r], sizeof(acc[r]));
  }
}
constexpr int kTileRows = 6;
#endif

// Every row of x against one group, in tiles of up to kTileRows rows.
void group_all_rows(const Problem& p, int64_t group) {
  jaxaccel::row_tiles<kTileRows>(0, p.m, [&](auto rows, int64_t row) {
    group_tile<decltype(rows)::value>(p, row, group);
  });
}

// `w_packed` is one packed weight [n/64, k/2, 4, 16, 2] or a stack of them [layers, ...], of
// which `layer` picks one: inside a layer scan the kernel reads the stack in place, where a
// sliced operand would first be copied out by XLA (read, written and read again).
ffi::Error Bf16MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                          ffi::Buffer<ffi::U16> w_packed, ffi::Buffer<ffi::S32> layer,
                          ffi::ResultBuffer<ffi::F32> y) {
  auto x_dims = x.dimensions();
  auto w_dims = w_packed.dimensions();
  size_t rank = w_dims.size();
  if (x_dims.size() != 2 || (rank != 5 && rank != 6) || w_dims[rank - 3] != kPanels ||
      w_dims[rank - 2] != kPanel || w_dims[rank - 1] != 2 || layer.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "bf16_matmul: expected x [m, k], W packed as [(layers,) n/64, k/2, 4, 16, 2], a layer");
  }
  int64_t groups = w_dims[rank - 5], half_k = w_dims[rank - 4];
  int64_t m = x_dims[0], k = x_dims[1], n = groups * kGroupWords;
  int64_t layers = rank == 6 ? w_dims[0] : 1, index = layer.typed_data()[0];
  if (k != 2 * half_k) {
    return ffi::Error::InvalidArgument("bf16_matmul: x has k columns, W was packed for another k");
  }
  if (index < 0 || index >= layers) {
    return ffi::Error::InvalidArgument("bf16_matmul: layer index out of range");
  }
  const uint32_t* w_lines = reinterpret_cast<const uint32_t*>(w_packed.typed_data()) +
                            index * groups * half_k * kGroupWords;
  Problem problem{reinterpret_cast<const uint32_t*>(x.typed_data()),
                  w_lines, y->typed_data(), m, half_k, n};
  jaxaccel::parallel_chunks(pool, groups, kChunks, [&problem](int64_t first, int64_t end) {
    for (int64_t group = first; group < end; ++group) group_all_rows(problem, group);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
