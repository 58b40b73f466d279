// 16-lane float32 / 32-bit vectors for the attention kernel, in one of two builds:
//
// * AVX-512 (F, BW, VL): one zmm register per vector, masks as __mmask16; every operation is
//   the AVX-512 instruction the kernel was first written with.
// * AVX2 + FMA (x86-64-v3, e.g. AMD Zen 2/3): a pair of ymm registers per vector, masks as a
//   pair of all-ones/all-zeros lane vectors, bf16 widened to float32 in registers.
//
// The kernel keeps its 16-key blocks and its 16 x 16 transposes in both builds; only the tile
// sizes change with the register file (32 zmm against 16 ymm: `kRegisters`).

#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

#include "bf16_dot.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define JAXACCEL_SIMD16_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define JAXACCEL_SIMD16_AVX2 1
#endif

namespace jaxaccel::v16 {

#if defined(JAXACCEL_SIMD16_AVX512)
constexpr int kRegisters = 32;
using f32 = __m512;
using u32 = __m512i;
using mask = __mmask16;

inline f32 zero() { return _mm512_setzero_ps(); }
inline u32 zero_bits() { return _mm512_setzero_si512(); }
inline f32 splat(float x) { return _mm512_set1_ps(x); }
inline u32 splat_bits(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline f32 load(const float* p) { return _mm512_loadu_ps(p); }
inline u32 load_bits(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline void store(float* p, f32 x) { _mm512_storeu_ps(p, x); }
inline void store_bits(uint32_t* p, u32 x) { _mm512_storeu_si512(p, x); }
inline f32 as_float(u32 x) { return _mm512_castsi512_ps(x); }
inline f32 fmadd(f32 a, f32 b, f32 c) { return _mm512_fmadd_ps(a, b, c); }
inline f32 add(f32 a, f32 b) { return _mm512_add_ps(a, b); }
inline f32 sub(f32 a, f32 b) { return _mm512_sub_ps(a, b); }
inline f32 mul(f32 a, f32 b) { return _mm512_mul_ps(a, b); }
inline f32 max(f32 a, f32 b) { return _mm512_max_ps(a, b); }
inline float reduce_max(f32 x) { return _mm512_reduce_max_ps(x); }
inline float reduce_add(f32 x) { return _mm512_reduce_add_ps(x); }

// The first n units at p, zeros after them (nothing past p + n is read).
inline u32 load_first(const uint32_t* p, int64_t n) {
  return _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1), p);
}

// 16 bf16 (uint16) -> 16 x 32 bits, zero-extended; `even | odd << 16` pairs them.
inline u32 widen16(const uint16_t* x) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
inline u32 pair_up(u32 even, u32 odd) {
  return _mm512_or_si512(even, _mm512_slli_epi32(odd, 16));
}
// 16 bf16 -> 16 float32 (a bf16 is the top half of a float32).
inline f32 load_bf16(const uint16_t* x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(widen16(x), 16));
}

// acc + a.lo * b.lo + a.hi * b.hi per lane, each lane holding two bf16 values.
inline f32 dot_bf16_pairs(f32 acc, u32 a, u32 b) { return bf16_dot_pairs(acc, a, b); }

// 16 floats -> 16 bf16 at out, rounded to nearest even (as XLA's convert), NaN kept NaN.
inline void store_bf16(uint16_t* out, f32 x) {
#if defined(__AVX512BF16__)
  __m256i narrow = (__m256i)_mm512_cvtneps_pbh(x);
#else
  __m512i bits = _mm512_castps_si512(x);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x00400000));
  __m256i narrow = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), narrow);
}

inline mask first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
// Lanes i < n with p[i] true (p[n..] is not read).
inline mask true_bytes(const bool* p, int64_t n) {
  const __mmask16 in = first_lanes(n);
  return _mm_mask_test_epi8_mask(in, _mm_maskz_loadu_epi8(in, p), _mm_set1_epi8(-1));
}
inline f32 select(mask k, f32 yes, f32 no) { return _mm512_mask_mov_ps(no, k, yes); }

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp); exactly 0 below -87.3.
inline f32 exp_nonpositive(f32 x) {
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

// A 16 x 16 matrix of 32-bit units, one row per vector, transposed in place.
inline void transpose(u32 r[16]) {
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

// seen[j] |= row[j] for j < n; whether any row[j] was true.
inline bool or_into(uint8_t* seen, const bool* row, int64_t n) {
  __mmask64 any = 0;
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t m = n - j < 64 ? n - j : 64;
    const __mmask64 in = m == 64 ? ~__mmask64{0} : (__mmask64{1} << m) - 1;
    __m512i bits = _mm512_maskz_loadu_epi8(in, row + j);
    any |= _mm512_test_epi8_mask(bits, bits);
    _mm512_mask_storeu_epi8(seen + j, in,
                            _mm512_or_si512(bits, _mm512_maskz_loadu_epi8(in, seen + j)));
  }
  return any != 0;
}

#elif defined(JAXACCEL_SIMD16_AVX2)
constexpr int kRegisters = 16;
struct f32 { __m256 lo, hi; };
struct u32 { __m256i lo, hi; };
struct mask { __m256 lo, hi; };  // all-ones lanes where set

inline f32 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline u32 zero_bits() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline f32 splat(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline u32 splat_bits(uint32_t x) {
  __m256i v = _mm256_set1_epi32(static_cast<int>(x));
  return {v, v};
}
inline f32 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline u32 load_bits(const uint32_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))};
}
inline void store(float* p, f32 x) {
  _mm256_storeu_ps(p, x.lo);
  _mm256_storeu_ps(p + 8, x.hi);
}
inline void store_bits(uint32_t* p, u32 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x.lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 8), x.hi);
}
inline f32 as_float(u32 x) { return {_mm256_castsi256_ps(x.lo), _mm256_castsi256_ps(x.hi)}; }
inline f32 fmadd(f32 a, f32 b, f32 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32 add(f32 a, f32 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline f32 sub(f32 a, f32 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline f32 mul(f32 a, f32 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline f32 max(f32 a, f32 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline float reduce_max(f32 x) {
  __m256 m = _mm256_max_ps(x.lo, x.hi);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
inline float reduce_add(f32 x) {
  __m256 m = _mm256_add_ps(x.lo, x.hi);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

inline u32 load_first(const uint32_t* p, int64_t n) {
  if (n >= 16) return load_bits(p);
  alignas(32) uint32_t tmp[16] = {};
  std::memcpy(tmp, p, n * sizeof(uint32_t));
  return load_bits(tmp);
}

inline u32 widen16(const uint16_t* x) {
  return {_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))),
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8)))};
}
inline u32 pair_up(u32 even, u32 odd) {
  return {_mm256_or_si256(even.lo, _mm256_slli_epi32(odd.lo, 16)),
          _mm256_or_si256(even.hi, _mm256_slli_epi32(odd.hi, 16))};
}
inline f32 load_bf16(const uint16_t* x) {
  const u32 w = widen16(x);
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w.lo, 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(w.hi, 16))};
}

