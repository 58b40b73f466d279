// Weight-only int8 / int4 matmul for XLA:CPU, registered as an XLA FFI custom call.
//
//   y[m, n] (float32) = x[m, k] (float32) . (q[k, n] * scale[k / group, n]),
//
// q symmetric int8 or int4 (no zero point), one scale per output column and group of `group`
// consecutive k rows (int8 per channel: one group spanning k). Decode reads each weight once,
// so reading 1 (int8) or 1/2 (int4) byte per weight instead of bf16's 2 is the speed-up.
//
// Arithmetic (AVX512-VNNI `vpdpbusd`, u8 x s8 -> int32, 4 products per 32-bit lane): each x
// row is quantized on entry to int16, x16 = round(x / sx), sx = max|x| / 32639, and split into
// two signed bytes x16 = 256 h + l (h in [-128, 127], l in [-128, 127]). Weights are stored
// unsigned, u = q + offset (offset 128 for int8, 8 for int4), so that
//   sum_k x16 q = 256 (sum_k h u - offset sum_k h) + (sum_k l u - offset sum_k l)
// with exact int32 sums per group (|h u| <= 32640: no overflow below ~65k rows per group);
// the per-row sums of h and l come from the x quantization. The only rounding beyond float32
// accumulation is x's int16 step, |x - sx x16| <= sx / 2 (sx = max|x| / 32639, finer than
// bfloat16's own step for all but the smallest entries of a row).
//
// Packed layout (jaxaccel/backends/cpu/quantized.py): [n/64, k/s, 4, 16, 4] bytes, s = 4 k rows
// per step (int8) or 8 (int4). A group of 64 output columns is one contiguous stream, as in
// bf16_matmul.cc; per step, 4 lines of 64 bytes, one per panel of 16 columns; in a line, column
// c's 4 bytes are k rows 4i..4i+3 (int8), or nibbles: rows 8i..8i+3 low, 8i+4..8i+7 high (int4).
// Each 32-bit lane is then exactly one `vpdpbusd` operand.
//
// With AVX2 + FMA only (x86-64-v3 build), weights are widened to float32 and multiplied with
// x unquantized (see stream_row). Elsewhere a portable loop computes the same integer sums
// (int64) per group.
//
// Many rows (prefill): `vpdpbusd` on the two bytes of x16 does 64 multiplies in two
// instructions, as many per instruction as AVX512-BF16's `vdpbf16ps`, and adds x's
// quantization and the nibble unpacking per row tile, so above a few dozen rows the bf16
// kernel outran it (0.6-0.84x at 512 rows). The second entry point,
// JaxaccelQuantizedMatmulPanels, takes x in bfloat16 instead: each thread dequantizes one
// stream of 64 columns at a time into a buffer of q as bfloat16 (exact: |q| <= 128) in
// bf16_matmul.cc's layout [k/2, 4, 16, 2], then runs that kernel's row tiles on it (6 rows;
// 3 rows with the totals in registers when there are several scale groups), applying the
// scales per group. The buffer (k x 128 bytes, 384 KiB at
// k = 3072) stays in L2 while every row tile reads it, so the dequantizing is paid once per
// call, not per row, and products are exact x_bf16 * q summed in float32.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define JAXACCEL_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define JAXACCEL_AVX2_FLOAT 1
#endif

#include "parallel_chunks.h"
#include "row_tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;                  // output columns per 64-byte line
constexpr int64_t kPanels = 4;                  // lines per step in a stream
constexpr int64_t kStream = kPanel * kPanels;   // output columns per contiguous stream
constexpr int64_t kStepBytes = kPanels * 64;    // bytes per step of a stream
constexpr int64_t kPrefetchSteps = 12;          // software prefetch distance (3 KiB)
constexpr int64_t kChunks = 16;                 // work chunks per call (see bf16_matmul.cc)
// With several row tiles a thread prefetches its next stream (stream_tile's `ahead`), which
// needs chunks of several streams: GPT-2's 12-stream shapes would get one per chunk at 16.
constexpr int64_t kChunksMultiRow = 4;
constexpr int kRowTile = 2;  // x rows per register tile: 16 accumulators
constexpr float kXMax = 32639.0f;               // keeps h = (x16 + 128) >> 8 within int8

