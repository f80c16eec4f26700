// The per-group scale searches behind the K-quant packers, shared by the CPU packer
// (csrc/cpu/kquant_cpu.cpp) and the CUDA one (csrc/cuda/kquant_cuda.cu): both compile exactly this code.
//
// llama.cpp's reference quantizers (what `ggml_quantize_chunk` runs when it gets no importance
// matrix) pick each group's scale by small searches over candidate scales. To produce the same
// bytes we must reach the same decisions, and those decisions hang on float comparisons between
// nearly equal sums; so every sum below is accumulated in fp32, in index order, with each product
// formed left to right exactly as written (`w * x * l` is (w * x) * l), integer levels converted to
// float at the point of use, and no FMA contraction (CMakeLists.txt passes -ffp-contract=off to the
// C++ compiler and --fmad=false to nvcc). Changing any of that — a double accumulator, a reordered
// product, std::round instead of round_magic, a parallel reduction — changes a few blocks in every
// large tensor.
//
// The group size N is a template parameter so that, on the GPU, the loops over a group unroll and
// the group's values and levels live in registers; the arithmetic is the same for every N.
#pragma once
#include <cstdint>

#include "loraforge/gguf_blocks.h"

namespace loraforge {
namespace gguf {

// Below this the group is treated as all zeros (ggml's GROUP_MAX_EPS).
constexpr float kZeroGroup = 1e-15f;

// |v|: clears the sign bit (exact, NaN included) on both sides.
LF_HD_INLINE float abs_value(float v) {
#if defined(__CUDA_ARCH__)
  return fabsf(v);
#else
  return __builtin_fabsf(v);
#endif
}

LF_HD_INLINE int clamp_level(int l, int lo, int hi) { return l < lo ? lo : (l > hi ? hi : l); }

// The signed value of largest magnitude (the first one, on ties), and that magnitude.
struct Extreme {
  float value = 0.0f;
  float magnitude = 0.0f;
};

template <int N>
LF_HD_INLINE Extreme signed_extreme(const float* x) {
  Extreme e;
  LF_UNROLL
  for (int i = 0; i < N; ++i) {
    const float a = abs_value(x[i]);
    if (a > e.magnitude) {
      e.magnitude = a;
      e.value = x[i];
    }
  }
  return e;
}

// Weighted normal-equation sums of a symmetric assignment: sum w x l and sum w l^2 (w = x^2).
struct SymmetricSums {
  float xl = 0.0f;
  float ll = 0.0f;
};

// Levels for the trial inverse scale `inv`, as signed integers in [-nmax, nmax-1], and their sums.
template <int N>
LF_HD_INLINE SymmetricSums assign_symmetric(int nmax, const float* x, float inv, int* signed_levels) {
  SymmetricSums s;
  LF_UNROLL
  for (int i = 0; i < N; ++i) {
    const int l = clamp_level(round_magic(inv * x[i]), -nmax, nmax - 1);
    signed_levels[i] = l;
    const float w = x[i] * x[i];
    s.xl += w * x[i] * l;
    s.ll += w * l * l;
  }
  return s;
}

// Symmetric levels in [0, 2*nmax) (value = scale * (level - nmax)), least squares weighted by x^2.
//
// Least squares for value = scale * l with weights x^2 has the closed form scale = sum(wxl)/sum(wl^2),
// and its error is smallest where sum(wxl)^2 / sum(wl^2) is largest. The levels themselves come from
// rounding x at a trial scale; the first trial is nmax / max (the largest value lands on -nmax, which
// uses the asymmetric range's extra negative level), then 18 trials at (nmax +- 0.1k) / max. A trial
// replaces the best so far only when strictly better, compared cross-multiplied so no division
// rounds the decision. Returns the scale (0 for an all-zero group).
template <int N>
LF_HD_INLINE float fit_symmetric_weighted(int nmax, const float* x, std::uint8_t* levels) {
  const Extreme e = signed_extreme<N>(x);
  if (e.magnitude < kZeroGroup) {
    LF_UNROLL
    for (int i = 0; i < N; ++i) levels[i] = 0;
    return 0.0f;
  }
  int trial[N];
  float inv = -nmax / e.value;
  SymmetricSums s = assign_symmetric<N>(nmax, x, inv, trial);
  LF_UNROLL
  for (int i = 0; i < N; ++i) levels[i] = static_cast<std::uint8_t>(trial[i] + nmax);
  float scale = s.ll != 0.0f ? s.xl / s.ll : 0.0f;
  float best = scale * s.xl;
  LF_NO_UNROLL
  for (int step = -9; step <= 9; ++step) {
    if (step == 0) continue;
    inv = -(nmax + 0.1f * step) / e.value;
    const SymmetricSums t = assign_symmetric<N>(nmax, x, inv, trial);
    if (t.ll > 0 && t.xl * t.xl > best * t.ll) {
      LF_UNROLL
      for (int i = 0; i < N; ++i) levels[i] = static_cast<std::uint8_t>(trial[i] + nmax);
      scale = t.xl / t.ll;
      best = scale * t.xl;
    }
  }
  return scale;
}

// Symmetric levels in [0, 2*nmax), refined one level at a time to lower the x^2-weighted error.
//
// Start from rounding at nmax / max, then coordinate descent: for each value, the level that would be
// best if every other level stayed put is round(x * sum(wl^2 without i) / sum(wxl without i)); take
// it when the whole group's sum(wxl)^2 / sum(wl^2) then grows. At most five sweeps, stopping early
// after a sweep that changes nothing. The running sums are updated incrementally, as the decisions
// depend on exactly those (slightly drifting) fp32 values. Returns the scale (0 for an all-zero group).
template <int N>
LF_HD_INLINE float fit_symmetric_refined(int nmax, const float* x, std::uint8_t* levels) {
  const Extreme e = signed_extreme<N>(x);
  if (e.magnitude < kZeroGroup) {
    LF_UNROLL
    for (int i = 0; i < N; ++i) levels[i] = 0;
    return 0.0f;
  }
  int l[N];
  const SymmetricSums start = assign_symmetric<N>(nmax, x, -nmax / e.value, l);
  float sum_xl = start.xl;
  float sum_ll = start.ll;
  LF_NO_UNROLL
  for (int sweep = 0; sweep < 5; ++sweep) {
    int changed = 0;
    LF_UNROLL
    for (int i = 0; i < N; ++i) {
      const float w = x[i] * x[i];
      float xl_without = sum_xl - w * x[i] * l[i];
      if (!(xl_without > 0)) continue;
      float ll_without = sum_ll - w * l[i] * l[i];
      const int candidate = clamp_level(round_magic(x[i] * ll_without / xl_without), -nmax, nmax - 1);
      if (candidate == l[i]) continue;
      xl_without += w * x[i] * candidate;  // now the sums with the candidate in place
      ll_without += w * candidate * candidate;
      if (ll_without > 0 && xl_without * xl_without * sum_ll > sum_xl * sum_xl * ll_without) {
        l[i] = candidate;
        sum_xl = xl_without;
        sum_ll = ll_without;
        ++changed;
      }
    }
    if (changed == 0) break;
  }
  LF_UNROLL
  for (int i = 0; i < N; ++i) levels[i] = static_cast<std::uint8_t>(l[i] + nmax);
  return sum_ll > 0.0f ? sum_xl / sum_ll : 0.0f;
}

// Weighted error of value = scale * level + min against x: sum w |d| or sum w d^2.
template <int N>
LF_HD_INLINE float affine_error(const float* x, const float* weights, const std::uint8_t* levels, float scale,
                                float min, bool use_abs) {
  float error = 0.0f;
  LF_UNROLL
  for (int i = 0; i < N; ++i) {
    float d = scale * levels[i] + min - x[i];
    d = use_abs ? abs_value(d) : d * d;
    error += weights[i] * d;
  }
  return error;
}

// Asymmetric levels in [0, nmax] (value = scale * level + min, min <= 0) under the given weights;
// returns the scale and writes the stored offset -min (>= 0) to *offset.
//
// The first guess maps [min(x, 0), max(x)] onto [0, nmax]. Then, for each trial inverse scale
// (rmin + rdelta*k + nmax) / (max - min), k = 0..nstep, round, solve the 2x2 weighted least-squares
// system for (scale, min) given those levels (falling back to a pure scale when the fitted min would
// be positive), and keep the trial when its weighted error (`use_abs`: absolute, else squared) is
// strictly lower. Later trials round and span from the best min found so far (not the first
// guess's), as llama.cpp's search does: the grid moves as the fit improves.
template <int N>
LF_HD_INLINE float fit_affine_weighted(int nmax, const float* x, const float* weights, std::uint8_t* levels,
                                       float* offset, float rmin, float rdelta, int nstep, bool use_abs) {
  float lo = x[0];
  float hi = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  LF_UNROLL
  for (int i = 1; i < N; ++i) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
    sum_w += weights[i];
    sum_x += weights[i] * x[i];
  }
  if (lo > 0) lo = 0;
  if (hi == lo) {  // constant zero group (or a constant non-positive one): every level 0
    LF_UNROLL
    for (int i = 0; i < N; ++i) levels[i] = 0;
    *offset = -lo;
    return 0.0f;
  }
  float min = lo;
  float inv = nmax / (hi - min);
  float scale = 1 / inv;
  LF_UNROLL
  for (int i = 0; i < N; ++i) {
    levels[i] = static_cast<std::uint8_t>(clamp_level(round_magic(inv * (x[i] - min)), 0, nmax));
  }
  float best_error = affine_error<N>(x, weights, levels, scale, min, use_abs);
  if (nstep < 1) {
    *offset = -min;
    return scale;
  }

