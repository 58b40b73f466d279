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
// The same work items also serve the generation engine's ragged batches over a paged pool
// (JaxaccelPagedAttention*, the contract of jaxaccel/backends/paged.py): a sequence's cached
// key j is read in place at slot j % c of page table[j / c] of the layer's pool
// [pages, kv_heads, c, h] (no gather copy), its fresh keys follow, and its causal (and
// sliding-window) mask is made per item from the lengths instead of read from memory.
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
//
// Two builds (jaxaccel/backends/cpu/isa.py picks one): AVX-512 (F, BW, VL; -march=native) and
// AVX2 + FMA (-march=x86-64-v3: AMD Zen 2/3, Intel client parts). Both run this code on the
// 16-lane vectors of simd16.h (one zmm, or two ymm with bf16 widened to float32 in registers);
// the AVX2 build uses smaller register tiles. Other CPUs get no kernel (plain XLA).

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel_chunks.h"
#include "simd16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t b, t, n, kv_heads, h, groups;
  int64_t cached, fresh, s;  // keys: cached ones first, then fresh ones; s = cached + fresh
  float scale;
  int64_t page_size = 0;  // paged: slots per page
  int64_t window = 0;     // paged: a query at position p sees keys above p - window (0: all)
};

// What one work item reads: one sequence (a batch row, or a ragged sequence over pages).
template <typename Elem>
struct SeqView {
  const Elem *q, *k, *v;  // its first query / fresh key / fresh value token [tokens, heads, h]
  Elem* out;              // its first output token [tokens, n, h]
  // Dense: the row's cached keys/values [kv_heads, s_c, h]; paged: the layer's pages
  // [pages, kv_heads, page_size, h], of which `table` lists the sequence's in order.
  const Elem *kc, *vc;
  const int32_t* table;
  const bool* mask;  // dense: [t, s] by query position; paged: null (causal, made per item)
  int64_t t, cached, s;  // queries, cached keys, all keys (cached + fresh)
};

#if defined(JAXACCEL_SIMD16_AVX512) || defined(JAXACCEL_SIMD16_AVX2)
#define JAXACCEL_ATTENTION_KERNEL 1
namespace v16 = jaxaccel::v16;

constexpr int64_t kLane = 16;      // float32 lanes per vector = keys per score vector
constexpr int kBlockRows = 12;     // query rows softmaxed together
constexpr int64_t kItemRows = 256; // most query rows per work item
// Score tiles (rows x vectors) and value accumulators sized to the register file: with 32
// zmm, 6 x 4 scores or 24 accumulators; with 16 ymm (two per 16-lane vector, and bf16 lines
// widened into two more), 4 x 1 scores or 4 accumulators.
constexpr bool kWide = v16::kRegisters == 32;
constexpr int kScoreRows = kWide ? 6 : 4;
constexpr int kScoreVectors = kWide ? 4 : 1;
constexpr int kAccumulators = kWide ? 24 : 4;

struct Bf16 {
  using Elem = uint16_t;
  static constexpr int kPerUnit = 2;
  static v16::f32 dot(v16::f32 acc, v16::u32 a, v16::u32 b) {
    return v16::dot_bf16_pairs(acc, a, b);
  }
  static void store(Elem* out, v16::f32 x) { v16::store_bf16(out, x); }
  static v16::f32 load(const Elem* p) { return v16::load_bf16(p); }
};

struct F32 {
  using Elem = float;
  static constexpr int kPerUnit = 1;
  static v16::f32 dot(v16::f32 acc, v16::u32 a, v16::u32 b) {
    return v16::fmadd(v16::as_float(a), v16::as_float(b), acc);
  }
  static void store(Elem* out, v16::f32 x) { v16::store(out, x); }
  static v16::f32 load(const Elem* p) { return v16::load(p); }
};