// x rows quantized to int16, split into bytes, with per-group byte sums.
struct QuantizedX {
  std::vector<int8_t> h, l;         // [m, k]
  std::vector<int32_t> h_sum, l_sum;  // [m, groups]
  std::vector<float> scale;         // [m]
};

// Into `q`, a per-thread buffer reused across calls (no allocation per decode step).
void quantize_x(const float* x, int64_t m, int64_t k, int64_t groups, QuantizedX& q) {
  q.h.resize(m * k);
  q.l.resize(m * k);
  q.h_sum.resize(m * groups);
  q.l_sum.resize(m * groups);
  q.scale.resize(m);
  int64_t group = k / groups;
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
    float sx = amax > 0.0f ? amax / kXMax : 1.0f;
    float inv = 1.0f / sx;
    q.scale[r] = sx;
    // Plain loops that the compiler vectorizes (this runs once per call, single-threaded).
    int8_t* h = q.h.data() + r * k;
    int8_t* l = q.l.data() + r * k;
    for (int64_t i = 0; i < k; ++i) {
      float v = std::min(std::max(row[i] * inv, -kXMax), kXMax);
      int32_t x16 = static_cast<int32_t>(v + (v < 0.0f ? -0.5f : 0.5f));  // nearest
      int32_t hi = (x16 + 128) >> 8;  // arithmetic shift: floor
      h[i] = static_cast<int8_t>(hi);
      l[i] = static_cast<int8_t>(x16 - 256 * hi);  // in [-128, 127]
    }
    for (int64_t g = 0; g < groups; ++g) {
      int32_t h_sum = 0, l_sum = 0;
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        h_sum += h[i];
        l_sum += l[i];
      }
      q.h_sum[r * groups + g] = h_sum;
      q.l_sum[r * groups + g] = l_sum;
    }
  }
}

struct Problem {
  const QuantizedX* x;
  const float* x_f32;   // [m, k], as given (the AVX2 path multiplies it unquantized)
  const uint8_t* w;     // one layer's lines [n/64, k/step, 4, 16, 4]
  const float* scale;   // [groups, n]
  float* y;             // [m, n]
  int64_t m, k, n, groups, bits;
  int64_t step_rows() const { return bits == 4 ? 8 : 4; }
  int32_t offset() const { return bits == 4 ? 8 : 128; }
};