  std::uint8_t trial[N];
  LF_NO_UNROLL
  for (int step = 0; step <= nstep; ++step) {
    inv = (rmin + rdelta * step + nmax) / (hi - min);
    float sum_l = 0.0f, sum_ll = 0.0f, sum_xl = 0.0f;
    LF_UNROLL
    for (int i = 0; i < N; ++i) {
      const int l = clamp_level(round_magic(inv * (x[i] - min)), 0, nmax);
      trial[i] = static_cast<std::uint8_t>(l);
      const float w = weights[i];
      sum_l += w * l;
      sum_ll += w * l * l;
      sum_xl += w * l * x[i];
    }
    const float det = sum_w * sum_ll - sum_l * sum_l;
    if (!(det > 0)) continue;
    float trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
    float trial_min = (sum_ll * sum_x - sum_l * sum_xl) / det;
    if (trial_min > 0) {
      trial_min = 0;
      trial_scale = sum_xl / sum_ll;
    }
    const float error = affine_error<N>(x, weights, trial, trial_scale, trial_min, use_abs);
    if (error < best_error) {
      LF_UNROLL
      for (int i = 0; i < N; ++i) levels[i] = trial[i];
      best_error = error;
      scale = trial_scale;
      min = trial_min;
    }
  }
  *offset = -min;
  return scale;
}

}  // namespace gguf
}  // namespace loraforge
