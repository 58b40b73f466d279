// float32 matmul over packed weights for XLA:CPU, registered as an XLA FFI custom call.
//
//   y[m, n] (float32) = x[m, k] (float32) . W[k, n] (float32)
//
// W arrives pre-packed (jaxaccel/backends/cpu/packed.py) as [n/64, k, 4, 16]: a group of 64
// output columns is one contiguous stream of k lines of 256 bytes, as bf16_matmul.cc's
// layout without the pairs along k.
//
// Why: inside a layer scan, XLA copies each layer's float32 weights out of the [layers, ...]
// stack before every dot (a dynamic-slice fusion: read, written and read again). Read in place
// at a layer index here, GPT-2 124M's engine decode step at 2 sequences took 24 ms against 53
// with XLA's dots, and a 512-token prefill step 438 against 500 (docs/performance.md;
// scripts/bench_bf16_matmul.py --dtype float32 measures the kernel alone). Rows are
// taken 6 at a time (AVX-512: 6 x 4 accumulators of 16 columns) against a group's stream,
// which stays in L2 for the next 6 (k x 256 bytes), so prefill-sized m runs at most of XLA's
// speed too.

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "parallel_chunks.h"
#include "row_tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;   // output columns per vector
constexpr int64_t kPanels = 4;   // vectors per k line of a group
constexpr int64_t kGroup = kPanels * kPanel;  // output columns per contiguous stream
constexpr int64_t kPrefetchLines = 8;  // software prefetch distance, in k lines (2 KiB)
constexpr int64_t kChunks = 16;  // work chunks per call (see bf16_matmul.cc)

struct Problem {
  const float* x;  // [m, k]
  const float* w;  // [n/64, k, 64]
  float* y;        // [m, n]
  int64_t m, k, n;
};

#if defined(__AVX512F__)
// ROWS rows of x against one group: ROWS x 4 accumulators in registers, each broadcast of x
// feeding 4 FMAs; 6 rows keep 24 accumulators, 4 lines and a broadcast within 32 registers.
template <int ROWS>
void group_tile(const Problem& p, int64_t row0, int64_t group) {
  __m512 acc[ROWS][kPanels];
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < kPanels; ++q) acc[r][q] = _mm512_setzero_ps();
  const float* w = p.w + group * p.k * kGroup;
  const float* x = p.x + row0 * p.k;
  for (int64_t i = 0; i < p.k; ++i, w += kGroup) {
    const char* ahead = reinterpret_cast<const char*>(w + kPrefetchLines * kGroup);
    for (int b = 0; b < 256; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    __m512 line[kPanels];
    for (int q = 0; q < kPanels; ++q) line[q] = _mm512_loadu_ps(w + q * kPanel);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * p.k + i]);
      for (int q = 0; q < kPanels; ++q) acc[r][q] = _mm512_fmadd_ps(line[q], xr, acc[r][q]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < kPanels; ++q)
      _mm512_storeu_ps(p.y + (row0 + r) * p.n + group * kGroup + q * kPanel, acc[r][q]);
}
constexpr int kTileRows = 6;
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 + FMA (x86-64-v3): a 64-column line is 8 ymm. With 16 registers a tile keeps
// ROWS x LINES <= 8 accumulators: one row against the whole line (decode: the stream is read
// once), or more rows against part of it, the stream read again per pass (from L2).
template <int ROWS, int LINES>
void panel_tile(const Problem& p, int64_t row0, int64_t group, int l0) {
  __m256 acc[ROWS][LINES];
  for (int r = 0; r < ROWS; ++r)
    for (int l = 0; l < LINES; ++l) acc[r][l] = _mm256_setzero_ps();
  const float* w = p.w + group * p.k * kGroup + l0 * 8;
  const float* x = p.x + row0 * p.k;
  for (int64_t i = 0; i < p.k; ++i, w += kGroup) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchLines * kGroup), _MM_HINT_T0);
    __m256 line[LINES];
    for (int l = 0; l < LINES; ++l) line[l] = _mm256_loadu_ps(w + l * 8);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 xr = _mm256_set1_ps(x[r * p.k + i]);
      for (int l = 0; l < LINES; ++l) acc[r][l] = _mm256_fmadd_ps(line[l], xr, acc[r][l]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int l = 0; l < LINES; ++l)
      _mm256_storeu_ps(p.y + (row0 + r) * p.n + group * kGroup + (l0 + l) * 8, acc[r][l]);
}

template <int ROWS>
void group_tile(const Problem& p, int64_t row0, int64_t group) {
  constexpr int kLines = ROWS == 1 ? 8 : ROWS == 2 ? 4 : 2;
  for (int l = 0; l < 8; l += kLines) panel_tile<ROWS, kLines>(p, row0, group, l);
}
constexpr int kTileRows = 4;
#else
template <int ROWS>
void group_tile(const Problem& p, int64_t row0, int64_t group) {
  float acc[ROWS][kGroup] = {};
  const float* w = p.w + group * p.k * kGroup;
  for (int64_t i = 0; i < p.k; ++i, w += kGroup) {
    for (int r = 0; r < ROWS; ++r) {
      const float xr = p.x[(row0 + r) * p.k + i];
      for (int64_t c = 0; c < kGroup; ++c) acc[r][c] += w[c] * xr;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    std::memcpy(p.y + (row0 + r) * p.n + group * kGroup, acc[r], sizeof(acc[r]));
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

// `w_packed` is one packed weight [n/64, k, 4, 16] or a stack of them [layers, ...], of which
// `layer` picks one (read in place inside a layer scan).
ffi::Error F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> w_packed, ffi::Buffer<ffi::S32> layer,
                         ffi::ResultBuffer<ffi::F32> y) {
  auto x_dims = x.dimensions();
  auto w_dims = w_packed.dimensions();
  size_t rank = w_dims.size();
  if (x_dims.size() != 2 || (rank != 4 && rank != 5) || w_dims[rank - 2] != kPanels ||
      w_dims[rank - 1] != kPanel || layer.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "f32_matmul: expected x [m, k], W packed as [(layers,) n/64, k, 4, 16], a layer");
  }
  const int64_t groups = w_dims[rank - 4], k = w_dims[rank - 3];
  const int64_t m = x_dims[0], n = groups * kGroup;
  const int64_t layers = rank == 5 ? w_dims[0] : 1, index = layer.typed_data()[0];
  if (x_dims[1] != k) {
    return ffi::Error::InvalidArgument("f32_matmul: x has k columns, W was packed for another k");
  }
  if (index < 0 || index >= layers) {
    return ffi::Error::InvalidArgument("f32_matmul: layer index out of range");
  }
  Problem problem{x.typed_data(), w_packed.typed_data() + index * groups * k * kGroup,
                  y->typed_data(), m, k, n};
  jaxaccel::parallel_chunks(pool, groups, kChunks, [&problem](int64_t first, int64_t end) {
    for (int64_t group = first; group < end; ++group) group_all_rows(problem, group);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