#if defined(JAXACCEL_VNNI)
// acc += u . s (u8 x s8, 4 products per 32-bit lane), in place. With the intrinsic, GCC 12
// copied every accumulator to a fresh register around each `vpdpbusd` (stream_tile<2, 8>: 30
// moves and a spill per 16 dots); an asm operand tied to acc keeps the tile in registers
// (no faster by itself on Zen 4, which renames the moves away, but the loop is what it says).
inline void dpbusd(__m512i& acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// ROWS rows of x against one stream of 64 columns, group by group: ROWS x 4 panels x (h, l)
// int32 accumulators in registers, flushed into y (float) at the end of every group.
//
// `ahead` (or null): the stream the calling thread does next, of which this pass prefetches
// into L2 every `parts`-th line, starting at line `part`. Only the first row tile of a stream
// reads it from memory; the later ones find it in L2 and would leave the memory idle, so they
// fetch the next stream meanwhile (int8 at 8 rows, GPT-2 shapes, Zen 4: 14-17 -> 17-22 GB/s
// of weights, scripts/bench_quantized_matmul.py).
template <int ROWS, int BITS>
void stream_tile(const Problem& p, int64_t row0, int64_t stream, const uint8_t* ahead = nullptr,
                 int part = 0, int parts = 1) {
  constexpr int64_t kRows = BITS == 4 ? 8 : 4;
  const int64_t group = p.k / p.groups, steps = group / kRows;
  const uint8_t* w = p.w + stream * (p.k / kRows) * kStepBytes;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i acc_h[ROWS][kPanels], acc_l[ROWS][kPanels];
    for (int r = 0; r < ROWS; ++r)
      for (int q = 0; q < kPanels; ++q) acc_h[r][q] = acc_l[r][q] = _mm512_setzero_si512();
    const int8_t* xh = p.x->h.data() + row0 * p.k + g * group;
    const int8_t* xl = p.x->l.data() + row0 * p.k + g * group;
    for (int64_t s = 0; s < steps; ++s, w += kStepBytes) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchSteps * kStepBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchSteps * kStepBytes + 128),
                   _MM_HINT_T0);
      if (ahead != nullptr) {
        const int64_t line0 = (g * steps + s) * kPanels;
        for (int64_t line = line0 + (part - line0 % parts + parts) % parts;
             line < line0 + kPanels; line += parts) {
          _mm_prefetch(reinterpret_cast<const char*>(ahead + line * 64), _MM_HINT_T1);
        }
      }
      if constexpr (BITS == 8) {
        for (int q = 0; q < kPanels; ++q) {
          __m512i line = _mm512_loadu_si512(w + q * 64);
          for (int r = 0; r < ROWS; ++r) {
            const int64_t at = r * p.k + s * 4;
            dpbusd(acc_h[r][q], line, broadcast4(xh + at));
            dpbusd(acc_l[r][q], line, broadcast4(xl + at));
          }
        }
      } else {
        // Low nibbles (rows 8s..8s+3) of all panels, then high nibbles (8s+4..8s+7): only
        // one quad's broadcasts of x are live at a time (both would spill accumulators).
        for (int half = 0; half < 2; ++half) {
          for (int q = 0; q < kPanels; ++q) {
            __m512i line = _mm512_loadu_si512(w + q * 64);
            __m512i u = _mm512_and_si512(half ? _mm512_srli_epi16(line, 4) : line, low_nibbles);
            for (int r = 0; r < ROWS; ++r) {
              const int64_t at = r * p.k + s * 8 + 4 * half;
              dpbusd(acc_h[r][q], u, broadcast4(xh + at));
              dpbusd(acc_l[r][q], u, broadcast4(xl + at));
            }
          }
        }
      }
    }
    // sum_k x16 q = 256 (acc_h - offset sum h) + (acc_l - offset sum l), exact in int32.
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = row0 + r;
      __m512i h_off = _mm512_set1_epi32(BITS == 8 ? 128 * p.x->h_sum[row * p.groups + g]
                                                   : 8 * p.x->h_sum[row * p.groups + g]);
      __m512i l_off = _mm512_set1_epi32(BITS == 8 ? 128 * p.x->l_sum[row * p.groups + g]
                                                   : 8 * p.x->l_sum[row * p.groups + g]);
      __m512 sx = _mm512_set1_ps(p.x->scale[row]);
      for (int q = 0; q < kPanels; ++q) {
        const int64_t col = stream * kStream + q * kPanel;
        __m512 h = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc_h[r][q], h_off));
        __m512 l = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc_l[r][q], l_off));
        __m512 dot = _mm512_fmadd_ps(h, _mm512_set1_ps(256.0f), l);
        __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(p.scale + g * p.n + col), sx);
        float* out = p.y + row * p.n + col;
        __m512 prev = g == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(out);
        _mm512_storeu_ps(out, _mm512_fmadd_ps(dot, scale, prev));
      }
    }
  }
}

// `next`: the stream this thread does after this one (or -1).
template <int BITS>
void stream_all_rows(const Problem& p, int64_t stream, int64_t next) {
  const int64_t tiles = p.m / kRowTile + p.m % kRowTile;
  const uint8_t* ahead =
      next < 0 || tiles < 2 ? nullptr : p.w + next * (p.k / p.step_rows()) * kStepBytes;
  int64_t row = 0;
  for (int64_t tile = 0; row + kRowTile <= p.m; row += kRowTile, ++tile) {
    if (tile == 0 || ahead == nullptr) {
      stream_tile<kRowTile, BITS>(p, row, stream);
    } else {
      stream_tile<kRowTile, BITS>(p, row, stream, ahead, tile - 1, tiles - 1);
    }
  }
  if (p.m - row == 1) {
    if (ahead == nullptr) {
      stream_tile<1, BITS>(p, row, stream);
    } else {
      stream_tile<1, BITS>(p, row, stream, ahead, tiles - 2, tiles - 1);
    }
  }
}

