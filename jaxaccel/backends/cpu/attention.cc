// Fused softmax attention for XLA:CPU, registered as an XLA FFI custom call.
//
//   out[b, t, n, :] = softmax_s(scale * q[b, t, n, :] . k[b, s, n / g, :] where mask[b, t, s],
//                               else finfo(float32).min) . v[b, s, n / g, :]
//
// with g = n / kv_heads query heads per kv head (grouped-query attention), the scores, the
// softmax and the accumulation in float32, q/k/v/out all bfloat16 or all float32, in the
// layout the projections produce ([b, t, heads, h]: no transposes before or after). The keys
// s are optionally a KV cache's [b, kv_heads, s_c, h] followed by the fresh ones; the cache
// may be a whole stack of layers read in place at a layer index (decode steps). A row
// whose mask is all false gets uniform weights, as the plain jnp code gives it.
//
// Why: XLA:CPU runs attention as two batched dots with a float32 softmax between them, each
// a separate pass over [b, n, t, s] in memory plus transposes; its batched dots run at a
// quarter of its dense dots' speed (`jaxaccel bench roofline`). Here one work item, a (batch,
// kv head, block of query rows), keeps its keys, values, scores and probabilities in cache:
//
// * the keys any row of the item may attend to are packed as [h/u, s] units and values as [s/u, h] units, where a unit is
//   4 bytes: u = 2 bf16 (a pair along the contraction, the operand of AVX512-BF16
//   `vdpbf16ps`) or u = 1 float32 (`vfmadd`); a query row and a probability row are already
//   rows of units in their natural order, and are broadcast one unit at a time;
// * only the 16-key blocks some row of the item may attend to are packed, back to back (a
//   decode step in a cache bucket skips the unwritten slots between the written ones and its
//   own key: GPT-2 124M bf16 decode at batch 8, 128 slots, 4.1 -> 2.0 ms of a ~16 ms step);
// * per 12 query rows, the scores are computed only over those blocks between the first and
//   the last key any of the rows may attend to (a causal or padding mask skips the rest),
//   then softmaxed in float32 and multiplied with the values; the 1/sum is applied at the end.
//
// Work items are spread over XLA's intra-op thread pool (parallel_chunks.h).

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "bf16_dot.h"
#include "parallel_chunks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define JAXACCEL_ATTENTION_KERNEL 1

constexpr int64_t kLane = 16;      // float32 lanes per vector = keys per score vector
constexpr int kBlockRows = 12;     // query rows softmaxed together
constexpr int kScoreRows = 6;      // rows x 4 vectors of scores in registers
constexpr int kScoreVectors = 4;
constexpr int kAccumulators = 24;  // value accumulators in registers (of 32 vector registers)
constexpr int64_t kItemRows = 256; // most query rows per work item

struct Bf16 {
  using Elem = uint16_t;
  static constexpr int kPerUnit = 2;
  static __m512 dot(__m512 acc, __m512i a, __m512i b) {
    return jaxaccel::bf16_dot_pairs(acc, a, b);
  }
  // 16 floats -> 16 bf16, rounded to nearest even (as XLA's convert).
  static __m256i narrow(__m512 x) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(x);
#else
    __m512i bits = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x00400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
  }
  static void store(Elem* out, __m512 x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), narrow(x));
  }
};

struct F32 {
  using Elem = float;
  static constexpr int kPerUnit = 1;
  static __m512 dot(__m512 acc, __m512i a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  }
  static void store(Elem* out, __m512 x) { _mm512_storeu_ps(out, x); }
};

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp); exactly 0 below -87.3, as float32's
// exp underflows, so masked keys weigh exactly nothing.
inline __m512 exp_nonpositive(__m512 x) {
  __mmask16 alive = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(alive, _mm512_scalef_ps(y, n));
}

struct Shape {
  int64_t b, t, n, kv_heads, h, groups;
  int64_t cached, fresh, s;  // keys: cached ones first, then fresh ones; s = cached + fresh
  float scale;
};