// One thread's scratch, reused across items and calls (grown, never shrunk).
struct Scratch {
  std::vector<uint32_t> keys, values, probs;
  std::vector<float> scores;
  std::vector<int64_t> live;  // first keys of the item's live 16-key blocks, ascending
  std::vector<uint8_t> seen;  // [s]: some row of the item may attend to the key
  std::vector<uint8_t> mask;  // paged: the item's causal mask rows [positions, s]
};

template <typename T>
class Item {
 public:
  using Elem = typename T::Elem;
  static constexpr int kU = T::kPerUnit;

  Item(const Shape& shape, Scratch& scratch)
      : sh_(shape), scratch_(scratch), h_units_(shape.h / kU) {}

  // Query rows [row0, row1) of the (sequence, kv head) pair; row r is query position r / g
  // of query head kv_head * g + r % g.
  void run(const SeqView<Elem>& seq, int64_t kv_head, int64_t row0, int64_t row1) {
    seq_ = seq;
    kv_head_ = kv_head;
    s_pad_ = (seq.s + kLane - 1) / kLane * kLane;
    if (seq_.mask == nullptr) causal_mask(row0, row1);
    find_live_blocks(row0, row1);  // only these keys are ever read
    pack_keys();
    pack_values();
    scratch_.scores.resize(kBlockRows * s_pad_);
    scratch_.probs.resize(kBlockRows * s_pad_ / kU);
    for (int64_t r = row0; r < row1; r += kBlockRows) block(r, std::min(row1, r + kBlockRows));
  }

 private:
  // Key j: cached below `cached` (a row of the dense [kv_heads, s_c, h] block, or slot
  // j % c of page table[j / c]), else fresh ([tokens, kv_heads, h]).
  int64_t cached_offset(int64_t j) const {
    if (seq_.table == nullptr) return (kv_head_ * seq_.cached + j) * sh_.h;
    const int64_t c = sh_.page_size;
    return ((seq_.table[j / c] * sh_.kv_heads + kv_head_) * c + j % c) * sh_.h;
  }
  int64_t fresh_offset(int64_t j) const {
    return ((j - seq_.cached) * sh_.kv_heads + kv_head_) * sh_.h;
  }
  const Elem* key_row(int64_t j) const {
    return j < seq_.cached ? seq_.kc + cached_offset(j) : seq_.k + fresh_offset(j);
  }
  const Elem* value_row(int64_t j) const {
    return j < seq_.cached ? seq_.vc + cached_offset(j) : seq_.v + fresh_offset(j);
  }
  int64_t head(int64_t r) const { return kv_head_ * sh_.groups + r % sh_.groups; }
  int64_t position(int64_t r) const { return r / sh_.groups; }
  const Elem* query_row(int64_t r) const {
    return seq_.q + (position(r) * sh_.n + head(r)) * sh_.h;
  }
  Elem* out_row(int64_t r) const { return seq_.out + (position(r) * sh_.n + head(r)) * sh_.h; }
  const bool* mask_row(int64_t r) const {
    if (seq_.mask != nullptr) return seq_.mask + position(r) * seq_.s;
    return reinterpret_cast<const bool*>(scratch_.mask.data()) +
           (position(r) - mask_first_) * seq_.s;
  }

