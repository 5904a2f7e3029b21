// Helpers the cpu kernels share (decode.cpp, flash.cpp, softcap.cpp, recurrent.cpp). Included, not built on its own:
// native.py hashes it with the sources into the build's name.
#pragma once
#include <ATen/cpu/vec/vec.h>

namespace portable_attn_cpu {

// Whether the CPU has the AVX512-BF16 unit (`vdpbf16ps`); false in builds narrower than AVX-512.
inline bool bf16_unit() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// cap * tanh(x) as cap - 2 cap / (exp(2x) + 1): one exponential (torch's tanh costs two of them); the cancellation
// near 0 leaves an absolute error of about cap * 1e-7, far below the products' own rounding.
inline at::vec::Vectorized<float> cap_tanh(at::vec::Vectorized<float> x, float cap) {
  using Vec = at::vec::Vectorized<float>;
  return Vec(cap) - Vec(2.f * cap) / ((x * Vec(2.f)).exp_u20() + Vec(1.f));
}

// [p, p + bytes) into L2 (prefetcht1), a line at a time
inline void prefetch_l2(const void* p, int64_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t x = a & ~uintptr_t(63); x < a + bytes; x += 64) {
#if defined(__x86_64__)  // GCC 12 drops __builtin_prefetch and _mm_prefetch from a loop with no other effect
    asm volatile("prefetcht1 %0" : : "m"(*reinterpret_cast<const char*>(x)));
#else
    __builtin_prefetch(reinterpret_cast<const void*>(x), 0, 2);
#endif
  }
}

}  // namespace portable_attn_cpu