// One thread's scratch, reused across items and calls (grown, never shrunk).
struct Scratch {
  std::vector<uint32_t> keys, values, probs;
  std::vector<float> scores;
  std::vector<int64_t> live;  // first keys of the item's live 16-key blocks, ascending
  std::vector<uint8_t> seen;  // [s]: some row of the item may attend to the key
};

template <typename T>
class Item {
 public:
  using Elem = typename T::Elem;
  static constexpr int kU = T::kPerUnit;

  Item(const Shape& shape, const Elem* q, const Elem* k, const Elem* v, const Elem* k_cached,
       const Elem* v_cached, const bool* mask, Elem* out, Scratch& scratch)
      : sh_(shape), q_(q), k_(k), v_(v), kc_(k_cached), vc_(v_cached), mask_(mask), out_(out),
        scratch_(scratch),
        s_pad_((shape.s + kLane - 1) / kLane * kLane), h_units_(shape.h / kU) {}

  // Query rows [row0, row1) of the (batch, kv head) pair; row r is query position r / g of
  // query head kv_head * g + r % g.
  void run(int64_t batch, int64_t kv_head, int64_t row0, int64_t row1) {
    batch_ = batch;
    kv_head_ = kv_head;
    find_live_blocks(row0, row1);  // only these keys are ever read
    pack_keys();
    pack_values();
    scratch_.scores.resize(kBlockRows * s_pad_);
    scratch_.probs.resize(kBlockRows * s_pad_ / kU);
    for (int64_t r = row0; r < row1; r += kBlockRows) block(r, std::min(row1, r + kBlockRows));
  }

 private:
  // Key j: cached ([b, kv_heads, cached, h]) below `cached`, else fresh ([b, fresh, kv_heads, h]).
  int64_t offset(int64_t j) const {
    if (j < sh_.cached) return ((batch_ * sh_.kv_heads + kv_head_) * sh_.cached + j) * sh_.h;
    return ((batch_ * sh_.fresh + j - sh_.cached) * sh_.kv_heads + kv_head_) * sh_.h;
  }
  const Elem* key_row(int64_t j) const { return (j < sh_.cached ? kc_ : k_) + offset(j); }
  const Elem* value_row(int64_t j) const { return (j < sh_.cached ? vc_ : v_) + offset(j); }
  int64_t head(int64_t r) const { return kv_head_ * sh_.groups + r % sh_.groups; }
  int64_t position(int64_t r) const { return r / sh_.groups; }
  const Elem* query_row(int64_t r) const {
    return q_ + ((batch_ * sh_.t + position(r)) * sh_.n + head(r)) * sh_.h;
  }
  Elem* out_row(int64_t r) const {
    return out_ + ((batch_ * sh_.t + position(r)) * sh_.n + head(r)) * sh_.h;
  }
  const bool* mask_row(int64_t r) const { return mask_ + (batch_ * sh_.t + position(r)) * sh_.s; }

  // keys[u, c] = unit u of the key at compact position c (see find_live_blocks; zero past s):
  // 16 keys x 16 units at a time, transposed in registers.
  void pack_keys() {
    std::vector<uint32_t>& keys = scratch_.keys;
    const int64_t stride = packed_;
    keys.resize(h_units_ * stride);
    for (int64_t c0 = 0; c0 < packed_; c0 += kLane) {
      const int64_t j0 = key_at(c0);
      for (int64_t u0 = 0; u0 < h_units_; u0 += kLane) {
        const int64_t units = std::min<int64_t>(kLane, h_units_ - u0);
        const __mmask16 valid = static_cast<__mmask16>((1u << units) - 1);
        __m512i rows[kLane];
        for (int64_t r = 0; r < kLane; ++r) {
          rows[r] = j0 + r < sh_.s
                        ? _mm512_maskz_loadu_epi32(
                              valid, reinterpret_cast<const uint32_t*>(key_row(j0 + r)) + u0)
                        : _mm512_setzero_si512();
        }
        transpose16(rows);
        for (int64_t u = 0; u < units; ++u) {
          _mm512_storeu_si512(keys.data() + (u0 + u) * stride + c0, rows[u]);
        }
      }
    }
  }

