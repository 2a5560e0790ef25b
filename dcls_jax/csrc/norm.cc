// DclsLayerNorm: y = (x - mean) / sqrt(var + eps) * w + b over each row of x (M, C), float32, as PyTorch's
// LayerNorm over the last axis: the mean, then the mean of the squared deviations (two passes over the row, which
// stays in L1), then one pass that writes y. XLA:CPU's form takes three passes over memory, its row sums turned
// into windowed reductions, and was 1.5-5x slower than PyTorch's at the models' shapes (dcls_jax/norm.py).
#include <cmath>

#include "common.h"

namespace {

using namespace dcls_jax;  // NOLINT

using Matrix = ffi::Buffer<ffi::F32, 2>;
using Vector = ffi::Buffer<ffi::F32, 1>;

inline float hsum(vec v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// The sum of f(x[c]) over the row, four vectors at a time, then one, then the tail.
template <typename F>
inline float row_sum(const float* x, int64_t c, const F& f) {
  vec a0{}, a1{}, a2{}, a3{};
  int64_t j = 0;
  for (; j + 4 * kLanes <= c; j += 4 * kLanes) {
    a0 += f(load(x + j));
    a1 += f(load(x + j + kLanes));
    a2 += f(load(x + j + 2 * kLanes));
    a3 += f(load(x + j + 3 * kLanes));
  }
  for (; j + kLanes <= c; j += kLanes) a0 += f(load(x + j));
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; j < c; ++j) s += f(splat(x[j]))[0];
  return s;
}

void normalize_row(const float* x, const float* w, const float* b, float* y, int64_t c, float eps) {
  const float mean = row_sum(x, c, [](vec v) { return v; }) / static_cast<float>(c);
  const vec m = splat(mean);
  const float var = row_sum(x, c, [m](vec v) { vec d = v - m; return d * d; }) / static_cast<float>(c);
  const float rstd = 1.0f / std::sqrt(var + eps);
  const vec r = splat(rstd);
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes) store(y + j, (load(x + j) - m) * r * load(w + j) + load(b + j));
  for (; j < c; ++j) y[j] = (x[j] - mean) * rstd * w[j] + b[j];
}

ffi::Error LayerNorm(ffi::ThreadPool pool, Matrix x, Vector w, Vector b, ffi::Result<Matrix> y, float eps) {
  auto xd = x.dimensions();
  const int64_t m = xd[0], c = xd[1];
  if (w.dimensions()[0] != c || b.dimensions()[0] != c || y->dimensions()[0] != m || y->dimensions()[1] != c)
    return ffi::Error::InvalidArgument("dcls_jax layer_norm: x, weight, bias and y disagree on C or M");
  if (m == 0 || c == 0) return ffi::Error::Success();
  const float *xs = x.typed_data(), *ws = w.typed_data(), *bs = b.typed_data();
  float* ys = y->typed_data();
  // ~16 KiB of rows per task: enough tasks to balance, few enough that claiming one costs nothing
  const int64_t rows = std::max<int64_t>(1, 4096 / c), tasks = div_up(m, rows);
  parallel_for(pool, tasks, [&](int64_t t) {
    for (int64_t i = t * rows, end = std::min(m, i + rows); i < end; ++i)
      normalize_row(xs + i * c, ws, bs, ys + i * c, c, eps);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DclsLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Vector>()
                                  .Arg<Vector>()
                                  .Ret<Matrix>()
                                  .Attr<float>("eps"));