void stream_columns(const Problem& p, int64_t stream, int64_t next) {
  if (p.bits == 4) {
    stream_all_rows<4>(p, stream, next);
  } else {
    stream_all_rows<8>(p, stream, next);
  }
}
#elif defined(JAXACCEL_AVX2_FLOAT)
// AVX2 + FMA: there is no u8 x s8 dot product into int32 (`vpmaddubsw` saturates its int16
// pair sums at 255 x 127 x 2), so each line's bytes are widened to float32 and multiplied by
// x as given, in float32: sum_k x u - offset sum_k x = sum_k x q per group.
//
// A line (16 columns x 4 k rows, column-major bytes) is read as two ymm of 8 columns; a byte
// shuffle puts each 128-bit lane's 4 columns row by row, a permute gathers one k row's 8
// columns into the low 8 bytes, and those widen to 8 floats.
inline __m256i rows_first(__m256i v) {
  const __m256i order = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                         0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm256_shuffle_epi8(v, order);
}
inline __m256 row_floats(__m256i rows, int i) {
  const __m256i pick = _mm256_setr_epi32(i, i + 4, i, i + 4, i, i + 4, i, i + 4);
  __m256i gathered = _mm256_permutevar8x32_epi32(rows, pick);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm256_castsi256_si128(gathered)));
}

// One x row against one stream of 64 columns, group by group: 4 panels x 2 halves of float32
// accumulators in registers, flushed into y at the end of every group.
template <int BITS>
void stream_row(const Problem& p, int64_t row, int64_t stream) {
  constexpr int64_t kRows = BITS == 4 ? 8 : 4;
  const int64_t group = p.k / p.groups, steps = group / kRows;
  const uint8_t* w = p.w + stream * (p.k / kRows) * kStepBytes;
  const float* x = p.x_f32 + row * p.k;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < p.groups; ++g, x += group) {
    __m256 acc[kPanels][2];
    for (int q = 0; q < kPanels; ++q) acc[q][0] = acc[q][1] = _mm256_setzero_ps();
    float x_sum = 0.0f;
    for (int64_t i = 0; i < group; ++i) x_sum += x[i];
    for (int64_t s = 0; s < steps; ++s, w += kStepBytes) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchSteps * kStepBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchSteps * kStepBytes + 128),
                   _MM_HINT_T0);
      const float* xs = x + s * kRows;
      for (int q = 0; q < kPanels; ++q) {
        for (int h = 0; h < 2; ++h) {
          __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 64 + h * 32));
          // int8: rows 0-3 of the step; int4: low nibbles rows 0-3, high nibbles rows 4-7.
          for (int half = 0; half < (BITS == 4 ? 2 : 1); ++half) {
            __m256i u = BITS == 8 ? v
                        : _mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, low_nibbles);
            __m256i rows = rows_first(u);
            for (int i = 0; i < 4; ++i) {
              acc[q][h] = _mm256_fmadd_ps(row_floats(rows, i),
                                          _mm256_set1_ps(xs[4 * half + i]), acc[q][h]);
            }
          }
        }
      }
    }
    const __m256 offset = _mm256_set1_ps(static_cast<float>(p.offset()) * x_sum);
    for (int q = 0; q < kPanels; ++q) {
      for (int h = 0; h < 2; ++h) {
        const int64_t col = stream * kStream + q * kPanel + h * 8;
        float* out = p.y + row * p.n + col;
        __m256 dot = _mm256_sub_ps(acc[q][h], offset);
        __m256 prev = g == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out);
        _mm256_storeu_ps(out, _mm256_fmadd_ps(dot, _mm256_loadu_ps(p.scale + g * p.n + col),
                                              prev));
      }
    }
  }
}

void stream_columns(const Problem& p, int64_t stream, int64_t /*next*/) {
  for (int64_t row = 0; row < p.m; ++row) {
    if (p.bits == 4) {
      stream_row<4>(p, row, stream);
    } else {
      stream_row<8>(p, row, stream);
    }
  }
}
#else
// The stored value (q + offset) of column c, k row i (within the stream's step layout).
inline int32_t stored(const Problem& p, const uint8_t* stream_w, int64_t i, int64_t c) {
  const int64_t rows = p.step_rows();
  const uint8_t* line = stream_w + (i / rows) * kStepBytes + (c / kPanel) * 64 + (c % kPanel) * 4;
  if (p.bits == 8) return line[i % 4];
  uint8_t byte = line[i % 4];
  return (i % 8) < 4 ? (byte & 0x0F) : (byte >> 4);
}