  // A 16 x 16 matrix of 32-bit units, one row per register, transposed in place.
  static void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {  // lane L: rows 2i, 2i+1 of columns 4L..4L+3, interleaved
      t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    __m512i u[16];  // u[4i + k], lane L: rows 4i..4i+3 of column 4L + k
    for (int i = 0; i < 4; ++i) {
      u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
      u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
      u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int k = 0; k < 4; ++k) {  // column 4L + k gathers lane L of u[k], u[4+k], u[8+k], u[12+k]
      __m512i x01 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44);
      __m512i y01 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
      __m512i x23 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
      __m512i y23 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
      r[k] = _mm512_shuffle_i32x4(x01, y01, 0x88);
      r[4 + k] = _mm512_shuffle_i32x4(x01, y01, 0xDD);
      r[8 + k] = _mm512_shuffle_i32x4(x23, y23, 0x88);
      r[12 + k] = _mm512_shuffle_i32x4(x23, y23, 0xDD);
    }
  }

  // values[i, c] = the value rows at compact positions i*u .. i*u+u-1 at column c, as one
  // unit (zero past s).
  void pack_values() {
    std::vector<uint32_t>& values = scratch_.values;
    const int64_t h = sh_.h, units = packed_ / kU;
    values.resize(units * h);
    for (int64_t i = 0; i < units; ++i) {
      uint32_t* dst = values.data() + i * h;
      const int64_t j = key_at(i * kU);  // a unit's rows are in one block
      if constexpr (kU == 2) {
        for (int64_t c = 0; c < h; c += kLane) {  // bf16 pairs (even row, odd row)
          __m512i even = j < sh_.s ? load_widened(value_row(j) + c) : _mm512_setzero_si512();
          __m512i odd = j + 1 < sh_.s ? load_widened(value_row(j + 1) + c)
                                      : _mm512_setzero_si512();
          _mm512_storeu_si512(dst + c, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
        }
      } else if (j < sh_.s) {
        std::memcpy(dst, value_row(j), h * sizeof(float));
      } else {
        std::memset(dst, 0, h * sizeof(float));
      }
    }
  }

  static __m512i load_widened(const uint16_t* x) {  // 16 x 16 bits -> 16 x 32 bits
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }

  // The 16-key blocks any of rows [r0, r1) may attend to (all of them if a row attends to
  // none: its weights are then uniform over every key), packed back to back: compact key
  // position c is key key_at(c). A decode step over a cache bucket sees the written slots
  // and its own key, not the unwritten slots between them.
  void find_live_blocks(int64_t r0, int64_t r1) {
    // seen[j]: some row may attend to key j (the rows' masks OR-ed, 64 keys at a time).
    std::vector<uint8_t>& seen = scratch_.seen;
    seen.assign(sh_.s, 0);
    bool attends_none = false;
    for (int64_t r = r0; r < r1; ++r) {
      const bool* m = mask_row(r);
      if (r > r0 && m == mask_row(r - 1)) continue;  // the query heads of a group share it
      __mmask64 row_any = 0;
      for (int64_t j = 0; j < sh_.s; j += 64) {
        const int64_t n = std::min<int64_t>(64, sh_.s - j);
        const __mmask64 in = n == 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
        __m512i bits = _mm512_maskz_loadu_epi8(in, m + j);
        row_any |= _mm512_test_epi8_mask(bits, bits);
        _mm512_mask_storeu_epi8(seen.data() + j, in,
                                _mm512_or_si512(bits, _mm512_maskz_loadu_epi8(in, seen.data() + j)));
      }
      attends_none = attends_none || row_any == 0;
    }
    std::vector<int64_t>& live = scratch_.live;
    live.clear();
    for (int64_t j = 0; j < sh_.s; j += kLane) {
      const int64_t n = std::min<int64_t>(kLane, sh_.s - j);
      if (attends_none || std::memchr(seen.data() + j, 1, n) != nullptr) live.push_back(j);
    }
    packed_ = static_cast<int64_t>(live.size()) * kLane;
  }

  int64_t key_at(int64_t c) const { return scratch_.live[c / kLane] + c % kLane; }

  // Compact position of the first live block at or after key j (packed_ if none).
  int64_t compact_at_or_after(int64_t j) const {
    const std::vector<int64_t>& live = scratch_.live;
    return (std::lower_bound(live.begin(), live.end(), j) - live.begin()) * kLane;
  }

  // Keys [lo, hi) (multiples of kLane) that rows [r0, r1) may attend to; all keys if any
  // row attends to none (its weights are then uniform over all of them).
  void key_range(int64_t r0, int64_t r1, int64_t* lo, int64_t* hi) const {
    int64_t first = sh_.s, last = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const bool* m = mask_row(r);
      const void* f = std::memchr(m, 1, sh_.s);
      if (f == nullptr) {
        *lo = 0;
        *hi = s_pad_;
        return;
      }
      first = std::min<int64_t>(first, static_cast<const bool*>(f) - m);
      const void* l = memrchr(m, 1, sh_.s);
      last = std::max<int64_t>(last, static_cast<const bool*>(l) - m + 1);
    }
    *lo = first / kLane * kLane;
    *hi = (last + kLane - 1) / kLane * kLane;
  }

  // Rows [r0, r1): their scores over the live blocks within their own key range (compact
  // positions [lo, hi)), softmax, values.
  void block(int64_t r0, int64_t r1) {
    int64_t first, last;
    key_range(r0, r1, &first, &last);
    const int64_t lo = compact_at_or_after(first), hi = compact_at_or_after(last);
    int64_t rows = r1 - r0;
    for (int64_t r = 0; r < rows; ++r) best_[r] = _mm512_set1_ps(-INFINITY);
    for (int64_t r = 0; r < rows; r += kScoreRows) {
      int64_t count = std::min<int64_t>(kScoreRows, rows - r);
      for (int64_t j = lo; j < hi; j += kLane * kScoreVectors) {
        int vectors = static_cast<int>(std::min<int64_t>(kScoreVectors, (hi - j) / kLane));
        score_tile_dispatch(count, vectors, r0 + r, r, j, lo);
      }
    }
    float inverse[kBlockRows];
    for (int64_t r = 0; r < rows; ++r) inverse[r] = softmax(r, lo, hi);
    values_dispatch(r0, rows, lo, hi, inverse);
  }

  // scores[row, j - lo] for ROWS query rows x VECTORS*16 keys from compact position j.
  template <int ROWS, int VECTORS>
  void score_tile(int64_t row, int64_t slot, int64_t j, int64_t lo) {
    __m512 acc[ROWS][VECTORS];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < VECTORS; ++c) acc[r][c] = _mm512_setzero_ps();
    const uint32_t* q[ROWS];
    for (int r = 0; r < ROWS; ++r) q[r] = reinterpret_cast<const uint32_t*>(query_row(row + r));
    const int64_t stride = packed_;
    const uint32_t* keys = scratch_.keys.data() + j;
    for (int64_t u = 0; u < h_units_; ++u, keys += stride) {
      __m512i line[VECTORS];
      for (int c = 0; c < VECTORS; ++c) line[c] = _mm512_loadu_si512(keys + c * kLane);
      for (int r = 0; r < ROWS; ++r) {
        __m512i qu = _mm512_set1_epi32(static_cast<int>(q[r][u]));
        for (int c = 0; c < VECTORS; ++c) acc[r][c] = T::dot(acc[r][c], line[c], qu);
      }
    }
    // Scaled and masked as they are stored, the row maxima kept: the softmax then needs one
    // pass. Masked keys score finfo(float32).min (exactly the plain code's constant), keys
    // past s -inf (they weigh 0 even in a row with nothing to attend to).
    const __m512 scale = _mm512_set1_ps(sh_.scale), lowest = _mm512_set1_ps(-FLT_MAX);
    for (int c = 0; c < VECTORS; ++c) {
      const int64_t key = key_at(j + c * kLane), at = j + c * kLane - lo;
      const __mmask16 inside = key + kLane <= sh_.s ? 0xFFFF
                               : key >= sh_.s ? 0
                               : static_cast<__mmask16>((1u << (sh_.s - key)) - 1);
      for (int r = 0; r < ROWS; ++r) {
        const bool* mask = mask_row(row + r) + key;
        __mmask16 allowed = _mm_mask_test_epi8_mask(inside, _mm_maskz_loadu_epi8(inside, mask),
                                                    _mm_set1_epi8(-1));
        __m512 x = _mm512_mask_mul_ps(lowest, allowed, acc[r][c], scale);
        x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), inside, x);
        _mm512_storeu_ps(scratch_.scores.data() + (slot + r) * s_pad_ + at, x);
        best_[slot + r] = _mm512_max_ps(best_[slot + r], x);
      }
    }
  }

  template <int ROWS>
  void score_rows(int vectors, int64_t row, int64_t slot, int64_t j, int64_t lo) {
    switch (vectors) {
      case 4: score_tile<ROWS, 4>(row, slot, j, lo); break;
      case 3: score_tile<ROWS, 3>(row, slot, j, lo); break;
      case 2: score_tile<ROWS, 2>(row, slot, j, lo); break;
      default: score_tile<ROWS, 1>(row, slot, j, lo); break;
    }
  }

  void score_tile_dispatch(int64_t rows, int vectors, int64_t row, int64_t slot, int64_t j,
                           int64_t lo) {
    switch (rows) {
      case 6: score_rows<6>(vectors, row, slot, j, lo); break;
      case 5: score_rows<5>(vectors, row, slot, j, lo); break;
      case 4: score_rows<4>(vectors, row, slot, j, lo); break;
      case 3: score_rows<3>(vectors, row, slot, j, lo); break;
      case 2: score_rows<2>(vectors, row, slot, j, lo); break;
      default: score_rows<1>(vectors, row, slot, j, lo); break;
    }
  }

  // Softmax of one row's scaled, masked scores over keys [lo, hi): unnormalised float32
  // weights into the probability row (as units), 1/sum returned.
  float softmax(int64_t slot, int64_t lo, int64_t hi) {
    const float* scores = scratch_.scores.data() + slot * s_pad_;
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best_[slot]));
    __m512 total = _mm512_setzero_ps();
    typename T::Elem* probs = reinterpret_cast<typename T::Elem*>(
        scratch_.probs.data() + slot * s_pad_ / kU);
    for (int64_t j = lo; j < hi; j += kLane) {
      // Keys past s score -inf: exp_nonpositive gives them exactly 0.
      __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + j - lo), top));
      total = _mm512_add_ps(total, e);
      T::store(probs + (j - lo), e);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
  }

  // out rows = probs . values * 1/sum, ROWS rows x HV*16 columns in registers.
  template <int ROWS, int HV>
  void value_tile(int64_t row, int64_t slot, int64_t lo, int64_t hi, const float* inverse) {
    __m512 acc[ROWS][HV];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < HV; ++c) acc[r][c] = _mm512_setzero_ps();
    const int64_t p_stride = s_pad_ / kU;
    const uint32_t* probs = scratch_.probs.data() + slot * p_stride;
    const uint32_t* values = scratch_.values.data() + lo / kU * sh_.h;
    for (int64_t i = 0; i < (hi - lo) / kU; ++i, values += sh_.h) {
      __m512i line[HV];
      for (int c = 0; c < HV; ++c) line[c] = _mm512_loadu_si512(values + c * kLane);
      for (int r = 0; r < ROWS; ++r) {
        __m512i p = _mm512_set1_epi32(static_cast<int>(probs[r * p_stride + i]));
        for (int c = 0; c < HV; ++c) acc[r][c] = T::dot(acc[r][c], line[c], p);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      __m512 inv = _mm512_set1_ps(inverse[slot + r]);
      Elem* out = out_row(row + r);
      for (int c = 0; c < HV; ++c) T::store(out + c * kLane, _mm512_mul_ps(acc[r][c], inv));
    }
  }

  template <int HV>
  void value_rows(int64_t row0, int64_t rows, int64_t lo, int64_t hi, const float* inverse) {
    constexpr int kRows = std::min(kBlockRows, std::max(1, kAccumulators / HV));
    int64_t r = 0;
    for (; r + kRows <= rows; r += kRows) value_tile<kRows, HV>(row0 + r, r, lo, hi, inverse);
    for (; r < rows; ++r) value_tile<1, HV>(row0 + r, r, lo, hi, inverse);
  }

  void values_dispatch(int64_t row0, int64_t rows, int64_t lo, int64_t hi,
                       const float* inverse) {
    switch (sh_.h / kLane) {
      case 1: value_rows<1>(row0, rows, lo, hi, inverse); break;
      case 2: value_rows<2>(row0, rows, lo, hi, inverse); break;
      case 3: value_rows<3>(row0, rows, lo, hi, inverse); break;
      case 4: value_rows<4>(row0, rows, lo, hi, inverse); break;
      case 5: value_rows<5>(row0, rows, lo, hi, inverse); break;
      case 6: value_rows<6>(row0, rows, lo, hi, inverse); break;
      case 7: value_rows<7>(row0, rows, lo, hi, inverse); break;
      default: value_rows<8>(row0, rows, lo, hi, inverse); break;
    }
  }

  const Shape& sh_;
  const Elem *q_, *k_, *v_, *kc_, *vc_;
  const bool* mask_;
  Elem* out_;
  Scratch& scratch_;
  const int64_t s_pad_, h_units_;
  int64_t batch_ = 0, kv_head_ = 0;
  int64_t packed_ = 0;  // the item's packed keys: live blocks x kLane (find_live_blocks)
  __m512 best_[kBlockRows];  // per block row: the running maximum of its scores, per lane
};

