// Attention of one new position per sequence against a KV cache, for decoding on CPUs.
//
// Decoding a token runs a dozen small tensor ops per layer around attention (split the fused
// q/k/v projection, store k and v in the cache, slice it, attend, merge the heads); on a CPU
// each costs more in dispatch than in arithmetic. This is those ops as one, with the same math
// as torch's scaled_dot_product_attention (softmax of q.k / sqrt(head_dim), fp32).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t LANES = 16;  // partial sums kept apart so the compiler vectorizes the dot products

inline float dot(const float* a, const float* b, int64_t n) {
  float s[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int64_t l = 0; l < LANES; l++) s[l] += a[i + l] * b[i + l];
  float total = 0.f;
  for (; i < n; i++) total += a[i] * b[i];
  for (int64_t l = 0; l < LANES; l++) total += s[l];
  return total;
}

void attend(const float* in, float* cache, float* out, int64_t B, int64_t H, int64_t L, int64_t D, int64_t pos) {
  const int64_t C = H * D;
  const float scale = 1.f / std::sqrt(float(D));
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(static_cast<size_t>(pos + 1));
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / H, h = i % H;
      const float* q = in + b * 3 * C + h * D;
      float* keys = cache + ((0 * B + b) * H + h) * L * D;
      float* values = cache + ((1 * B + b) * H + h) * L * D;
      std::copy(q + C, q + C + D, keys + pos * D);
      std::copy(q + 2 * C, q + 2 * C + D, values + pos * D);
      float top = -INFINITY;
      for (int64_t j = 0; j <= pos; j++) top = std::max(top, p[j] = dot(q, keys + j * D, D) * scale);
      float sum = 0.f;
      for (int64_t j = 0; j <= pos; j++) sum += p[j] = std::exp(p[j] - top);
      float* o = out + b * C + h * D;
      std::fill(o, o + D, 0.f);
      for (int64_t j = 0; j <= pos; j++) {
        const float w = p[j] / sum;
        const float* v = values + j * D;
        for (int64_t d = 0; d < D; d++) o[d] += w * v[d];
      }
    }
  });
}

// qkv (B, 1, 3C): the fused projection of the new position; kv (2, B, H, L, D): the layer's
// cache, whose position `pos` receives the new key and value. Returns (B, 1, C), heads merged.
at::Tensor decode_attention(const at::Tensor& qkv, at::Tensor kv, int64_t pos) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat, "decode_attention is fp32");
  TORCH_CHECK(qkv.is_contiguous() && kv.is_contiguous() && qkv.dim() == 3 && qkv.size(1) == 1 && kv.dim() == 5,
              "decode_attention takes one new position (B, 1, 3C) and a contiguous (2, B, H, L, D) cache");
  const int64_t B = kv.size(1), H = kv.size(2), L = kv.size(3), D = kv.size(4);
  TORCH_CHECK(qkv.size(0) == B && qkv.size(2) == 3 * H * D && pos >= 0 && pos < L, "decode_attention: shapes disagree");
  auto y = at::empty({B, 1, H * D}, qkv.options());
  attend(qkv.data_ptr<float>(), kv.data_ptr<float>(), y.data_ptr<float>(), B, H, L, D, pos);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slm, m) {
  m.def("decode_attention(Tensor qkv, Tensor(a!) kv, int pos) -> Tensor", &decode_attention);
}