void stream_columns(const Problem& p, int64_t stream, int64_t /*next*/) {
  const int64_t group = p.k / p.groups;
  const uint8_t* w = p.w + stream * (p.k / p.step_rows()) * kStepBytes;
  for (int64_t row = 0; row < p.m; ++row) {
    const int8_t* xh = p.x->h.data() + row * p.k;
    const int8_t* xl = p.x->l.data() + row * p.k;
    float out[kStream] = {};
    for (int64_t g = 0; g < p.groups; ++g) {
      int64_t acc[kStream] = {};
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        int64_t x16 = 256 * int64_t{xh[i]} + xl[i];
        for (int64_t c = 0; c < kStream; ++c) acc[c] += x16 * (stored(p, w, i, c) - p.offset());
      }
      for (int64_t c = 0; c < kStream; ++c) {
        out[c] += static_cast<float>(acc[c]) * (p.scale[g * p.n + stream * kStream + c] *
                                                p.x->scale[row]);
      }
    }
    std::memcpy(p.y + row * p.n + stream * kStream, out, sizeof(out));
  }
}
#endif

// The sizes both entry points read off their operands, once checked against each other.
struct Operands {
  int64_t m, k, n, streams, steps, groups, layers, index;
};

// x [m, k], W packed [(layers,) n/64, k/step, 4, 16, 4], scales [(layers,) groups, n] and one
// layer index, checked; errors start with `name` (the entry point).
ffi::Error check_operands(const std::string& name, ffi::Span<const int64_t> x_dims,
                          ffi::Span<const int64_t> w_dims, ffi::Span<const int64_t> s_dims,
                          ffi::Buffer<ffi::S32>& layer, int32_t bits, Operands& op) {
  size_t rank = w_dims.size();
  bool stacked = rank == 6;
  if (x_dims.size() != 2 || (rank != 5 && rank != 6) || w_dims[rank - 3] != kPanels ||
      w_dims[rank - 2] != kPanel || w_dims[rank - 1] != 4 || s_dims.size() != (stacked ? 3 : 2) ||
      layer.element_count() != 1 || (bits != 4 && bits != 8)) {
    return ffi::Error::InvalidArgument(
        name + ": expected x [m, k], W packed as [(layers,) n/64, k/step, 4, 16, 4], "
        "scales [(layers,) groups, n], a layer, bits 4 or 8");
  }
  const int64_t step_rows = bits == 4 ? 8 : 4;
  op.streams = w_dims[rank - 5];
  op.steps = w_dims[rank - 4];
  op.m = x_dims[0];
  op.k = x_dims[1];
  op.n = op.streams * kStream;
  op.groups = s_dims[s_dims.size() - 2];
  op.layers = stacked ? w_dims[0] : 1;
  op.index = layer.typed_data()[0];
  if (op.k != op.steps * step_rows || s_dims[s_dims.size() - 1] != op.n || op.groups < 1 ||
      op.k % op.groups != 0 || (op.k / op.groups) % step_rows != 0) {
    return ffi::Error::InvalidArgument(
        name + ": x's k, the packed W and the scales' [groups, n] disagree");
  }
  if (op.index < 0 || op.index >= op.layers || (stacked && s_dims[0] != op.layers)) {
    return ffi::Error::InvalidArgument(name + ": layer index out of range");
  }
  return ffi::Error::Success();
}