// Both bf16 halves of each lane widened to float32 (a bf16 is the top half of a float32).
inline __m256 bf16_low(__m256i x) { return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)); }
inline __m256 bf16_high(__m256i x) {
  return _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFF0000)));
}
inline __m256 dot_half(__m256 acc, __m256i a, __m256i b) {
  return _mm256_fmadd_ps(bf16_high(a), bf16_high(b),
                         _mm256_fmadd_ps(bf16_low(a), bf16_low(b), acc));
}
inline f32 dot_bf16_pairs(f32 acc, u32 a, u32 b) {
  return {dot_half(acc.lo, a.lo, b.lo), dot_half(acc.hi, a.hi, b.hi)};
}

// 8 floats -> 8 bf16 bits in the low 16 of each 32-bit lane, rounded to nearest even.
inline __m256i round_bf16(__m256 x) {
  __m256i bits = _mm256_castps_si256(x);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
  __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  rounded = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), nan));
  return _mm256_srli_epi32(rounded, 16);
}
inline void store_bf16(uint16_t* out, f32 x) {
  // packus interleaves 128-bit halves: lo0-3 hi0-3 lo4-7 hi4-7; the permute puts them in order.
  __m256i packed = _mm256_packus_epi32(round_bf16(x.lo), round_bf16(x.hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permute4x64_epi64(packed, 0xD8));
}

inline mask first_lanes(int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i count = _mm256_set1_epi32(static_cast<int>(n));
  return {_mm256_castsi256_ps(_mm256_cmpgt_epi32(count, lane)),
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(count, _mm256_add_epi32(lane,
                                                                         _mm256_set1_epi32(8))))};
}
inline mask true_bytes(const bool* p, int64_t n) {
  alignas(16) uint8_t tmp[16] = {};
  std::memcpy(tmp, p, n < 16 ? n : 16);
  __m128i bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  __m256i lo = _mm256_cvtepu8_epi32(bytes), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  const __m256i none = _mm256_setzero_si256();
  return {_mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(lo, none),
                                               _mm256_set1_epi32(-1))),
          _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(hi, none),
                                               _mm256_set1_epi32(-1)))};
}
inline f32 select(mask k, f32 yes, f32 no) {
  return {_mm256_blendv_ps(no.lo, yes.lo, k.lo), _mm256_blendv_ps(no.hi, yes.hi, k.hi)};
}

inline __m256 exp_half(__m256 x) {
  __m256 alive = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n as float32 bits: n >= -126 here (x >= -87.34), so the exponent field stays normal.
  __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  return _mm256_and_ps(alive, _mm256_mul_ps(y, scale));
}
inline f32 exp_nonpositive(f32 x) { return {exp_half(x.lo), exp_half(x.hi)}; }

// An 8 x 8 block of 32-bit units transposed (rows in, columns out).
inline void transpose8(__m256i r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    __m256 a = _mm256_castsi256_ps(r[2 * i]), b = _mm256_castsi256_ps(r[2 * i + 1]);
    t[2 * i] = _mm256_unpacklo_ps(a, b);
    t[2 * i + 1] = _mm256_unpackhi_ps(a, b);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_castps_si256(_mm256_permute2f128_ps(u[k], u[4 + k], 0x20));
    r[4 + k] = _mm256_castps_si256(_mm256_permute2f128_ps(u[k], u[4 + k], 0x31));
  }
}

// A 16 x 16 matrix of 32-bit units, one row per vector, transposed in place: four 8 x 8
// blocks, the off-diagonal ones swapped.
inline void transpose(u32 r[16]) {
  __m256i a[8], b[8], c[8], d[8];  // rows 0-7 | 8-15  x  columns 0-7 | 8-15
  for (int i = 0; i < 8; ++i) {
    a[i] = r[i].lo;
    b[i] = r[i].hi;
    c[i] = r[8 + i].lo;
    d[i] = r[8 + i].hi;
  }
  transpose8(a);
  transpose8(b);
  transpose8(c);
  transpose8(d);
  for (int i = 0; i < 8; ++i) {
    r[i] = {a[i], c[i]};
    r[8 + i] = {b[i], d[i]};
  }
}

inline bool or_into(uint8_t* seen, const bool* row, int64_t n) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row);
  uint8_t any = 0;
  for (int64_t j = 0; j < n; ++j) {
    seen[j] |= bytes[j];
    any |= bytes[j];
  }
  return any != 0;
}
#endif

}  // namespace jaxaccel::v16