  // Paged sequences: the mask rows of query positions [row0 / g, (row1 - 1) / g]. Query
  // position p is key cached + p (its own fresh key); it sees keys up to itself and, with a
  // window w, above cached + p - w.
  void causal_mask(int64_t row0, int64_t row1) {
    mask_first_ = position(row0);
    const int64_t positions = position(row1 - 1) - mask_first_ + 1, s = seq_.s;
    std::vector<uint8_t>& mask = scratch_.mask;
    mask.assign(positions * s, 0);
    for (int64_t p = 0; p < positions; ++p) {
      const int64_t self = seq_.cached + mask_first_ + p;
      const int64_t first = sh_.window > 0 ? std::max<int64_t>(0, self - sh_.window + 1) : 0;
      std::memset(mask.data() + p * s + first, 1, std::min(self, s - 1) - first + 1);
    }
  }

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
        v16::u32 rows[kLane];
        for (int64_t r = 0; r < kLane; ++r) {
          rows[r] = j0 + r < seq_.s
                        ? v16::load_first(
                              reinterpret_cast<const uint32_t*>(key_row(j0 + r)) + u0, units)
                        : v16::zero_bits();
        }
        v16::transpose(rows);
        for (int64_t u = 0; u < units; ++u) {
          v16::store_bits(keys.data() + (u0 + u) * stride + c0, rows[u]);
        }
      }
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
          v16::u32 even = j < seq_.s ? v16::widen16(value_row(j) + c) : v16::zero_bits();
          v16::u32 odd = j + 1 < seq_.s ? v16::widen16(value_row(j + 1) + c) : v16::zero_bits();
          v16::store_bits(dst + c, v16::pair_up(even, odd));
        }
      } else if (j < seq_.s) {
        std::memcpy(dst, value_row(j), h * sizeof(float));
      } else {
        std::memset(dst, 0, h * sizeof(float));
      }
    }
  }

  // The 16-key blocks any of rows [r0, r1) may attend to (all of them if a row attends to
  // none: its weights are then uniform over every key), packed back to back: compact key
  // position c is key key_at(c). A decode step over a cache bucket sees the written slots
  // and its own key, not the unwritten slots between them.
  void find_live_blocks(int64_t r0, int64_t r1) {
    // seen[j]: some row may attend to key j (the rows' masks OR-ed, 64 keys at a time).
    std::vector<uint8_t>& seen = scratch_.seen;
    seen.assign(seq_.s, 0);
    bool attends_none = false;
    for (int64_t r = r0; r < r1; ++r) {
      const bool* m = mask_row(r);
      if (r > r0 && m == mask_row(r - 1)) continue;  // the query heads of a group share it
      attends_none = !v16::or_into(seen.data(), m, seq_.s) || attends_none;
    }
    std::vector<int64_t>& live = scratch_.live;
    live.clear();
    for (int64_t j = 0; j < seq_.s; j += kLane) {
      const int64_t n = std::min<int64_t>(kLane, seq_.s - j);
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
    int64_t first = seq_.s, last = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const bool* m = mask_row(r);
      const void* f = std::memchr(m, 1, seq_.s);
      if (f == nullptr) {
        *lo = 0;
        *hi = s_pad_;
        return;
      }
      first = std::min<int64_t>(first, static_cast<const bool*>(f) - m);
      const void* l = memrchr(m, 1, seq_.s);
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
    for (int64_t r = 0; r < rows; ++r) best_[r] = v16::splat(-INFINITY);
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
    v16::f32 acc[ROWS][VECTORS];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < VECTORS; ++c) acc[r][c] = v16::zero();
    const uint32_t* q[ROWS];
    for (int r = 0; r < ROWS; ++r) q[r] = reinterpret_cast<const uint32_t*>(query_row(row + r));
    const int64_t stride = packed_;
    const uint32_t* keys = scratch_.keys.data() + j;
    for (int64_t u = 0; u < h_units_; ++u, keys += stride) {
      v16::u32 line[VECTORS];
      for (int c = 0; c < VECTORS; ++c) line[c] = v16::load_bits(keys + c * kLane);
      for (int r = 0; r < ROWS; ++r) {
        v16::u32 qu = v16::splat_bits(q[r][u]);
        for (int c = 0; c < VECTORS; ++c) acc[r][c] = T::dot(acc[r][c], line[c], qu);
      }
    }
    // Scaled and masked as they are stored, the row maxima kept: the softmax then needs one
    // pass. Masked keys score finfo(float32).min (exactly the plain code's constant), keys
    // past s -inf (they weigh 0 even in a row with nothing to attend to).
    const v16::f32 scale = v16::splat(sh_.scale), lowest = v16::splat(-FLT_MAX);
    const v16::f32 past = v16::splat(-INFINITY);
    for (int c = 0; c < VECTORS; ++c) {
      const int64_t key = key_at(j + c * kLane), at = j + c * kLane - lo;
      const int64_t keys_in = std::clamp<int64_t>(seq_.s - key, 0, kLane);
      const v16::mask inside = v16::first_lanes(keys_in);
      for (int r = 0; r < ROWS; ++r) {
        const v16::mask allowed = v16::true_bytes(mask_row(row + r) + key, keys_in);
        v16::f32 x = v16::select(allowed, v16::mul(acc[r][c], scale), lowest);
        x = v16::select(inside, x, past);
        v16::store(scratch_.scores.data() + (slot + r) * s_pad_ + at, x);
        best_[slot + r] = v16::max(best_[slot + r], x);
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
    const v16::f32 top = v16::splat(v16::reduce_max(best_[slot]));
    v16::f32 total = v16::zero();
    typename T::Elem* probs = reinterpret_cast<typename T::Elem*>(
        scratch_.probs.data() + slot * s_pad_ / kU);
    for (int64_t j = lo; j < hi; j += kLane) {
      // Keys past s score -inf: exp_nonpositive gives them exactly 0.
      v16::f32 e = v16::exp_nonpositive(v16::sub(v16::load(scores + j - lo), top));
      total = v16::add(total, e);
      T::store(probs + (j - lo), e);
    }
    return 1.0f / v16::reduce_add(total);
  }

  // out rows = probs . values * 1/sum, ROWS rows x HV*16 columns in registers.
  template <int ROWS, int HV>
  void value_tile(int64_t row, int64_t slot, int64_t lo, int64_t hi, const float* inverse) {
    v16::f32 acc[ROWS][HV];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < HV; ++c) acc[r][c] = v16::zero();
    const int64_t p_stride = s_pad_ / kU;
    const uint32_t* probs = scratch_.probs.data() + slot * p_stride;
    const uint32_t* values = scratch_.values.data() + lo / kU * sh_.h;
    for (int64_t i = 0; i < (hi - lo) / kU; ++i, values += sh_.h) {
      v16::u32 line[HV];
      for (int c = 0; c < HV; ++c) line[c] = v16::load_bits(values + c * kLane);
      for (int r = 0; r < ROWS; ++r) {
        v16::u32 p = v16::splat_bits(probs[r * p_stride + i]);
        for (int c = 0; c < HV; ++c) acc[r][c] = T::dot(acc[r][c], line[c], p);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      v16::f32 inv = v16::splat(inverse[slot + r]);
      Elem* out = out_row(row + r);
      for (int c = 0; c < HV; ++c) T::store(out + c * kLane, v16::mul(acc[r][c], inv));
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
  Scratch& scratch_;
  const int64_t h_units_;
  SeqView<Elem> seq_{};
  int64_t s_pad_ = 0, kv_head_ = 0;
  int64_t mask_first_ = 0;  // paged: the query position of scratch_.mask's first row
  int64_t packed_ = 0;  // the item's packed keys: live blocks x kLane (find_live_blocks)
  v16::f32 best_[kBlockRows];  // per block row: the running maximum of its scores, per lane
};

// A decoding sequence (one query token) over pages, for one kv head: its g query heads
// against keys [first, s), read in place, each once. `Item` packs an item's keys and values
// into tiles first, which pays off over many query rows; with g rows the packing would be most
// of the work (GPT-2 124M float32, 64 sequences x 210 keys: 98 -> 19 ms of a ~200 ms step;
// scripts/bench_paged_decode.py). Scores, softmax and the value sums are float32.
template <typename T>
class DecodeItem {
 public:
  using Elem = typename T::Elem;

  DecodeItem(const Shape& shape, Scratch& scratch) : sh_(shape), scratch_(scratch) {}

  void run(const SeqView<Elem>& seq, int64_t kv_head) {
    seq_ = seq;
    kv_head_ = kv_head;
    const int64_t self = seq.s - 1;  // the token's own key: the last one
    first_ = sh_.window > 0 ? std::max<int64_t>(0, self - sh_.window + 1) : 0;
    keys_ = seq.s - first_;
    keys_pad_ = (keys_ + kLane - 1) / kLane * kLane;
    load_queries();
    switch (sh_.h / kLane) {
      case 1: scores<1>(); values<1>(); break;
      case 2: scores<2>(); values<2>(); break;
      case 3: scores<3>(); values<3>(); break;
      case 4: scores<4>(); values<4>(); break;
      case 5: scores<5>(); values<5>(); break;
      case 6: scores<6>(); values<6>(); break;
      case 7: scores<7>(); values<7>(); break;
      default: scores<8>(); values<8>(); break;
    }
  }

 private:
  const Elem* key_row(int64_t j) const { return row(seq_.kc, seq_.k, j); }
  const Elem* value_row(int64_t j) const { return row(seq_.vc, seq_.v, j); }
  // Key j: slot j % c of page table[j / c] below `cached`, else the fresh token's.
  const Elem* row(const Elem* pages, const Elem* fresh, int64_t j) const {
    if (j >= seq_.cached) return fresh + ((j - seq_.cached) * sh_.kv_heads + kv_head_) * sh_.h;
    const int64_t c = sh_.page_size;
    return pages + ((seq_.table[j / c] * sh_.kv_heads + kv_head_) * c + j % c) * sh_.h;
  }

  // Pages are scattered in the pool, so the hardware prefetcher stops at each page's end:
  // the row a page ahead is fetched by hand.
  void prefetch_row(const Elem* pages, const Elem* fresh, int64_t j) const {
    if (j >= seq_.s) return;
    const char* at = reinterpret_cast<const char*>(row(pages, fresh, j));
    for (int64_t b = 0; b < sh_.h * static_cast<int64_t>(sizeof(Elem)); b += 64)
      _mm_prefetch(at + b, _MM_HINT_T0);
  }

  // The g query rows as float32, [g, h].
  void load_queries() {
    std::vector<float>& q = scratch_.scores;  // reused: the queries, then the scores
    q.resize(sh_.groups * sh_.h + sh_.groups * keys_pad_);
    for (int64_t r = 0; r < sh_.groups; ++r) {
      const Elem* src = seq_.q + (kv_head_ * sh_.groups + r) * sh_.h;
      for (int64_t c = 0; c < sh_.h; c += kLane) v16::store(q.data() + r * sh_.h + c,
                                                            T::load(src + c));
    }
  }
  float* queries() { return scratch_.scores.data(); }
  float* score_row(int64_t r) { return queries() + sh_.groups * sh_.h + r * keys_pad_; }

  // Scaled scores [g, keys] (-inf past the keys), softmaxed in place, unnormalised; the
  // rows' 1/sum in inverse_.
  template <int HV>
  void scores() {
    const int64_t g = sh_.groups;
    const float* q = queries();
    for (int64_t j = 0; j < keys_; ++j) {
      const Elem* key = key_row(first_ + j);
      prefetch_row(seq_.kc, seq_.k, first_ + j + sh_.page_size);
      v16::f32 k[HV];
      for (int c = 0; c < HV; ++c) k[c] = T::load(key + c * kLane);
      for (int64_t r = 0; r < g; ++r) {
        v16::f32 acc = v16::mul(v16::load(q + r * sh_.h), k[0]);
        for (int c = 1; c < HV; ++c) acc = v16::fmadd(v16::load(q + r * sh_.h + c * kLane),
                                                      k[c], acc);
        score_row(r)[j] = v16::reduce_add(acc) * sh_.scale;
      }
    }
    inverse_.resize(g);
    for (int64_t r = 0; r < g; ++r) {
      float* x = score_row(r);
      for (int64_t j = keys_; j < keys_pad_; ++j) x[j] = -INFINITY;
      v16::f32 best = v16::splat(-INFINITY);
      for (int64_t j = 0; j < keys_pad_; j += kLane) best = v16::max(best, v16::load(x + j));
      const v16::f32 top = v16::splat(v16::reduce_max(best));
      v16::f32 total = v16::zero();
      for (int64_t j = 0; j < keys_pad_; j += kLane) {
        const v16::f32 e = v16::exp_nonpositive(v16::sub(v16::load(x + j), top));
        total = v16::add(total, e);
        v16::store(x + j, e);
      }
      inverse_[r] = 1.0f / v16::reduce_add(total);
    }
  }

  // out rows = weights . values / sum, one row at a time (the item's values stay in cache
  // after the first).
  template <int HV>
  void values() {
    for (int64_t r = 0; r < sh_.groups; ++r) {
      const float* p = score_row(r);
      v16::f32 acc[HV];
      for (int c = 0; c < HV; ++c) acc[c] = v16::zero();
      for (int64_t j = 0; j < keys_; ++j) {
        const Elem* value = value_row(first_ + j);
        if (r == 0) prefetch_row(seq_.vc, seq_.v, first_ + j + sh_.page_size);
        const v16::f32 w = v16::splat(p[j]);
        for (int c = 0; c < HV; ++c) acc[c] = v16::fmadd(w, T::load(value + c * kLane), acc[c]);
      }
      const v16::f32 inv = v16::splat(inverse_[r]);
      Elem* out = seq_.out + (kv_head_ * sh_.groups + r) * sh_.h;
      for (int c = 0; c < HV; ++c) T::store(out + c * kLane, v16::mul(acc[c], inv));
    }
  }

  const Shape& sh_;
  Scratch& scratch_;
  SeqView<Elem> seq_{};
  int64_t kv_head_ = 0, first_ = 0, keys_ = 0, keys_pad_ = 0;
  std::vector<float> inverse_;
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
    Item<T> item(sh, scratch);
    for (int64_t i = first; i < end; ++i) {
      int64_t chunk = i % chunks, pair = i / chunks;
      int64_t row0 = chunk * per_item, b = pair / sh.kv_heads;
      const int64_t cached = b * sh.kv_heads * sh.cached * sh.h;
      SeqView<typename T::Elem> seq{q + b * sh.t * sh.n * sh.h, k + b * sh.fresh * sh.kv_heads * sh.h,
                                    v + b * sh.fresh * sh.kv_heads * sh.h,
                                    out + b * sh.t * sh.n * sh.h, k_cached + cached,
                                    v_cached + cached, nullptr, mask + b * sh.t * sh.s,
                                    sh.t, sh.cached, sh.s};
      item.run(seq, pair % sh.kv_heads, row0, std::min(rows, row0 + per_item));
    }
  });
}

// One work item of a ragged batch: query rows [row0, row1) of a sequence and kv head.
struct RaggedItem {
  int64_t seq, kv_head, row0, row1;
};

// The ragged batch over pages: sequence i's queries are tokens [cu[i], cu[i + 1]), its
// kv_lens[i] keys the first kv_lens[i] - q_len in its pages, then its own fresh tokens.
template <typename T>
void run_paged(ffi::ThreadPool& pool, const Shape& sh, const typename T::Elem* q,
               const typename T::Elem* k, const typename T::Elem* v,
               const typename T::Elem* k_pages, const typename T::Elem* v_pages,
               const int32_t* kv_lens, const int32_t* table, int64_t table_width,
               const int32_t* cu, int64_t num_seqs, typename T::Elem* out) {
  std::vector<RaggedItem> items;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t rows = (cu[i + 1] - cu[i]) * sh.groups;
    const int64_t per_item = std::min<int64_t>(kItemRows, (rows + kBlockRows - 1) /
                                                              kBlockRows * kBlockRows);
    for (int64_t kv_head = 0; kv_head < sh.kv_heads; ++kv_head)
      for (int64_t r = 0; r < rows; r += per_item)
        items.push_back({i, kv_head, r, std::min(rows, r + per_item)});
  }
  const int64_t count = static_cast<int64_t>(items.size());
  jaxaccel::parallel_chunks(pool, count, count, [&](int64_t first, int64_t end) {
    thread_local Scratch scratch;
    Item<T> item(sh, scratch);
    DecodeItem<T> decode(sh, scratch);
    for (int64_t i = first; i < end; ++i) {
      const RaggedItem& it = items[i];
      const int64_t token = cu[it.seq], q_len = cu[it.seq + 1] - token;
      const int64_t s = kv_lens[it.seq];
      SeqView<typename T::Elem> seq{q + token * sh.n * sh.h, k + token * sh.kv_heads * sh.h,
                                    v + token * sh.kv_heads * sh.h, out + token * sh.n * sh.h,
                                    k_pages, v_pages, table + it.seq * table_width, nullptr,
                                    q_len, s - q_len, s};
      if (q_len == 1 && it.row0 == 0 && it.row1 == sh.groups) {
        decode.run(seq, it.kv_head);
      } else {
        item.run(seq, it.kv_head, it.row0, it.row1);
      }
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
  return ffi::Error::Internal("attention: built without AVX-512 (F, BW, VL) or AVX2 + FMA");
#endif
}

// Checks a ragged batch's metadata before any page is read: every sequence below num_seqs
// has 0 <= q_len <= kv_len, its tokens inside q, its cached keys inside its page table and
// its pages inside the pool. An empty string when it holds, else what is wrong.
std::string check_ragged(const int32_t* kv_lens, const int32_t* table, int64_t seqs,
                         int64_t width, const int32_t* cu, int64_t num_seqs, int64_t tokens,
                         int64_t pages, int64_t page_size) {
  if (num_seqs < 0 || num_seqs > seqs) return "num_seqs outside [0, max_num_seqs]";
  if (cu[0] < 0) return "cu_q_lens[0] < 0";
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t q_len = cu[i + 1] - cu[i], cached = int64_t{kv_lens[i]} - q_len;
    if (q_len < 0 || cu[i + 1] > tokens) return "cu_q_lens not ascending within the tokens";
    if (cached < 0) return "a kv_lens entry is below its sequence's query count";
    if (cached > width * page_size) return "a sequence's cached keys overrun its page table";
    for (int64_t p = 0; p < (cached + page_size - 1) / page_size; ++p) {
      if (table[i * width + p] < 0 || table[i * width + p] >= pages)
        return "a page index outside the pool";
    }
  }
  return "";
}

// Ragged paged attention (the contract of jaxaccel/backends/paged.py): q [T, n, h]; fresh
// keys/values k, v [T, kv_heads, h]; pages [(layers,) P, kv_heads, c, h] read in place at
// `layer`; kv_lens [S]; page_indices [S, W]; cu_q_lens [S + 1]; num_seqs [1]. Output rows of
// tokens past cu_q_lens[num_seqs] are zero.
template <ffi::DataType D>
ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<D> q, ffi::Buffer<D> k,
                              ffi::Buffer<D> v, ffi::AnyBuffer kp, ffi::AnyBuffer vp,
                              ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> kv_lens,
                              ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens,
                              ffi::Buffer<ffi::S32> num_seqs, float scale, int64_t window,
                              ffi::ResultBuffer<D> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), pd = page_indices.dimensions();
  ffi::Span<const int64_t> cd, cvd;
  const int64_t index = layer.element_count() == 1 ? layer.typed_data()[0] : -1;
  const void* kp_data = cached_layer<D>(kp, index, cd);
  const void* vp_data = cached_layer<D>(vp, index, cvd);
  if (qd.size() != 3 || kd.size() != 3 || kp_data == nullptr || vp_data == nullptr ||
      kp.element_type() != vp.element_type() || pd.size() != 2 ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin()) ||
      !std::equal(cd.begin(), cd.end(), cvd.begin()) || num_seqs.element_count() != 1 ||
      kv_lens.element_count() != pd[0] || cu_q_lens.element_count() != pd[0] + 1) {
    return ffi::Error::InvalidArgument(
        "paged attention: expected q [T, n, h], k and v [T, kv_heads, h], pages "
        "[(layers,) P, kv_heads, c, h] of q's dtype (bf16: or uint16 bits) and a layer index "
        "in range, kv_lens [S], page_indices [S, W], cu_q_lens [S + 1], num_seqs [1]");
  }
  Shape sh{1, 0, qd[1], kd[1], qd[2], 0, 0, 0, 0, scale, cd[2], window};
  if (kd[0] != qd[0] || cd[1] != sh.kv_heads || cd[3] != sh.h || sh.kv_heads == 0 ||
      sh.n % sh.kv_heads || sh.h % 16 || sh.h > 128 || sh.page_size == 0) {
    return ffi::Error::InvalidArgument(
        "paged attention: shapes disagree (need n % kv_heads == 0, h % 16 == 0, h <= 128)");
  }
  sh.groups = sh.n / sh.kv_heads;
  const int32_t* cu = cu_q_lens.typed_data();
  const int64_t seqs = num_seqs.typed_data()[0];
  std::string bad = check_ragged(kv_lens.typed_data(), page_indices.typed_data(), pd[0], pd[1],
                                 cu, seqs, qd[0], cd[0], sh.page_size);
  if (!bad.empty()) return ffi::Error::InvalidArgument("paged attention: " + bad);