// `w_packed` is one packed weight [n/64, k/step, 4, 16, 4] or a stack [layers, ...] of which
// `layer` picks one (read in place inside a layer scan, as in bf16_matmul.cc); `scales` is
// [groups, n] or [layers, groups, n] float32.
ffi::Error QuantizedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::U8> w_packed, ffi::Buffer<ffi::F32> scales,
                               ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y,
                               int32_t bits) {
  Operands op;
  ffi::Error checked = check_operands("quantized_matmul", x.dimensions(), w_packed.dimensions(),
                                      scales.dimensions(), layer, bits, op);
  if (checked.failure()) return checked;
  const int64_t m = op.m, k = op.k, n = op.n, groups = op.groups;
  const int64_t streams = op.streams, steps = op.steps, index = op.index;
  thread_local QuantizedX qx;
#if !defined(JAXACCEL_AVX2_FLOAT)
  quantize_x(x.typed_data(), m, k, groups, qx);
#endif
  Problem problem{&qx, x.typed_data(),
                  w_packed.typed_data() + index * streams * steps * kStepBytes,
                  scales.typed_data() + index * groups * n,
                  y->typed_data(), m, k, n, groups, bits};
  const int64_t chunks = m > kRowTile ? kChunksMultiRow : kChunks;
  jaxaccel::parallel_chunks(pool, streams, chunks, [&problem](int64_t first, int64_t end) {
    for (int64_t s = first; s < end; ++s) stream_columns(problem, s, s + 1 < end ? s + 1 : -1);
  });
  return ffi::Error::Success();
}

// ---- The many-rows path: streams dequantized to bfloat16 panels ----

struct PanelProblem {
  const uint32_t* x_pairs;  // [m, k/2] bf16 pairs along k
  const uint8_t* w;         // one layer's lines [n/64, k/step, 4, 16, 4]
  const float* scale;       // [groups, n]
  float* y;                 // [m, n]
  int64_t m, k, n, groups, bits;
};

constexpr int64_t kPanelWords = kPanels * kPanel;  // uint32 pairs per k pair of a stream
constexpr int64_t kPanelPrefetchPairs = 12;         // as bf16_matmul.cc

#if defined(JAXACCEL_VNNI) && defined(__AVX512BF16__)
// One line of 16 columns x 4 k rows of signed bytes q ([c][4]) -> its two k pairs as bf16
// pair lines [16] each (pair 0: rows 0, 1; pair 1: rows 2, 3).
inline void line_to_pairs(__m512i q, uint32_t* pair0, uint32_t* pair1) {
  __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(q, 0)));
  __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(q, 1)));
  __m512 f2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(q, 2)));
  __m512 f3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(q, 3)));
  // As uint32 words: word 2c + p holds column c's pair p (columns 0-7 in lo, 8-15 in hi).
  __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);
  __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(f3, f2);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  _mm512_storeu_si512(pair0, _mm512_permutex2var_epi32(lo, even, hi));
  _mm512_storeu_si512(pair1, _mm512_permutex2var_epi32(lo, odd, hi));
}

// One stream's q as bf16 pairs [k/2, 4, 16] into `panel`.
void dequantize_stream(const PanelProblem& p, int64_t stream, uint32_t* panel) {
  const int64_t rows = p.bits == 4 ? 8 : 4, steps = p.k / rows;
  const uint8_t* w = p.w + stream * steps * kStepBytes;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int64_t s = 0; s < steps; ++s, w += kStepBytes) {
    for (int q = 0; q < kPanels; ++q) {
      __m512i line = _mm512_loadu_si512(w + q * 64);
      if (p.bits == 8) {  // u = q + 128: flipping the top bit gives q's two's complement
        uint32_t* out = panel + (2 * s) * kPanelWords + q * kPanel;
        line_to_pairs(_mm512_xor_si512(line, flip), out, out + kPanelWords);
      } else {  // low nibbles: rows 8s..8s+3, high: 8s+4..8s+7; u = q + 8
        uint32_t* out = panel + (4 * s) * kPanelWords + q * kPanel;
        __m512i low = _mm512_sub_epi8(_mm512_and_si512(line, low_nibbles), eight);
        __m512i high = _mm512_sub_epi8(
            _mm512_and_si512(_mm512_srli_epi16(line, 4), low_nibbles), eight);
        line_to_pairs(low, out, out + kPanelWords);
        line_to_pairs(high, out + 2 * kPanelWords, out + 3 * kPanelWords);
      }
    }
  }
}