template <typename T>
void run_all(ffi::ThreadPool& pool, const Shape& sh, const typename T::Elem* q,
             const typename T::Elem* k, const typename T::Elem* v,
             const typename T::Elem* k_cached, const typename T::Elem* v_cached,
             const bool* mask, typename T::Elem* out) {
  const int64_t rows = sh.t * sh.groups;
  const int64_t per_item = std::min<int64_t>(kItemRows, (rows + kBlockRows - 1) / kBlockRows *
                                                            kBlockRows);
  const int64_t chunks = (rows + per_item - 1) / per_item;
  const int64_t items = sh.b * sh.kv_heads * chunks;
  jaxaccel::parallel_chunks(pool, items, items, [&](int64_t first, int64_t end) {
    thread_local Scratch scratch;
    Item<T> item(sh, q, k, v, k_cached, v_cached, mask, out, scratch);
    for (int64_t i = first; i < end; ++i) {
      int64_t chunk = i % chunks, pair = i / chunks;
      int64_t row0 = chunk * per_item;
      item.run(pair / sh.kv_heads, pair % sh.kv_heads, row0, std::min(rows, row0 + per_item));
    }
  });
}
#endif

// The cached keys or values: [b, kv_heads, s_c, h], or a whole stacked cache
// [layers, b, kv_heads, s_c, h] of which `layer` is read in place (a slice taken in XLA would
// be copied out of the stack on every decode step). Elements are D, or for bf16 also their
// uint16 bits (the CPU backend's cache carrier before jax 0.12). Null on a mismatch.
template <ffi::DataType D>
const void* cached_layer(const ffi::AnyBuffer& c, int64_t layer, ffi::Span<const int64_t>& dims) {
  auto all = c.dimensions();
  const bool bits_ok = c.element_type() == D ||
                       (D == ffi::DataType::BF16 && c.element_type() == ffi::DataType::U16);
  if (!bits_ok || (all.size() != 4 && all.size() != 5)) return nullptr;
  const int64_t layers = all.size() == 5 ? all[0] : 1;
  if (layer < 0 || layer >= layers) return nullptr;
  dims = all.size() == 5 ? all.last(4) : all;
  const int64_t per_layer = dims[0] * dims[1] * dims[2] * dims[3];
  return static_cast<const char*>(c.untyped_data()) +
         layer * per_layer * static_cast<int64_t>(ffi::ByteWidth(D));
}