#if defined(JAXACCEL_ATTENTION_KERNEL)
  // Tokens no sequence owns (padding past cu_q_lens[num_seqs]) get zeros.
  const int64_t row = sh.n * sh.h, used = seqs > 0 ? cu[seqs] : 0;
  auto* o = out->typed_data();
  std::memset(o + used * row, 0, (qd[0] - used) * row * ffi::ByteWidth(D));
  if (seqs > 0 && cu[0] > 0) std::memset(o, 0, cu[0] * row * ffi::ByteWidth(D));
  if constexpr (D == ffi::DataType::BF16) {
    using E = uint16_t;
    auto data = [](auto& buffer) { return reinterpret_cast<const E*>(buffer.typed_data()); };
    run_paged<Bf16>(pool, sh, data(q), data(k), data(v), static_cast<const E*>(kp_data),
                    static_cast<const E*>(vp_data), kv_lens.typed_data(),
                    page_indices.typed_data(), pd[1], cu, seqs, reinterpret_cast<E*>(o));
  } else {
    run_paged<F32>(pool, sh, q.typed_data(), k.typed_data(), v.typed_data(),
                   static_cast<const float*>(kp_data), static_cast<const float*>(vp_data),
                   kv_lens.typed_data(), page_indices.typed_data(), pd[1], cu, seqs, o);
  }
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("paged attention: built without AVX-512 (F, BW, VL) or AVX2 + FMA");
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

