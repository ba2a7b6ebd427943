// slm's int8 linear layer for CPUs: y = x W^T + b, W int8 with one scale per output row, each
// row of x quantized to uint8 on the fly (or with a calibrated scale and zero point).
//
// Why slm has its own: decoding one token multiplies a single row by every weight matrix, so it
// is bound by how fast weights stream from memory. torch's int8 GEMMs (fbgemm, oneDNN) run such
// a product on one core; this kernel splits the output rows over torch's threads and streams a
// layout made for it (bench/README.md, quant.py and export.py, has the numbers).
//
// Layout: W is packed as (ceil(N/16), ceil(K/4), 16, 4): tiles of 16 output rows, and within a
// tile groups of 4 consecutive inputs per row, zero padded. A tile is read strictly in order and
// one 64-byte load holds 4 inputs of 16 rows: exactly what AVX512-VNNI's vpdpbusd multiplies by
// 4 broadcast activation bytes, summing into 16 int32 lanes. Other CPUs run the plain loop,
// which the compiler vectorizes as it can.
//
// Math (the same as torch.ao's dynamic quantization): x ~ (xq - zx) * sx with xq in [0, 255];
// W ~ Wq * sw. So y[n] = sx * sw[n] * (sum_k xq[k] Wq[n,k] - zx * sum_k Wq[n,k]) + b[n], in exact
// int32 arithmetic up to the final float scaling.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE = 16;  // output rows per tile
constexpr int64_t GROUP = 4;  // consecutive inputs of a row kept together
constexpr int64_t MT = 4;     // activation rows multiplied per pass over a tile

inline int64_t packed_index(int64_t n, int64_t k, int64_t groups) {
  return (((n / TILE) * groups + k / GROUP) * TILE + n % TILE) * GROUP + k % GROUP;
}

at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "pack expects an int8 (out, in) matrix");
  const auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), G = (K + GROUP - 1) / GROUP;
  auto out = at::zeros({(N + TILE - 1) / TILE, G, TILE, GROUP}, wc.options());
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
      for (int64_t k = 0; k < K; k++) dst[packed_index(n, k, G)] = src[n * K + k];
  });
  return out;
}

at::Tensor unpack(const at::Tensor& p, int64_t N, int64_t K) {
  const int64_t G = p.size(1);
  auto out = at::empty({N, K}, p.options());
  const int8_t* src = p.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
      for (int64_t k = 0; k < K; k++) dst[n * K + k] = src[packed_index(n, k, G)];
  });
  return out;
}

inline int32_t load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// acc[m][r] = sum over the G groups of x[m] (uint8) times row r of the tile w (int8), m < rows.
template <int ROWS>
inline void tile_dot(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t G, int32_t (*acc)[TILE]) {
#if defined(__AVX512VNNI__)
  __m512i a[ROWS], b = _mm512_setzero_si512();
  for (int m = 0; m < ROWS; m++) a[m] = _mm512_setzero_si512();
  int64_t g = 0;
  if constexpr (ROWS == 1) {  // a second chain of sums hides vpdpbusd's latency
    for (; g + 1 < G; g += 2) {
      a[0] = _mm512_dpbusd_epi32(a[0], _mm512_set1_epi32(load4(x + g * GROUP)), _mm512_loadu_si512(w + g * 64));
      b = _mm512_dpbusd_epi32(b, _mm512_set1_epi32(load4(x + g * GROUP + GROUP)), _mm512_loadu_si512(w + g * 64 + 64));
    }
  }
  for (; g < G; g++) {
    const __m512i wv = _mm512_loadu_si512(w + g * 64);
    for (int m = 0; m < ROWS; m++)
      a[m] = _mm512_dpbusd_epi32(a[m], _mm512_set1_epi32(load4(x + m * ldx + g * GROUP)), wv);
  }
  a[0] = _mm512_add_epi32(a[0], b);
  for (int m = 0; m < ROWS; m++) _mm512_storeu_si512(acc[m], a[m]);
#else
  for (int m = 0; m < ROWS; m++) {
    int32_t s[TILE] = {0};
    for (int64_t g = 0; g < G; g++)
      for (int r = 0; r < TILE; r++)
        for (int j = 0; j < GROUP; j++) s[r] += int32_t(x[m * ldx + g * GROUP + j]) * w[(g * TILE + r) * GROUP + j];
    std::memcpy(acc[m], s, sizeof(s));
  }
#endif
}

