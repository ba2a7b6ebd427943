// fp32 linear layer for batch-1 decoding on CPUs: y = x W^T + b.
//
// torch multiplies a single row by a matrix on one core (bench/README.md, export.py); this
// kernel splits the output rows over torch's threads. W is packed as (ceil(N/16), K, 16):
// tiles of 16 output rows, stored input by input, so a tile streams in order and each 64-byte
// load is one input's weight for 16 outputs, multiplied by that input broadcast (one fused
// multiply-add into 16 accumulators). The token embedding reads its rows from the same tiles
// when the head is tied to it (slm/inference.py), so the table is held once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE = 16;  // output rows per tile
constexpr int64_t MT = 4;     // input rows multiplied per pass over a tile

at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_fp32 expects an fp32 (out, in) matrix");
  const auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1);
  auto out = at::zeros({(N + TILE - 1) / TILE, K, TILE}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
      for (int64_t k = 0; k < K; k++) dst[((n / TILE) * K + k) * TILE + n % TILE] = src[n * K + k];
  });
  return out;
}

// acc[m][r] = sum_k x[m][k] * w[k][r] for one tile w (K, 16), m < ROWS.
template <int ROWS>
inline void tile_dot(const float* x, int64_t ldx, const float* w, int64_t K, float (*acc)[TILE]) {
#if defined(__AVX512F__)
  __m512 a[ROWS], b = _mm512_setzero_ps();
  for (int m = 0; m < ROWS; m++) a[m] = _mm512_setzero_ps();
  int64_t k = 0;
  if constexpr (ROWS == 1) {  // a second chain of sums hides the multiply-add latency
    for (; k + 1 < K; k += 2) {
      a[0] = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), _mm512_loadu_ps(w + k * TILE), a[0]);
      b = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 1]), _mm512_loadu_ps(w + k * TILE + TILE), b);
    }
  }
  for (; k < K; k++) {
    const __m512 wv = _mm512_loadu_ps(w + k * TILE);
    for (int m = 0; m < ROWS; m++) a[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * ldx + k]), wv, a[m]);
  }
  a[0] = _mm512_add_ps(a[0], b);
  for (int m = 0; m < ROWS; m++) _mm512_storeu_ps(acc[m], a[m]);
#else
  for (int m = 0; m < ROWS; m++) {
    float s[TILE] = {0};
    for (int64_t k = 0; k < K; k++)
      for (int r = 0; r < TILE; r++) s[r] += x[m * ldx + k] * w[k * TILE + r];
    std::memcpy(acc[m], s, sizeof(s));
  }
#endif
}

// y = x W^T + bias (+ residual), x (..., K) fp32, or LayerNorm(x) first when norm weights are
// given; packed = pack(W); bias (N,) or none. Returns (..., N).
at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N,
                  const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias,
                  double norm_eps, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(input.scalar_type() == at::kFloat, "linear_fp32 takes fp32 inputs");
  const at::Tensor x = input.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(packed.size(1) == K && packed.size(0) * TILE >= N, "fp32 weights packed for another shape");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  auto y = at::empty(shape, x.options());
  thread_local std::vector<float> scratch;
  const float* xp = slm_rows::normalized(x, M, K, norm_weight, norm_bias, norm_eps, scratch);
  const float* res = slm_rows::residual_data(residual, y);
  const float* w = packed.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 4, [&](int64_t t0, int64_t t1) {
    float acc[MT][TILE];
    for (int64_t t = t0; t < t1; t++) {
      const float* wt = w + t * K * TILE;
      const int64_t rows = std::min(TILE, N - t * TILE);
      for (int64_t m = 0; m < M; m += MT) {
        const int64_t mt = std::min(MT, M - m);
        switch (mt) {
          case 1: tile_dot<1>(xp + m * K, K, wt, K, acc); break;
          case 2: tile_dot<2>(xp + m * K, K, wt, K, acc); break;
          case 3: tile_dot<3>(xp + m * K, K, wt, K, acc); break;
          default: tile_dot<4>(xp + m * K, K, wt, K, acc); break;
        }
        for (int64_t i = 0; i < mt; i++)
          for (int64_t r = 0; r < rows; r++) {
            const int64_t o = (m + i) * N + t * TILE + r;
            yp[o] = acc[i][r] + (b ? b[t * TILE + r] : 0.f) + (res ? res[o] : 0.f);
          }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slm, m) {
  m.def("pack_fp32(Tensor w) -> Tensor", &pack);
  m.def("linear_fp32(Tensor x, Tensor packed, Tensor? bias, int n, Tensor? norm_weight, Tensor? norm_bias, "
        "float norm_eps, Tensor? residual) -> Tensor", &linear);
}
