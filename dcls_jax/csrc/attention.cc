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
  // From qkv's dimensions (B, N, 3 H D), `heads` dividing its last one by 3.
  Shape(ffi::Span<const int64_t> qkv, int64_t heads_, float scale_)
      : batch(qkv[0]), n(qkv[1]), heads(heads_), d(qkv[2] / (3 * heads_)), np(round_up(qkv[1], kLanes)),
        dp(round_up(d, kLanes)), row(heads_ * d), scale(scale_) {}
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

// NV vectors of columns from v0 for kRows rows a[r]: out[r][v0 * kLanes ...] = mult * a[r] . bt[:, j].
template <int64_t NV>
void product_tile(const Shape& s, const float* const* a, const float* bt, float mult, int64_t v0, float* out) {
  vec acc[kRows][NV] = {};
  accumulate<NV>(a, bt + v0 * kLanes, s.np, s.d, acc);
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < NV; ++v) store(out + r * s.np + (v0 + v) * kLanes, acc[r][v] * splat(mult));
}

// out (kRows x np) = mult * a[r] . bt[:, j] for kRows rows of d values against bt (d x np, one row per channel).
void products(const Shape& s, const float* const* a, const float* bt, float mult, float* out) {
  const int64_t vecs = s.np / kLanes;
  int64_t v0 = 0;
  for (; v0 + kChunk <= vecs; v0 += kChunk) product_tile<kChunk>(s, a, bt, mult, v0, out);
  switch (vecs - v0) {   // the rest, in one tile of its own width
    case 1: product_tile<1>(s, a, bt, mult, v0, out); break;
    case 2: product_tile<2>(s, a, bt, mult, v0, out); break;
    case 3: product_tile<3>(s, a, bt, mult, v0, out); break;
    case 4: product_tile<4>(s, a, bt, mult, v0, out); break;
    case 5: product_tile<5>(s, a, bt, mult, v0, out); break;
    default: break;
  }
}

// Scores of rows [i0, i0 + rows) against every key, into out (kRows x np, padded keys at -inf; rows past `rows`
// repeat the last one).
void scores(const Shape& s, const float* qkv, const float* kt, int64_t b, int64_t h, int64_t i0, int64_t rows,
            float* out) {
  const float* q[kRows];
  for (int64_t r = 0; r < kRows; ++r) q[r] = s.q(qkv, b, i0 + std::min(r, rows - 1), h, 0);
  products(s, q, kt, s.scale, out);
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t j = s.n; j < s.np; ++j) out[r * s.np + j] = -INFINITY;
}

// NV vectors of head channels from v0 for kRows rows of weights p (kRows x np) against vp (n x dp), each row
// scaled by mult[r], into the first `rows` rows of y (row stride ldy).
template <int64_t NV>
void value_tile(const Shape& s, const float* p, const float* vp, const float* mult, int64_t v0, int64_t rows,
                float* y, int64_t ldy) {
  const float* rows_p[kRows];
  for (int64_t r = 0; r < kRows; ++r) rows_p[r] = p + r * s.np;
  vec acc[kRows][NV] = {};
  accumulate<NV>(rows_p, vp + v0 * kLanes, s.dp, s.n, acc);
  const int64_t c0 = v0 * kLanes, count = std::min(NV * kLanes, s.d - c0);
  for (int64_t r = 0; r < rows; ++r) {
    float out[NV * kLanes];
    for (int64_t v = 0; v < NV; ++v) store(out + v * kLanes, acc[r][v] * splat(mult[r]));
    std::memcpy(y + r * ldy + c0, out, count * sizeof(float));
  }
}

