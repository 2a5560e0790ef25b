// Multi-head self-attention on the CPU, float32, as an XLA FFI custom call (dcls_jax/attention.py):
//
//   DclsAttention:  y[b, i, h, :] = sum_j softmax_j(scale * q[b, i, h, :] . k[b, j, h, :]) v[b, j, h, :]
//   qkv (B, N, 3 * H * D), each token's row laid out (3, H, D) as a qkv Linear writes it; y (B, N, H * D).
//
// XLA:CPU runs this as two batched dots around a softmax, writing the (B, H, N, N) scores to memory twice and
// taking exp at ~1 ns an element; MetaFormer's 14 x 14 stage spends ~17 ms per layer there (batch 8, 2 cores)
// where PyTorch's fused kernel takes ~4 ms. Here a task is one (b, h): it packs k transposed (D x Np, keys
// zero-padded to whole vectors) and v (N x Dp), then for every block of kRows query rows computes the scores
// into an L1 buffer (a register tile of kRows rows by up to kChunk vectors of keys, summing over d in order),
// takes the softmax in place and sums the values. The rounding depends on the shapes only.
#include <cmath>

#include "common.h"

namespace {

using namespace dcls_jax;  // NOLINT: this file's kernels are the namespace's users

using Tokens = ffi::Buffer<ffi::F32, 3>;

constexpr int64_t kRows = 4;                             // query rows per register tile
constexpr int64_t kChunk = kRegisters == 32 ? 6 : 2;    // vectors of keys per tile: kRows * kChunk accumulators
constexpr int64_t kValues = kRegisters == 32 ? 4 : 2;   // vectors of values per tile: kRows * kValues

// exp on vectors: 2^k e^r with k = round(x / ln 2) and r = x - k ln 2 (ln 2 in two parts), e^r by Cephes' expf
// polynomial (max error ~1 ulp); x is clamped to [-88, 88], below which k = -127 gives exactly 0 (whose
// exponent bits are 0): the softmax's masked keys and underflows.
inline vec vexp(vec x) {
  typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const vec lo = splat(-88.0f), hi = splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vec magic = splat(12582912.0f);   // 1.5 * 2^23: adding it rounds to an integer
  vec k = (x * splat(1.44269504088896341f) + magic) - magic;
  vec r = x - k * splat(0.693359375f);
  r = r - k * splat(-2.12194440e-4f);
  vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  ivec bits = (__builtin_convertvector(k, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float hmax(vec v) {
  float m = v[0];
  for (int64_t l = 1; l < kLanes; ++l) m = std::max(m, v[l]);
  return m;
}

inline float hsum(vec v) {
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

struct Shape {
  int64_t batch, n, heads, d, np, dp, row;   // np, dp: keys and head channels rounded up to whole vectors
  float scale;
  const float* q(const float* qkv, int64_t b, int64_t i, int64_t h, int64_t part) const {
    return qkv + (b * n + i) * 3 * row + part * row + h * d;
  }
};

// The register tile both products use: acc[r][v] = sum_i a[r][i] * b[i * ldb + v * kLanes ...], i < count, in
// order (kRows rows of a broadcast against NV vectors of each row of b).
template <int64_t NV>
inline void accumulate(const float* const* a, const float* b, int64_t ldb, int64_t count, vec (&acc)[kRows][NV]) {
  for (int64_t i = 0; i < count; ++i, b += ldb) {
    vec bv[NV];
    for (int64_t v = 0; v < NV; ++v) bv[v] = load(b + v * kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const vec av = splat(a[r][i]);
      for (int64_t v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
}

// NV vectors of keys from v0 for kRows query rows q[r]: out[r][v0 * kLanes ...] = scale * q[r] . k[j].
template <int64_t NV>
void score_tile(const Shape& s, const float* const* q, const float* kt, int64_t v0, float* out) {
  vec acc[kRows][NV] = {};
  accumulate<NV>(q, kt + v0 * kLanes, s.np, s.d, acc);
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < NV; ++v) store(out + r * s.np + (v0 + v) * kLanes, acc[r][v] * splat(s.scale));
}

// Scores of rows [i0, i0 + rows) against every key, into out (kRows x np, padded keys at -inf).
void scores(const Shape& s, const float* qkv, const float* kt, int64_t b, int64_t h, int64_t i0, int64_t rows,
            float* out) {
  const float* q[kRows];
  for (int64_t r = 0; r < kRows; ++r) q[r] = s.q(qkv, b, i0 + std::min(r, rows - 1), h, 0);
  const int64_t vecs = s.np / kLanes;
  int64_t v0 = 0;
  for (; v0 + kChunk <= vecs; v0 += kChunk) score_tile<kChunk>(s, q, kt, v0, out);
  switch (vecs - v0) {   // the rest, in one tile of its own width
    case 1: score_tile<1>(s, q, kt, v0, out); break;
    case 2: score_tile<2>(s, q, kt, v0, out); break;
    case 3: score_tile<3>(s, q, kt, v0, out); break;
    case 4: score_tile<4>(s, q, kt, v0, out); break;
    case 5: score_tile<5>(s, q, kt, v0, out); break;
    default: break;
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t j = s.n; j < s.np; ++j) out[r * s.np + j] = -INFINITY;
}

// NV vectors of head channels from v0 for kRows rows of probabilities p (kRows x np), scaled by inv[r], into y.
template <int64_t NV>
void value_tile(const Shape& s, const float* p, const float* vp, const float* inv, int64_t v0, int64_t rows,
                float* y) {
  const float* rows_p[kRows];
  for (int64_t r = 0; r < kRows; ++r) rows_p[r] = p + r * s.np;
  vec acc[kRows][NV] = {};
  accumulate<NV>(rows_p, vp + v0 * kLanes, s.dp, s.n, acc);
  const int64_t c0 = v0 * kLanes, count = std::min(NV * kLanes, s.d - c0);
  for (int64_t r = 0; r < rows; ++r) {
    float out[NV * kLanes];
    for (int64_t v = 0; v < NV; ++v) store(out + v * kLanes, acc[r][v] * splat(inv[r]));
    std::memcpy(y + r * s.heads * s.d + c0, out, count * sizeof(float));
  }
}

// Softmax of one row of np scores in place; returns 1 / (sum of the exponentials).
float softmax(const Shape& s, float* row) {
  vec m = splat(-INFINITY);
  for (int64_t j = 0; j < s.np; j += kLanes) {
    const vec x = load(row + j);
    m = x > m ? x : m;
  }
  const vec mx = splat(hmax(m));
  vec sum = {};
  for (int64_t j = 0; j < s.np; j += kLanes) {
    const vec e = vexp(load(row + j) - mx);
    store(row + j, e);
    sum += e;
  }
  return 1.0f / hsum(sum);
}

void run_task(const Shape& s, const float* qkv, float* y, int64_t t, Scratch& scratch) {
  const int64_t b = t / s.heads, h = t % s.heads, dv = s.dp / kLanes;
  float* kt = scratch.get(s.d * s.np + s.n * s.dp + kRows * s.np);
  float* vp = kt + s.d * s.np;
  float* sc = vp + s.n * s.dp;
  for (int64_t j = 0; j < s.n; ++j) {
    const float* k = s.q(qkv, b, j, h, 1);
    for (int64_t c = 0; c < s.d; ++c) kt[c * s.np + j] = k[c];
    std::memcpy(vp + j * s.dp, s.q(qkv, b, j, h, 2), s.d * sizeof(float));
    std::memset(vp + j * s.dp + s.d, 0, (s.dp - s.d) * sizeof(float));
  }
  for (int64_t c = 0; c < s.d; ++c) std::memset(kt + c * s.np + s.n, 0, (s.np - s.n) * sizeof(float));
  for (int64_t i0 = 0; i0 < s.n; i0 += kRows) {
    const int64_t rows = std::min(kRows, s.n - i0);
    scores(s, qkv, kt, b, h, i0, rows, sc);
    float inv[kRows];
    for (int64_t r = 0; r < kRows; ++r) inv[r] = r < rows ? softmax(s, sc + r * s.np) : 0.0f;
    float* yrow = y + ((b * s.n + i0) * s.heads + h) * s.d;
    int64_t v0 = 0;
    for (; v0 + kValues <= dv; v0 += kValues) value_tile<kValues>(s, sc, vp, inv, v0, rows, yrow);
    switch (dv - v0) {
      case 1: value_tile<1>(s, sc, vp, inv, v0, rows, yrow); break;
      case 2: value_tile<2>(s, sc, vp, inv, v0, rows, yrow); break;
      case 3: value_tile<3>(s, sc, vp, inv, v0, rows, yrow); break;
      default: break;
    }
  }
}

ffi::Error Attention(ffi::ThreadPool pool, Tokens qkv, ffi::Result<Tokens> y, int64_t heads, float scale) {
  auto xd = qkv.dimensions(), yd = y->dimensions();
  if (heads <= 0 || xd[2] % (3 * heads) != 0 || yd[0] != xd[0] || yd[1] != xd[1] || yd[2] * 3 != xd[2])
    return ffi::Error::InvalidArgument("dcls_jax attention: qkv (B, N, 3 H D) and y (B, N, H D) disagree");
  const int64_t d = xd[2] / (3 * heads);
  Shape s{xd[0], xd[1], heads, d, round_up(xd[1], kLanes), round_up(d, kLanes), heads * d, scale};
  if (s.batch == 0 || s.n == 0 || d == 0) return ffi::Error::Success();
  const float* in = qkv.typed_data();
  float* out = y->typed_data();
  parallel_for(pool, s.batch * heads, [&](int64_t t) {
    thread_local Scratch scratch;
    run_task(s, in, out, t, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DclsAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Tokens>()
                                  .Ret<Tokens>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));
