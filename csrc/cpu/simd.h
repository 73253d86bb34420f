// The CPU kernels' vector helpers (gpsa_cpu.cpp, positional_mix_cpu.cpp).
//
// GCC/Clang vectors of 32 bytes: arithmetic, comparisons and ?: act lane by
// lane, so scalar templates (gpsa_common.h, gpsa_cpu.cpp's fast_exp) run on
// them unchanged. The compiler maps one to an AVX register, two SSE/NEON
// registers or scalars.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace convit_kernels {

using floatx8 = float __attribute__((vector_size(32)));
using doublex4 = double __attribute__((vector_size(32)));
using intx8 = int32_t __attribute__((vector_size(32)));

// The 32-byte vector of T and its lane count.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = floatx8;
  static constexpr int lanes = 8;
};
template <>
struct Vec<double> {
  using type = doublex4;
  static constexpr int lanes = 4;
};

// The type an elementwise loop runs on: Vec<float> for float; double (gradcheck only) stays scalar.
template <typename acc_t>
struct Simd {
  using type = acc_t;
  static constexpr int width = 1;
};
template <>
struct Simd<float> {
  using type = floatx8;
  static constexpr int width = Vec<float>::lanes;
};

// A vector (or a scalar) from / to memory of any alignment.
template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename T, typename V>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Lane 0 + lane 1 + ..., in that order; a scalar is its own sum.
inline float lane_sum(floatx8 v) {
  float sum = 0;
  for (int l = 0; l < Vec<float>::lanes; ++l) sum += v[l];
  return sum;
}
inline double lane_sum(doublex4 v) {
  double sum = 0;
  for (int l = 0; l < Vec<double>::lanes; ++l) sum += v[l];
  return sum;
}
inline double lane_sum(double v) { return v; }

inline float lane_max(floatx8 v) {
  float m = v[0];
  for (int l = 1; l < Vec<float>::lanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
inline double lane_max(double v) { return v; }

// Run body(lane, j) over j < n: on vectors of Simd<acc_t>::width lanes, then one
// element at a time for the tail; `lane` is a value of the type to compute in.
template <typename acc_t, typename Body>
void simd_loop(int64_t n, Body&& body) {
  using V = typename Simd<acc_t>::type;
  constexpr int width = Simd<acc_t>::width;
  int64_t j = 0;
  for (; j + width <= n; j += width) body(V{}, j);
  for (; j < n; ++j) body(acc_t{}, j);
}

// A sum over a simd_loop: one vector of partial sums plus the scalar tail.
template <typename acc_t>
struct SimdSum {
  typename Simd<acc_t>::type vec{};
  acc_t tail = 0;
  template <typename L>
  void add(const L& x) {
    if constexpr (std::is_same_v<L, typename Simd<acc_t>::type>) {
      vec += x;
    } else {
      tail += x;
    }
  }
  acc_t total() const { return lane_sum(vec) + tail; }
};

}  // namespace convit_kernels