// ROWS rows of x against one dequantized stream, group by group: bf16_matmul.cc's tile
// (ROWS x 4 float32 accumulators), flushed as y += acc * scale at the end of every group.
template <int ROWS>
void panel_tile(const PanelProblem& p, const uint32_t* panel, int64_t row0, int64_t stream) {
  const int64_t half_k = p.k / 2, group_pairs = half_k / p.groups;
  const uint32_t* w = panel;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 acc[ROWS][kPanels];
    for (int r = 0; r < ROWS; ++r)
      for (int q = 0; q < kPanels; ++q) acc[r][q] = _mm512_setzero_ps();
    const uint32_t* x = p.x_pairs + row0 * half_k + g * group_pairs;
    for (int64_t i = 0; i < group_pairs; ++i, w += kPanelWords) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kPanelPrefetchPairs * kPanelWords),
                   _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + kPanelPrefetchPairs * kPanelWords + 32),
                   _MM_HINT_T0);
      __m512i line[kPanels];
      for (int q = 0; q < kPanels; ++q) line[q] = _mm512_loadu_si512(w + q * kPanel);
      for (int r = 0; r < ROWS; ++r) {
        __m512bh xr = (__m512bh)_mm512_set1_epi32(x[r * half_k + i]);
        for (int q = 0; q < kPanels; ++q)
          acc[r][q] = _mm512_dpbf16_ps(acc[r][q], (__m512bh)line[q], xr);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      for (int q = 0; q < kPanels; ++q) {
        const int64_t col = stream * kStream + q * kPanel;
        float* out = p.y + (row0 + r) * p.n + col;
        __m512 prev = g == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(out);
        _mm512_storeu_ps(out, _mm512_fmadd_ps(acc[r][q], _mm512_loadu_ps(p.scale + g * p.n + col),
                                              prev));
      }
    }
  }
}

// As panel_tile for weights with several groups: the running totals stay in registers too
// (ROWS x 4 for the group, ROWS x 4 for the total), so y is written once, not read and
// written at every group's end. The group loop is written out in both tiles on purpose: one
// always-inline helper for it measured 25-30% slower here (int4 g128 at 512 rows, 0.15-0.18
// vs 0.22 GB/s, scripts/bench_quantized_matmul.py, 2 alternated rounds, Zen 4).
template <int ROWS>
void panel_tile_grouped(const PanelProblem& p, const uint32_t* panel, int64_t row0,
                        int64_t stream) {
  const int64_t half_k = p.k / 2, group_pairs = half_k / p.groups;
  const uint32_t* w = panel;
  __m512 total[ROWS][kPanels];
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < kPanels; ++q) total[r][q] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 acc[ROWS][kPanels];
    for (int r = 0; r < ROWS; ++r)
      for (int q = 0; q < kPanels; ++q) acc[r][q] = _mm512_setzero_ps();
    const uint32_t* x = p.x_pairs + row0 * half_k + g * group_pairs;
    for (int64_t i = 0; i < group_pairs; ++i, w += kPanelWords) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kPanelPrefetchPairs * kPanelWords),
                   _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + kPanelPrefetchPairs * kPanelWords + 32),
                   _MM_HINT_T0);
      __m512i line[kPanels];
      for (int q = 0; q < kPanels; ++q) line[q] = _mm512_loadu_si512(w + q * kPanel);
      for (int r = 0; r < ROWS; ++r) {
        __m512bh xr = (__m512bh)_mm512_set1_epi32(x[r * half_k + i]);
        for (int q = 0; q < kPanels; ++q)
          acc[r][q] = _mm512_dpbf16_ps(acc[r][q], (__m512bh)line[q], xr);
      }
    }
    for (int q = 0; q < kPanels; ++q) {
      __m512 scale = _mm512_loadu_ps(p.scale + g * p.n + stream * kStream + q * kPanel);
      for (int r = 0; r < ROWS; ++r) total[r][q] = _mm512_fmadd_ps(acc[r][q], scale, total[r][q]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < kPanels; ++q)
      _mm512_storeu_ps(p.y + (row0 + r) * p.n + stream * kStream + q * kPanel, total[r][q]);
}
#else
inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

inline uint16_t small_int_to_bf16(int32_t v) {  // exact for |v| <= 256
  float f = static_cast<float>(v);
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);
}