// q [b, t, n, h]; fresh keys/values k, v [b, t', kv_heads, h]; cached ones kc, vc (see
// cached_layer; s_c may be 0); mask [b, t, s_c + t'] over cached then fresh keys.
template <ffi::DataType D>
ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<D> q, ffi::Buffer<D> k,
                         ffi::Buffer<D> v, ffi::AnyBuffer kc, ffi::AnyBuffer vc,
                         ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::PRED> mask, float scale,
                         ffi::ResultBuffer<D> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  ffi::Span<const int64_t> cd, cvd;
  const int64_t index = layer.element_count() == 1 ? layer.typed_data()[0] : -1;
  const void* kc_data = cached_layer<D>(kc, index, cd);
  const void* vc_data = cached_layer<D>(vc, index, cvd);
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kc_data == nullptr ||
      vc_data == nullptr || kc.element_type() != vc.element_type() || md.size() != 3) {
    return ffi::Error::InvalidArgument(
        "attention: expected q [b, t, n, h], k and v [b, t', kv_heads, h], cached k and v "
        "[(layers,) b, kv_heads, s_c, h] of q's dtype (bf16: or uint16 bits) and a layer "
        "index in range, mask [b, t, s_c + t']");
  }
  Shape sh{qd[0], qd[1], qd[2], kd[2], qd[3], 0, cd[2], kd[1], cd[2] + kd[1], scale};
  bool same_kv = std::equal(kd.begin(), kd.end(), vd.begin()) &&
                 std::equal(cd.begin(), cd.end(), cvd.begin());
  if (!same_kv || kd[0] != sh.b || kd[3] != sh.h || cd[0] != sh.b || cd[1] != sh.kv_heads ||
      cd[3] != sh.h || sh.kv_heads == 0 || sh.n % sh.kv_heads || md[0] != sh.b ||
      md[1] != sh.t || md[2] != sh.s || sh.h % 16 || sh.h > 128 || sh.s == 0) {
    return ffi::Error::InvalidArgument(
        "attention: shapes disagree (need k == v shapes, n % kv_heads == 0, h % 16 == 0, "
        "h <= 128, mask [b, t, s_c + t'])");
  }
  sh.groups = sh.n / sh.kv_heads;