void values(const Shape& s, const float* p, const float* vp, const float* mult, int64_t rows, float* y,
            int64_t ldy) {
  const int64_t dv = s.dp / kLanes;
  int64_t v0 = 0;
  for (; v0 + kValues <= dv; v0 += kValues) value_tile<kValues>(s, p, vp, mult, v0, rows, y, ldy);
  switch (dv - v0) {
    case 1: value_tile<1>(s, p, vp, mult, v0, rows, y, ldy); break;
    case 2: value_tile<2>(s, p, vp, mult, v0, rows, y, ldy); break;
    case 3: value_tile<3>(s, p, vp, mult, v0, rows, y, ldy); break;
    default: break;
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

// Head h of sample b: part `part` (1 keys, 2 values) transposed into bt (d x np, zero past n), and, where rows is
// not null, row by row into rows (n x dp, zero past d).
void pack(const Shape& s, const float* qkv, int64_t b, int64_t h, int64_t part, float* bt, float* rows) {
  for (int64_t j = 0; j < s.n; ++j) {
    const float* src = s.q(qkv, b, j, h, part);
    if (bt)
      for (int64_t c = 0; c < s.d; ++c) bt[c * s.np + j] = src[c];
    if (rows) {
      std::memcpy(rows + j * s.dp, src, s.d * sizeof(float));
      std::memset(rows + j * s.dp + s.d, 0, (s.dp - s.d) * sizeof(float));
    }
  }
  if (bt)
    for (int64_t c = 0; c < s.d; ++c) std::memset(bt + c * s.np + s.n, 0, (s.np - s.n) * sizeof(float));
}

void run_task(const Shape& s, const float* qkv, float* y, int64_t t, Scratch& scratch) {
  const int64_t b = t / s.heads, h = t % s.heads;
  float* kt = scratch.get(s.d * s.np + s.n * s.dp + kRows * s.np);
  float* vp = kt + s.d * s.np;
  float* sc = vp + s.n * s.dp;
  pack(s, qkv, b, h, 1, kt, nullptr);
  pack(s, qkv, b, h, 2, nullptr, vp);
  for (int64_t i0 = 0; i0 < s.n; i0 += kRows) {
    const int64_t rows = std::min(kRows, s.n - i0);
    scores(s, qkv, kt, b, h, i0, rows, sc);
    float inv[kRows];
    for (int64_t r = 0; r < kRows; ++r) inv[r] = r < rows ? softmax(s, sc + r * s.np) : 0.0f;
    values(s, sc, vp, inv, rows, y + ((b * s.n + i0) * s.heads + h) * s.d, s.row);
  }
}

// The gradient of one (b, h) with respect to its queries, keys and values, given g = dL/dy (B, N, H * D):
// P = softmax(scale q k^T) recomputed per block of rows; dV = P^T g; dS = P (g v^T - rowsum(P g v^T));
// dQ = scale dS k; dK = scale dS^T q. dK and dV sum over the row blocks in order.
void run_grad_task(const Shape& s, const float* qkv, const float* g, float* dqkv, int64_t t, Scratch& scratch) {
  const int64_t b = t / s.heads, h = t % s.heads, dv = s.dp / kLanes;
  float* kt = scratch.get(2 * s.d * s.np + 3 * s.n * s.dp + 2 * kRows * s.np + 2 * kRows * s.dp);
  float* vt = kt + s.d * s.np;
  float* kp = vt + s.d * s.np;
  float* dk = kp + s.n * s.dp;
  float* dvv = dk + s.n * s.dp;
  float* pr = dvv + s.n * s.dp;           // P, kRows x np
  float* ds = pr + kRows * s.np;          // g v^T, then dS
  float* qpad = ds + kRows * s.np;        // the block's q and g rows, kRows x dp
  float* gpad = qpad + kRows * s.dp;
  pack(s, qkv, b, h, 1, kt, kp);
  pack(s, qkv, b, h, 2, vt, nullptr);
  std::memset(dk, 0, 2 * s.n * s.dp * sizeof(float));
  float scale[kRows];
  std::fill(scale, scale + kRows, s.scale);
  for (int64_t i0 = 0; i0 < s.n; i0 += kRows) {
    const int64_t rows = std::min(kRows, s.n - i0);
    const float* gr[kRows];
    for (int64_t r = 0; r < kRows; ++r) gr[r] = g + ((b * s.n + i0 + std::min(r, rows - 1)) * s.heads + h) * s.d;
    scores(s, qkv, kt, b, h, i0, rows, pr);
    products(s, gr, vt, 1.0f, ds);
    std::memset(qpad, 0, 2 * kRows * s.dp * sizeof(float));
    for (int64_t r = 0; r < kRows; ++r) {
      float* p = pr + r * s.np;
      float* d = ds + r * s.np;
      if (r >= rows) {   // a repeated row: no part in dK, dV
        std::memset(p, 0, s.np * sizeof(float));
        std::memset(d, 0, s.np * sizeof(float));
        continue;
      }
      const vec inv = splat(softmax(s, p));
      vec dot = {};
      for (int64_t j = 0; j < s.np; j += kLanes) {
        const vec pj = load(p + j) * inv;
        store(p + j, pj);
        dot += pj * load(d + j);
      }
      const vec delta = splat(hsum(dot));
      for (int64_t j = 0; j < s.np; j += kLanes) store(d + j, load(p + j) * (load(d + j) - delta));
      std::memcpy(qpad + r * s.dp, s.q(qkv, b, i0 + r, h, 0), s.d * sizeof(float));
      std::memcpy(gpad + r * s.dp, gr[r], s.d * sizeof(float));
    }
    values(s, ds, kp, scale, rows, dqkv + (b * s.n + i0) * 3 * s.row + h * s.d, 3 * s.row);   // dQ
    for (int64_t j = 0; j < s.n; ++j)
      for (int64_t v = 0; v < dv; ++v) {
        vec ak = load(dk + j * s.dp + v * kLanes), av = load(dvv + j * s.dp + v * kLanes);
        for (int64_t r = 0; r < kRows; ++r) {
          ak += splat(s.scale * ds[r * s.np + j]) * load(qpad + r * s.dp + v * kLanes);
          av += splat(pr[r * s.np + j]) * load(gpad + r * s.dp + v * kLanes);
        }
        store(dk + j * s.dp + v * kLanes, ak);
        store(dvv + j * s.dp + v * kLanes, av);
      }
  }
  for (int64_t j = 0; j < s.n; ++j) {
    float* out = dqkv + (b * s.n + j) * 3 * s.row + h * s.d;
    std::memcpy(out + s.row, dk + j * s.dp, s.d * sizeof(float));
    std::memcpy(out + 2 * s.row, dvv + j * s.dp, s.d * sizeof(float));
  }
}

ffi::Error Attention(ffi::ThreadPool pool, Tokens qkv, ffi::Result<Tokens> y, int64_t heads, float scale) {
  auto xd = qkv.dimensions(), yd = y->dimensions();
  if (heads <= 0 || xd[2] % (3 * heads) != 0 || yd[0] != xd[0] || yd[1] != xd[1] || yd[2] * 3 != xd[2])
    return ffi::Error::InvalidArgument("dcls_jax attention: qkv (B, N, 3 H D) and y (B, N, H D) disagree");
  const Shape s(xd, heads, scale);
  if (s.batch == 0 || s.n == 0 || s.d == 0) return ffi::Error::Success();
  const float* in = qkv.typed_data();
  float* out = y->typed_data();
  parallel_for(pool, s.batch * heads, [&](int64_t t) {
    thread_local Scratch scratch;
    run_task(s, in, out, t, scratch);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionGrad(ffi::ThreadPool pool, Tokens qkv, Tokens g, ffi::Result<Tokens> dqkv, int64_t heads,
                         float scale) {
  auto xd = qkv.dimensions(), gd = g.dimensions(), dd = dqkv->dimensions();
  if (heads <= 0 || xd[2] % (3 * heads) != 0 || gd[0] != xd[0] || gd[1] != xd[1] || gd[2] * 3 != xd[2] ||
      dd[0] != xd[0] || dd[1] != xd[1] || dd[2] != xd[2])
    return ffi::Error::InvalidArgument("dcls_jax attention_grad: qkv (B, N, 3 H D), g (B, N, H D) disagree");
  const Shape s(xd, heads, scale);
  if (s.batch == 0 || s.n == 0 || s.d == 0) return ffi::Error::Success();
  const float* in = qkv.typed_data();
  const float* gs = g.typed_data();
  float* out = dqkv->typed_data();
  parallel_for(pool, s.batch * heads, [&](int64_t t) {
    thread_local Scratch scratch;
    run_grad_task(s, in, gs, out, t, scratch);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DclsAttentionGrad, AttentionGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Tokens>()
                                  .Arg<Tokens>()
                                  .Ret<Tokens>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));