void dequantize_stream(const PanelProblem& p, int64_t stream, uint32_t* panel) {
  const int64_t rows = p.bits == 4 ? 8 : 4, offset = p.bits == 4 ? 8 : 128;
  const uint8_t* w = p.w + stream * (p.k / rows) * kStepBytes;
  for (int64_t i = 0; i < p.k; ++i) {
    const uint8_t* step = w + (i / rows) * kStepBytes;
    for (int64_t c = 0; c < kStream; ++c) {
      uint8_t byte = step[(c / kPanel) * 64 + (c % kPanel) * 4 + i % 4];
      int32_t u = p.bits == 8 ? byte : ((i % 8) < 4 ? (byte & 0x0F) : (byte >> 4));
      uint16_t* pair = reinterpret_cast<uint16_t*>(panel + (i / 2) * kPanelWords + c);
      pair[i % 2] = small_int_to_bf16(u - static_cast<int32_t>(offset));
    }
  }
}

template <int ROWS>
void panel_tile(const PanelProblem& p, const uint32_t* panel, int64_t row0, int64_t stream) {
  const int64_t half_k = p.k / 2, group_pairs = half_k / p.groups;
  for (int r = 0; r < ROWS; ++r) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(p.x_pairs + (row0 + r) * half_k);
    float* out = p.y + (row0 + r) * p.n + stream * kStream;
    for (int64_t c = 0; c < kStream; ++c) out[c] = 0.0f;
    for (int64_t g = 0; g < p.groups; ++g) {
      float acc[kStream] = {};
      for (int64_t i = 2 * g * group_pairs; i < 2 * (g + 1) * group_pairs; ++i) {
        const uint16_t* w = reinterpret_cast<const uint16_t*>(panel + (i / 2) * kPanelWords);
        float xi = bf16_to_float(x[i]);
        for (int64_t c = 0; c < kStream; ++c) acc[c] += xi * bf16_to_float(w[2 * c + i % 2]);
      }
      for (int64_t c = 0; c < kStream; ++c) out[c] += acc[c] * p.scale[g * p.n + stream * kStream + c];
    }
  }
}
#endif

// Every row of x against one stream, in tiles of up to 6 rows (as bf16_matmul.cc).
void panel_all_rows(const PanelProblem& p, const uint32_t* panel, int64_t stream) {
  int64_t row = 0;
#if defined(JAXACCEL_VNNI) && defined(__AVX512BF16__)
  // 3 rows: 24 of the 32 vector registers hold group sums and totals (measured at 512 rows,
  // int4 groups of 128: 0.97-0.98x the bf16 kernel, against 0.87-0.89x for 6-row tiles
  // that add each group's sums into y).
  if (p.groups > 1) {
    for (; row + 3 <= p.m; row += 3) panel_tile_grouped<3>(p, panel, row, stream);
  }
#endif
  jaxaccel::row_tiles<6>(row, p.m, [&](auto rows, int64_t first) {
    panel_tile<decltype(rows)::value>(p, panel, first, stream);
  });
}

// `x` bf16 [m, k] (k = the packed k_pad, even); the rest as QuantizedMatmulImpl.
ffi::Error QuantizedMatmulPanelsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                                     ffi::Buffer<ffi::U8> w_packed, ffi::Buffer<ffi::F32> scales,
                                     ffi::Buffer<ffi::S32> layer,
                                     ffi::ResultBuffer<ffi::F32> y, int32_t bits) {
  Operands op;
  ffi::Error checked = check_operands("quantized_matmul_panels", x.dimensions(),
                                      w_packed.dimensions(), scales.dimensions(), layer, bits, op);
  if (checked.failure()) return checked;
  const int64_t m = op.m, k = op.k, n = op.n, groups = op.groups;
  const int64_t streams = op.streams, steps = op.steps, index = op.index;
  PanelProblem problem{reinterpret_cast<const uint32_t*>(x.typed_data()),
                       w_packed.typed_data() + index * streams * steps * kStepBytes,
                       scales.typed_data() + index * groups * n,
                       y->typed_data(), m, k, n, groups, bits};
  jaxaccel::parallel_chunks(pool, streams, kChunks, [&problem](int64_t first, int64_t end) {
    thread_local std::vector<uint32_t> panel;  // per worker thread, reused across calls
    panel.resize(problem.k / 2 * kPanelWords);
    for (int64_t s = first; s < end; ++s) {
      dequantize_stream(problem, s, panel.data());
      panel_all_rows(problem, panel.data(), s);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelQuantizedMatmulPanels, QuantizedMatmulPanelsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelQuantizedMatmul, QuantizedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits"));
