// Row-wise pieces the kernels share: vectorizable sums and dot products, and what the linear
// kernels fuse around their product when decoding, a LayerNorm of each input row before it and
// a residual added after it. Fusing them saves a tensor op and a Python call each, which on a
// CPU cost more than the arithmetic (slm/inference.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace slm_rows {

// sum of term(i) for i < n, in 16 partial sums: the compiler may not reorder a float sum kept
// in one accumulator, but vectorizes 16 independent ones.
template <typename Term>
inline float lane_sum(int64_t n, Term term) {
  constexpr int64_t LANES = 16;
  float s[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int64_t l = 0; l < LANES; l++) s[l] += term(i + l);
  float total = 0.f;
  for (; i < n; i++) total += term(i);
  for (int64_t l = 0; l < LANES; l++) total += s[l];
  return total;
}

inline float dot(const float* a, const float* b, int64_t n) {
  return lane_sum(n, [=](int64_t i) { return a[i] * b[i]; });
}

// out = LayerNorm(x) * weight + bias (bias optional), as torch's layer_norm computes it.
inline void layer_norm(const float* x, int64_t n, const float* weight, const float* bias, double eps, float* out) {
  const float mean = lane_sum(n, [=](int64_t i) { return x[i]; }) / float(n);
  for (int64_t i = 0; i < n; i++) out[i] = x[i] - mean;
  const float inv = 1.f / std::sqrt(dot(out, out, n) / float(n) + float(eps));
  for (int64_t j = 0; j < n; j++) out[j] = out[j] * inv * weight[j] + (bias ? bias[j] : 0.f);
}

// The input rows of a product: x itself, or LayerNorm(x) in `scratch` when norm weights are given.
inline const float* normalized(const at::Tensor& x, int64_t M, int64_t K, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, double eps, std::vector<float>& scratch) {
  const float* xp = x.data_ptr<float>();
  if (!weight.has_value()) return xp;
  TORCH_CHECK(weight->numel() == K && (!bias.has_value() || bias->numel() == K), "norm weights of the wrong size");
  scratch.resize(size_t(M * K));
  const float* w = weight->data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; m++) layer_norm(xp + m * K, K, w, b, eps, scratch.data() + m * K);
  return scratch.data();
}

// The residual's data, checked against the output's shape; nullptr when none.
inline const float* residual_data(const c10::optional<at::Tensor>& residual, const at::Tensor& y) {
  if (!residual.has_value()) return nullptr;
  TORCH_CHECK(residual->sizes() == y.sizes() && residual->scalar_type() == at::kFloat && residual->is_contiguous(),
              "the residual must be a contiguous fp32 tensor shaped like the output");
  return residual->data_ptr<float>();
}

}  // namespace slm_rows