#if defined(JAXACCEL_ATTENTION_KERNEL)
  const bool* m = mask.typed_data();
  if constexpr (D == ffi::DataType::BF16) {
    using E = uint16_t;
    auto data = [](auto& buffer) { return reinterpret_cast<const E*>(buffer.typed_data()); };
    run_all<Bf16>(pool, sh, data(q), data(k), data(v), static_cast<const E*>(kc_data),
                  static_cast<const E*>(vc_data), m, reinterpret_cast<E*>(out->typed_data()));
  } else {
    run_all<F32>(pool, sh, q.typed_data(), k.typed_data(), v.typed_data(),
                 static_cast<const float*>(kc_data), static_cast<const float*>(vc_data), m,
                 out->typed_data());
  }
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("attention: built without AVX-512 (F, BW, VL)");
#endif
}

}  // namespace

#define JAXACCEL_ATTENTION_BINDING(D)         \
  ffi::Ffi::Bind()                            \
      .Ctx<ffi::ThreadPool>()                 \
      .Arg<ffi::Buffer<D>>()                  \
      .Arg<ffi::Buffer<D>>()                  \
      .Arg<ffi::Buffer<D>>()                  \
      .Arg<ffi::AnyBuffer>()                  \
      .Arg<ffi::AnyBuffer>()                  \
      .Arg<ffi::Buffer<ffi::S32>>()           \
      .Arg<ffi::Buffer<ffi::PRED>>()          \
      .Attr<float>("scale")                   \
      .Ret<ffi::Buffer<D>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelAttentionBf16, AttentionImpl<ffi::DataType::BF16>,
                              JAXACCEL_ATTENTION_BINDING(ffi::DataType::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelAttentionF32, AttentionImpl<ffi::DataType::F32>,
                              JAXACCEL_ATTENTION_BINDING(ffi::DataType::F32));