// Row m of x as uint8 codes (K4 wide, zero padded); its scale and zero point.
void quantize_row(const float* r, int64_t K, uint8_t* q, float fixed_scale, int64_t fixed_zero, float* scale,
                  int32_t* zero) {
  float s = fixed_scale;
  int32_t zp = int32_t(fixed_zero);
  if (s <= 0.f) {  // dynamic: the row's own range, widened to include 0 so that 0 is exact
    float lo = 0.f, hi = 0.f;
    for (int64_t k = 0; k < K; k++) {
      lo = std::min(lo, r[k]);
      hi = std::max(hi, r[k]);
    }
    s = hi > lo ? (hi - lo) / 255.f : 1.f;
    zp = std::clamp<int32_t>(int32_t(std::nearbyint(-lo / s)), 0, 255);
  }
  const float inv = 1.f / s;
  for (int64_t k = 0; k < K; k++)
    q[k] = uint8_t(std::clamp<int32_t>(int32_t(std::nearbyint(r[k] * inv)) + zp, 0, 255));
  *scale = s;
  *zero = zp;
}

// y = x W^T + bias (+ residual) for x (..., K), or LayerNorm(x) first when norm weights are given.
// packed = pack(Wq); wscale (N,) fp32; wsum (N,) int32 = Wq's row sums; bias (N,) fp32 or none.
// input_scale > 0 gives a calibrated (static) scale and zero point; otherwise each row's own.
// Returns (..., N) fp32.
at::Tensor int8_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& wscale,
                       const at::Tensor& wsum, const c10::optional<at::Tensor>& bias, int64_t N, double input_scale,
                       int64_t input_zero, const c10::optional<at::Tensor>& norm_weight,
                       const c10::optional<at::Tensor>& norm_bias, double norm_eps,
                       const c10::optional<at::Tensor>& residual) {
  const at::Tensor x = input.contiguous().to(at::kFloat);
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1), G = packed.size(1), K4 = G * GROUP;
  TORCH_CHECK((K + GROUP - 1) / GROUP == G && packed.size(0) * TILE >= N, "int8 weights packed for another shape");
  thread_local std::vector<float> normed;
  const float* xp = slm_rows::normalized(x, M, K, norm_weight, norm_bias, norm_eps, normed);
  // Scratch for the codes, scales and zero points, reused across calls (no allocation per token).
  thread_local std::vector<uint8_t> codes;
  thread_local std::vector<float> xs;
  thread_local std::vector<int32_t> xz;
  codes.assign(size_t(M * K4), 0);
  xs.resize(size_t(M));
  xz.resize(size_t(M));
  // Raw pointers: inside the parallel loops a thread_local name would mean the worker's own copy.
  uint8_t* qp = codes.data();
  float* xsp = xs.data();
  int32_t* xzp = xz.data();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++)
      quantize_row(xp + m * K, K, qp + m * K4, float(input_scale), input_zero, xsp + m, xzp + m);
  });

  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  auto y = at::empty(shape, x.options());
  float* yp = y.data_ptr<float>();
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* sw = wscale.data_ptr<float>();
  const int32_t* zw = wsum.data_ptr<int32_t>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* res = slm_rows::residual_data(residual, y);
  at::parallel_for(0, packed.size(0), 4, [&](int64_t t0, int64_t t1) {
    int32_t acc[MT][TILE];
    for (int64_t t = t0; t < t1; t++) {
      const int8_t* wt = w + t * G * TILE * GROUP;
      const int64_t rows = std::min(TILE, N - t * TILE);
      for (int64_t m = 0; m < M; m += MT) {
        const int64_t mt = std::min(MT, M - m);
        const uint8_t* xm = qp + m * K4;
        switch (mt) {
          case 1: tile_dot<1>(xm, K4, wt, G, acc); break;
          case 2: tile_dot<2>(xm, K4, wt, G, acc); break;
          case 3: tile_dot<3>(xm, K4, wt, G, acc); break;
          default: tile_dot<4>(xm, K4, wt, G, acc); break;
        }
        for (int64_t i = 0; i < mt; i++)
          for (int64_t r = 0; r < rows; r++) {
            const int64_t n = t * TILE + r;
            const int64_t o = (m + i) * N + n;
            yp[o] = float(acc[i][r] - xzp[m + i] * zw[n]) * xsp[m + i] * sw[n] + (b ? b[n] : 0.f) + (res ? res[o] : 0.f);
          }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slm, m) {
  m.def("pack_int8(Tensor w) -> Tensor", &pack);
  m.def("unpack_int8(Tensor packed, int n, int k) -> Tensor", &unpack);
  m.def("linear_int8(Tensor x, Tensor packed, Tensor wscale, Tensor wsum, Tensor? bias, int n, float input_scale, "
        "int input_zero, Tensor? norm_weight, Tensor? norm_bias, float norm_eps, Tensor? residual) -> Tensor", &int8_linear);
}
