// Transposed copy of a matrix of 2- or 4-byte elements, checking every element is finite.
//
// dst[c * ds + r] = src[r * ss + c] for r < rows, c < cols (strides in elements). Used by
// restores that read a weight stored [out, in] (torch.nn.Linear, as Hugging Face checkpoints
// hold them) into jaxaccel's [in, out] slice: the source is the page cache (a memory map), the
// destination the slice's buffer. Blocks of 64 x 64 keep both sides' cache lines in L1; inside
// a block, 16 x 16 (2-byte) or 8 x 8 (4-byte) tiles are transposed in AVX2 registers.
//
// `exponent` is the float format's exponent mask (bf16 0x7F80, f16 0x7C00, f32 0x7F800000):
// an element whose exponent bits are all set is NaN or inf. 0 skips the check. Returns 1 when
// some element is not finite, else 0.

#include <cstddef>
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Elements move as raw bits: 2-byte words (bf16, f16) and 4-byte words (f32).
using Word2 = unsigned short;
using Word4 = unsigned int;
static_assert(sizeof(Word2) == 2 && sizeof(Word4) == 4, "element words");

constexpr std::ptrdiff_t kBlock = 64;

template <typename T>
bool scalar_block(const T* src, std::ptrdiff_t rows, std::ptrdiff_t cols, std::ptrdiff_t ss,
                  T* dst, std::ptrdiff_t ds, T exponent) {
  T bad = 0;
  for (std::ptrdiff_t c = 0; c < cols; ++c) {
    for (std::ptrdiff_t r = 0; r < rows; ++r) {
      const T v = src[r * ss + c];
      dst[c * ds + r] = v;
      bad |= static_cast<T>((v & exponent) == exponent);
    }
  }
  return exponent != 0 && bad != 0;
}

#if defined(__AVX2__)
// A 16 x 16 tile of 16-bit elements; `bad` gathers lanes whose exponent bits are all set.
inline void tile16(const Word2* s, std::ptrdiff_t ss, Word2* d, std::ptrdiff_t ds,
                   __m256i mask, __m256i& bad) {
  __m256i r[16], t[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i * ss));
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi16(_mm256_and_si256(r[i], mask), mask));
  }
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm256_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm256_unpacklo_epi32(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm256_unpackhi_epi32(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm256_unpacklo_epi32(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm256_unpackhi_epi32(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int k = 0; k < 4; ++k) {
      t[8 * i + 2 * k] = _mm256_unpacklo_epi64(r[8 * i + k], r[8 * i + 4 + k]);
      t[8 * i + 2 * k + 1] = _mm256_unpackhi_epi64(r[8 * i + k], r[8 * i + 4 + k]);
    }
  }
  for (int k = 0; k < 8; ++k) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k * ds),
                        _mm256_permute2x128_si256(t[k], t[8 + k], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + (8 + k) * ds),
                        _mm256_permute2x128_si256(t[k], t[8 + k], 0x31));
  }
}

// An 8 x 8 tile of 32-bit elements.
inline void tile8(const Word4* s, std::ptrdiff_t ss, Word4* d, std::ptrdiff_t ds,
                  __m256i mask, __m256i& bad) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i * ss));
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(v, mask), mask));
    r[i] = _mm256_castsi256_ps(v);
  }
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(reinterpret_cast<float*>(d + k * ds),
                     _mm256_permute2f128_ps(r[k], r[4 + k], 0x20));
    _mm256_storeu_ps(reinterpret_cast<float*>(d + (4 + k) * ds),
                     _mm256_permute2f128_ps(r[k], r[4 + k], 0x31));
  }
}

inline __m256i splat(Word2 v) { return _mm256_set1_epi16(static_cast<short>(v)); }
inline __m256i splat(Word4 v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline void tile(const Word2* s, std::ptrdiff_t ss, Word2* d, std::ptrdiff_t ds,
                 __m256i mask, __m256i& bad) { tile16(s, ss, d, ds, mask, bad); }
inline void tile(const Word4* s, std::ptrdiff_t ss, Word4* d, std::ptrdiff_t ds,
                 __m256i mask, __m256i& bad) { tile8(s, ss, d, ds, mask, bad); }
#endif

template <typename T>
int transpose(const T* src, std::ptrdiff_t rows, std::ptrdiff_t cols, std::ptrdiff_t ss,
              T* dst, std::ptrdiff_t ds, T exponent) {
  bool bad = false;
#if defined(__AVX2__)
  constexpr std::ptrdiff_t kTile = 32 / sizeof(T);
  const __m256i mask = splat(exponent);
  // With no check, a mask of 0 would flag every lane: compare against a mask no lane matches.
  const __m256i probe = exponent != 0 ? mask : splat(static_cast<T>(~T(0)));
  __m256i lanes = _mm256_setzero_si256();
#endif
  for (std::ptrdiff_t c0 = 0; c0 < cols; c0 += kBlock) {
    const std::ptrdiff_t nc = cols - c0 < kBlock ? cols - c0 : kBlock;
    for (std::ptrdiff_t r0 = 0; r0 < rows; r0 += kBlock) {
      const std::ptrdiff_t nr = rows - r0 < kBlock ? rows - r0 : kBlock;
      const T* s = src + r0 * ss + c0;
      T* d = dst + c0 * ds + r0;
      std::ptrdiff_t fr = 0, fc = 0;  // the part covered by whole tiles
#if defined(__AVX2__)
      fr = nr - nr % kTile;
      fc = nc - nc % kTile;
      for (std::ptrdiff_t c = 0; c < fc; c += kTile)
        for (std::ptrdiff_t r = 0; r < fr; r += kTile)
          tile(s + r * ss + c, ss, d + c * ds + r, ds, probe, lanes);
#endif
      if (fc < nc) bad |= scalar_block(s + fc, nr, nc - fc, ss, d + fc * ds, ds, exponent);
      if (fr < nr) bad |= scalar_block(s + fr * ss, nr - fr, fc, ss, d + fr, ds, exponent);
    }
  }
#if defined(__AVX2__)
  if (exponent != 0 && !_mm256_testz_si256(lanes, lanes)) bad = true;
#endif
  return bad ? 1 : 0;
}

}  // namespace

extern "C" int jaxaccel_transpose(const void* src, int64_t rows, int64_t cols, int64_t ss,
                                  void* dst, int64_t ds, int32_t itemsize, uint32_t exponent) {
  if (itemsize == 2)
    return transpose(static_cast<const Word2*>(src), rows, cols, ss,
                     static_cast<Word2*>(dst), ds, static_cast<Word2>(exponent));
  if (itemsize == 4)
    return transpose(static_cast<const Word4*>(src), rows, cols, ss,
                     static_cast<Word4*>(dst), ds, static_cast<Word4>(exponent));
  return -1;
}
