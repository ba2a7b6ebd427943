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

#include "rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// x[i] = exp(x[i] - shift), returning their sum. libm's exp is scalar; with AVX-512 this is
// Cephes' expf polynomial 16 at a time (within 2 ulp: the inputs are <= 0, so no overflow).
inline float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  const __m512 lo = _mm512_set1_ps(-87.3f), log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  const __m512 one = _mm512_set1_ps(1.f), sh = _mm512_set1_ps(shift);
  const float c[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                     5.0000001201e-1f};
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh), lo);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, v));
    __m512 p = _mm512_set1_ps(c[0]);
    for (int j = 1; j < 6; j++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[j]));
    const __m512 e = _mm512_scalef_ps(_mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), one), k);
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; i++) total += x[i] = std::exp(x[i] - shift);
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
      for (int64_t j = 0; j <= pos; j++) top = std::max(top, p[j] = slm_rows::dot(q, keys + j * D, D) * scale);
      const float inv = 1.f / exp_shifted(p.data(), pos + 1, top);
      float* o = out + b * C + h * D;
      std::fill(o, o + D, 0.f);
      for (int64_t j = 0; j <= pos; j++) {
        const float w = p[j] * inv;
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