#define JAXACCEL_PAGED_ATTENTION_BINDING(D)   \
  ffi::Ffi::Bind()                            \
      .Ctx<ffi::ThreadPool>()                 \
      .Arg<ffi::Buffer<D>>()                  \
      .Arg<ffi::Buffer<D>>()                  \
      .Arg<ffi::Buffer<D>>()                  \
      .Arg<ffi::AnyBuffer>()                  \
      .Arg<ffi::AnyBuffer>()                  \
      .Arg<ffi::Buffer<ffi::S32>>()           \
      .Arg<ffi::Buffer<ffi::S32>>()           \
      .Arg<ffi::Buffer<ffi::S32>>()           \
      .Arg<ffi::Buffer<ffi::S32>>()           \
      .Arg<ffi::Buffer<ffi::S32>>()           \
      .Attr<float>("scale")                   \
      .Attr<int64_t>("sliding_window")        \
      .Ret<ffi::Buffer<D>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelPagedAttentionBf16, PagedAttentionImpl<ffi::DataType::BF16>,
                              JAXACCEL_PAGED_ATTENTION_BINDING(ffi::DataType::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaccelPagedAttentionF32, PagedAttentionImpl<ffi::DataType::F32>,
                              JAXACCEL_PAGED_ATTENTION_BINDING(ffi::DataType::F32));
