// One bf16 pair-dot step shared by the C++ kernels here: acc + a.lo * b.lo + a.hi * b.hi per
// 32-bit lane, where each lane of a and b holds two bf16 values (`vdpbf16ps`).

#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace jaxaccel {

#if defined(__AVX512F__)
inline __m512 bf16_dot_pairs(__m512 acc, __m512i a, __m512i b) {
#if defined(__AVX512BF16__)
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
#else
  // Without BF16 instructions: widen both halves of each pair and use two FMAs.
  __m512 a_lo = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
  __m512 a_hi = _mm512_castsi512_ps(_mm512_and_si512(a, _mm512_set1_epi32(0xFFFF0000)));
  __m512 b_lo = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
  __m512 b_hi = _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xFFFF0000)));
  return _mm512_fmadd_ps(a_hi, b_hi, _mm512_fmadd_ps(a_lo, b_lo, acc));
#endif
}
#endif

}  // namespace jaxaccel
