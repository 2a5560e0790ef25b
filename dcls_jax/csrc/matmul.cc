// Matrix products on the CPU, float32, as an XLA FFI custom call (dcls_jax/dense.py):
//
//   DclsMatmul:  c[i, j] = sum_p opA[i, p] * opB[p, j],  c (M, N)
//   opA = a (M, K), or a stored (K, M) when ta = 1;  opB = b (K, N), or b stored (N, K) when tb = 1.
//
// A Linear layer's forward is (x, w, ta 0, tb 1) with w in PyTorch's (out, in) layout; its input gradient
// (g, w, 0, 0) and its weight gradient (g, x, 1, 0). XLA:CPU's own GEMM runs the (out, in) weight at about
// half the speed of oneDNN on the row counts of a ConvNeXt's later stages (BENCHMARKS.md).
//
// b is packed once per call into panels of kNR = two vectors of columns by kc rows (zero-padded beyond N;
// when tb, transposed a kLanes x kLanes block at a time in registers). Tasks are (block of kMC rows of c,
// group of panels), or for up to kFusedBlocks blocks of rows (every row, group of panels), each task then
// packing its own panels as it goes; a task's register tile is kMR rows by kNR columns, each row's opA value
// broadcast from a (rows in place, or a column of the stored (K, M) array) against the panel's two vectors.
// Every element of c sums its K products in order, kc at a time with c holding the running sum: the rounding is
// the same for any number of threads.
#include <vector>

#include "common.h"

namespace {

using namespace dcls_jax;  // NOLINT: this file's kernels are the namespace's users

using Matrix = ffi::Buffer<ffi::F32, 2>;
using Vector = ffi::Buffer<ffi::F32, 1>;   // (a comma inside the handler macros' arguments would split them)

constexpr int64_t kNR = 2 * kLanes;                    // columns of a register tile: two vectors
constexpr int64_t kMR = kRegisters == 32 ? 12 : 6;    // its rows: 2 kMR accumulators, two b vectors, a broadcast
constexpr int64_t kMC = 8 * kMR;                      // rows of c per task
constexpr int64_t kKC = 256;                          // products per pass over a tile (a panel: 32 KiB)

constexpr int64_t kFusedBlocks = 8;   // up to this many blocks of rows (768): each task packs its own panels

struct Shape {
  int64_t m, n, k, kc, kblocks, npad, panels, mblocks, groups, per_group;
  bool ta, tb, fused;

  Shape(int64_t m_, int64_t n_, int64_t k_, bool ta_, bool tb_, int64_t threads)
      : m(m_), n(n_), k(k_), ta(ta_), tb(tb_) {
    kblocks = std::max<int64_t>(1, div_up(k, kKC));
    kc = std::max<int64_t>(1, div_up(k, kblocks));
    npad = round_up(n, kNR);
    panels = npad / kNR;
    mblocks = div_up(m, kMC);
    fused = mblocks <= kFusedBlocks;
    // few row blocks (small M), or tasks that take every row: split the panels into groups, for about four
    // tasks per thread
    groups = std::min(panels, std::max<int64_t>(1, div_up(4 * threads, fused ? 1 : mblocks)));
    per_group = div_up(panels, groups);
    groups = div_up(panels, per_group);
  }
  int64_t kc_of(int64_t pc) const { return std::min(kc, k - pc * kc); }
  // packed b: k block pc from pc * kc * npad, its panel jp from there + jp * kc_of(pc) * kNR, row-major
  int64_t panel_offset(int64_t pc, int64_t jp) const { return pc * kc * npad + jp * kc_of(pc) * kNR; }
};

typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Stage B of a kLanes x kLanes transpose in registers: rows r and r + B swap their off-diagonal B x B blocks.
template <int B>
inline ivec swap_mask(bool second) {
  ivec m{};
  for (int l = 0; l < kLanes; ++l)
    m[l] = second ? ((l & B) ? kLanes + l : l + B) : ((l & B) ? kLanes + l - B : l);
  return m;
}

template <int B>
inline void transpose_stage(vec* x) {
  const ivec first = swap_mask<B>(false), second = swap_mask<B>(true);
  for (int r = 0; r < kLanes; ++r) {
    if (r & B) continue;
    const vec u = x[r], v = x[r + B];
    x[r] = __builtin_shuffle(u, v, first);
    x[r + B] = __builtin_shuffle(u, v, second);
  }
}

inline void transpose(vec* x) {
  if constexpr (kLanes == 16) transpose_stage<8>(x);
  transpose_stage<4>(x);
  transpose_stage<2>(x);
  transpose_stage<1>(x);
}

// Memory for the packed opB. A fresh allocation of a few MiB is mapped anew by the kernel on every call, and
// its page faults cost as much as packing (~1.7 us per 4 KiB here: 2 of 9 ms at 392 x 768 -> 3072), so one
// buffer, the largest yet needed up to 64 MiB, is kept for the process; a call that finds it in use
// (several products at once) or needs more allocates its own.
class PackBuffer {
 public:
  explicit PackBuffer(int64_t floats) {
    const size_t bytes = round_up(floats * sizeof(float), 64);
    if (bytes <= kKeepBytes && mu_.try_lock()) {
      locked_ = true;
      if (bytes > kept_bytes_) {
        std::free(kept_);
        kept_ = static_cast<float*>(std::aligned_alloc(64, bytes));
        kept_bytes_ = kept_ ? bytes : 0;
      }
      data_ = kept_;
    } else {
      data_ = owned_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    }
  }
  ~PackBuffer() {
    std::free(owned_);
    if (locked_) mu_.unlock();
  }
  PackBuffer(const PackBuffer&) = delete;
  PackBuffer& operator=(const PackBuffer&) = delete;
  float* get() const { return data_; }

 private:
  static constexpr size_t kKeepBytes = size_t{64} << 20;
  static inline std::mutex mu_;
  static inline float* kept_ = nullptr;
  static inline size_t kept_bytes_ = 0;
  float* data_ = nullptr;
  float* owned_ = nullptr;
  bool locked_ = false;
};

// K block pc of panel jp of opB into dst (kc_of(pc) rows of kNR floats).
void pack_block(const Shape& s, const float* b, float* dst, int64_t jp, int64_t pc) {
  const int64_t j0 = jp * kNR, nj = std::min(kNR, s.n - j0);
  const int64_t p0 = pc * s.kc, kc = s.kc_of(pc);
  if (nj < kNR) std::memset(dst, 0, kc * kNR * sizeof(float));
  if (!s.tb) {   // b (K, N): the panel's rows are contiguous
    for (int64_t p = 0; p < kc; ++p) std::memcpy(dst + p * kNR, b + (p0 + p) * s.n + j0, nj * sizeof(float));
    return;
  }
  // b stored (N, K): opB[p, j] = b[j * K + p], kLanes columns by kLanes rows per transpose
  const int64_t pv = kc / kLanes * kLanes;
  for (int64_t h = 0; h * kLanes < nj; ++h) {
    const int64_t jn = std::min(kLanes, nj - h * kLanes);
    const float* src = b + (j0 + h * kLanes) * s.k + p0;
    for (int64_t p = 0; p < pv; p += kLanes) {
      vec x[kLanes];
      for (int64_t jj = 0; jj < kLanes; ++jj) x[jj] = jj < jn ? load(src + jj * s.k + p) : vec{};
      transpose(x);
      for (int64_t q = 0; q < kLanes; ++q) store(dst + (p + q) * kNR + h * kLanes, x[q]);
    }
    for (int64_t jj = 0; jj < jn; ++jj)
      for (int64_t p = pv; p < kc; ++p) dst[p * kNR + h * kLanes + jj] = src[jj * s.k + p];
  }
}

// What the last k block does to a tile before storing it (DclsLinearAct): adds the bias (padded to whole panels),
// then takes the activation: none, the exact GELU z / 2 (1 + erf(z / sqrt 2)), or StarReLU s relu(z)^2 + b.
enum Activation : int64_t { kIdentity = 0, kGelu = 1, kStarRelu = 2 };
struct Epilogue {
  const float* bias = nullptr;
  int64_t act = kIdentity;
  float scale = 1.0f, shift = 0.0f;   // StarReLU's s and b
};

// erf on [-4, 4] (clamped beyond, where float erf is +-1 to 2e-8) as x P(x^2) / Q(x^2): the rational
// approximation of Eigen's and XLA's float erf; max error 3.8e-7 (XLA:CPU's jax.lax.erf: 3.3e-7).
inline vec erf(vec x) {
  const vec lo = splat(-4.0f), hi = splat(4.0f);
  x = x < lo ? lo : x;   // NaN stays NaN
  x = x > hi ? hi : x;
  const vec x2 = x * x;
  vec p = splat(-2.72614225801306e-10f);
  for (float a : {2.77068142495902e-08f, -2.10102402082508e-06f, -5.69250639462346e-05f, -7.34990630326855e-04f,
                  -2.95459980854025e-03f, -1.60960333262415e-02f})
    p = p * x2 + splat(a);
  vec q = splat(-1.45660718464996e-05f);
  for (float b : {-2.13374055278905e-04f, -1.68282697438203e-03f, -7.37332916720468e-03f, -1.42647390514189e-02f})
    q = q * x2 + splat(b);
  return x * p / q;
}

inline vec gelu(vec z) { return splat(0.5f) * z * (splat(1.0f) + erf(z * splat(0.70710678118654752f))); }

// StarReLU as the models write it, s * (relu(z) * relu(z)) + b (relu keeps NaN).
inline vec star_relu(vec z, vec s, vec b) {
  const vec r = z < vec{} ? vec{} : z;
  return s * (r * r) + b;
}

inline vec activate(vec z, const Epilogue& ep) {
  if (ep.act == kGelu) return gelu(z);
  if (ep.act == kStarRelu) return star_relu(z, splat(ep.scale), splat(ep.shift));
  return z;
}

// c[i, j] (+)= sum_p opA[i, p] * panel[p, j] over one k block, for rows < ni and columns < nj of the tile.
// TA false: opA[i, p] = a[i * lda + p] (rows beyond ni read row ni - 1); TA true: opA[i, p] = a[p * lda + i]
// (kMR readable floats per p).
template <bool TA>
inline void tile(int64_t kc, const float* __restrict a, int64_t lda, const float* __restrict panel, float* c,
                 int64_t ldc, int64_t ni, int64_t nj, bool first, const float* bias = nullptr,
                 const Epilogue* ep = nullptr) {
  vec acc0[kMR], acc1[kMR];
  for (int64_t i = 0; i < ni; ++i) {   // c's rows, wanted at the end: in cache by then (2-9% at these shapes)
    __builtin_prefetch(c + i * ldc, 1);
    if (nj > kLanes) __builtin_prefetch(c + i * ldc + kLanes, 1);
  }
  const bool full = ni == kMR && nj == kNR;
  if (first) {
    for (int i = 0; i < kMR; ++i) acc0[i] = acc1[i] = vec{};
  } else if (full) {
    for (int i = 0; i < kMR; ++i) {
      acc0[i] = load(c + i * ldc);
      acc1[i] = load(c + i * ldc + kLanes);
    }
  } else {
    float t[kMR * kNR] = {};
    for (int64_t i = 0; i < ni; ++i) std::memcpy(t + i * kNR, c + i * ldc, nj * sizeof(float));
    for (int i = 0; i < kMR; ++i) {
      acc0[i] = load(t + i * kNR);
      acc1[i] = load(t + i * kNR + kLanes);
    }
  }
  if constexpr (TA) {
    for (int64_t p = 0; p < kc; ++p, a += lda, panel += kNR) {
      const vec b0 = load(panel), b1 = load(panel + kLanes);
#pragma GCC unroll 16
      for (int i = 0; i < kMR; ++i) {
        const vec ai = splat(a[i]);
        acc0[i] += ai * b0;
        acc1[i] += ai * b1;
      }
    }
  } else {
    const float* row[kMR];
    for (int i = 0; i < kMR; ++i) row[i] = a + std::min<int64_t>(i, ni - 1) * lda;
    for (int64_t p = 0; p < kc; ++p, panel += kNR) {
      const vec b0 = load(panel), b1 = load(panel + kLanes);
#pragma GCC unroll 16
      for (int i = 0; i < kMR; ++i) {
        const vec ai = splat(row[i][p]);
        acc0[i] += ai * b0;
        acc1[i] += ai * b1;
      }
    }
  }
  if (bias) {   // the last k block of DclsLinearAct: bias, then the activation, on the registers
    const vec b0 = load(bias), b1 = load(bias + kLanes);
    for (int i = 0; i < kMR; ++i) {
      acc0[i] = activate(acc0[i] + b0, *ep);
      acc1[i] = activate(acc1[i] + b1, *ep);
    }
  }
  if (full) {
    for (int i = 0; i < kMR; ++i) {
      store(c + i * ldc, acc0[i]);
      store(c + i * ldc + kLanes, acc1[i]);
    }
  } else {
    float t[kMR * kNR];
    for (int i = 0; i < kMR; ++i) {
      store(t + i * kNR, acc0[i]);
      store(t + i * kNR + kLanes, acc1[i]);
    }
    for (int64_t i = 0; i < ni; ++i) std::memcpy(c + i * ldc, t + i * kNR, nj * sizeof(float));
  }
}

// Rows [m0, m0 + mc) of c, k block pc, against one packed panel (columns from j0).
void panel_rows(const Shape& s, const float* a, const float* panel, float* c, int64_t m0, int64_t mc,
                int64_t pc, int64_t j0, Scratch& scratch, const Epilogue& ep) {
  const int64_t kc = s.kc_of(pc), p0 = pc * s.kc, nj = std::min(kNR, s.n - j0);
  const float* bias = ep.bias && pc == s.kblocks - 1 ? ep.bias + j0 : nullptr;
  for (int64_t i0 = 0; i0 < mc; i0 += kMR) {
    const int64_t ni = std::min(kMR, mc - i0);
    float* tile_c = c + (m0 + i0) * s.n + j0;
    if (!s.ta) {
      tile<false>(kc, a + (m0 + i0) * s.k + p0, s.k, panel, tile_c, s.n, ni, nj, pc == 0, bias, &ep);
    } else if (ni == kMR) {
      tile<true>(kc, a + p0 * s.m + m0 + i0, s.m, panel, tile_c, s.n, ni, nj, pc == 0, bias, &ep);
    } else {   // the last rows of a stored (K, M) opA: copied, zero-padded to kMR
      float* edge = scratch.zeroed(kc * kMR);
      for (int64_t p = 0; p < kc; ++p) std::memcpy(edge + p * kMR, a + (p0 + p) * s.m + m0 + i0, ni * sizeof(float));
      tile<true>(kc, edge, kMR, panel, tile_c, s.n, ni, nj, pc == 0, bias, &ep);
    }
  }
}

// Task t: rows [m0, m0 + mc) of c (block t / groups) times the panels of group t % groups, from the packed bp.
void run_task(const Shape& s, const float* a, const float* bp, float* c, int64_t t, const Epilogue& ep) {
  thread_local Scratch scratch;
  const int64_t m0 = t / s.groups * kMC, mc = std::min(kMC, s.m - m0);
  const int64_t jp0 = t % s.groups * s.per_group, jp1 = std::min(s.panels, jp0 + s.per_group);
  for (int64_t pc = 0; pc < s.kblocks; ++pc)
    for (int64_t jp = jp0; jp < jp1; ++jp)
      panel_rows(s, a, bp + s.panel_offset(pc, jp), c, m0, mc, pc, jp * kNR, scratch, ep);
}

// Few rows (s.fused): task t takes every row and the panels of group t, each packed a k block at a time into a
// buffer that stays in L1 and used at once, where packing the whole opB first sends it to memory and back. Same
// sums, bit for bit; 2-core AVX-512, against packing first: 1.2-1.4x at 49-196 rows, 1.1-1.2x at 392, 1.0-1.1x
// at 784; at 1568 and more rows 0.8-0.9x (every panel then streams all of opA's rows from memory).
void run_fused_task(const Shape& s, const float* a, const float* b, float* c, int64_t t, const Epilogue& ep) {
  thread_local Scratch scratch, own;
  const int64_t jp0 = t * s.per_group, jp1 = std::min(s.panels, jp0 + s.per_group);
  float* panel = own.get(s.kc * kNR);
  for (int64_t pc = 0; pc < s.kblocks; ++pc)
    for (int64_t jp = jp0; jp < jp1; ++jp) {
      pack_block(s, b, panel, jp, pc);
      panel_rows(s, a, panel, c, 0, s.m, pc, jp * kNR, scratch, ep);
    }
}

// c = op(a) @ op(b), then the epilogue; m, n, k >= 1.
ffi::Error Product(ffi::ThreadPool& pool, const Shape& s, const float* as, const float* bs, float* cs,
                   const Epilogue& ep) {
  if (s.fused) {
    parallel_for(pool, s.groups, [&](int64_t t) { run_fused_task(s, as, bs, cs, t, ep); });
    return ffi::Error::Success();
  }
  PackBuffer bp(s.kblocks * s.kc * s.npad);
  if (!bp.get()) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "dcls_jax matmul: out of memory");
  parallel_for(pool, s.panels, [&](int64_t jp) {
    for (int64_t pc = 0; pc < s.kblocks; ++pc) pack_block(s, bs, bp.get() + s.panel_offset(pc, jp), jp, pc);
  });
  parallel_for(pool, s.mblocks * s.groups, [&](int64_t t) { run_task(s, as, bp.get(), cs, t, ep); });
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::ThreadPool pool, Matrix a, Matrix b, ffi::Result<Matrix> c, int64_t ta, int64_t tb) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const int64_t m = ta ? ad[1] : ad[0], k = ta ? ad[0] : ad[1];
  const int64_t kb = tb ? bd[1] : bd[0], n = tb ? bd[0] : bd[1];
  if (k != kb || cd[0] != m || cd[1] != n)
    return ffi::Error::InvalidArgument("dcls_jax matmul: a, b and c disagree on M, K or N");
  float* cs = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(cs, 0, m * n * sizeof(float));
    return ffi::Error::Success();
  }
  return Product(pool, Shape(m, n, k, ta != 0, tb != 0, pool.num_threads()), a.typed_data(), b.typed_data(), cs,
                 Epilogue{});
}

// A Linear layer and its activation, the value only (dense.linear's custom_vjp differentiates the unfused form):
// c = act(x @ w^T + bias), x (M, K), w (N, K) as torch.nn.Linear's, K >= 1; act: `act` (Activation), with
// params = (s, b) for StarReLU. The bias is added to the finished sum and the activation taken on the register
// tile before it is stored: the same numbers as the product, then the bias, then the activation, without the
// pass over c that XLA's separate fusion makes.
ffi::Error LinearAct(ffi::ThreadPool pool, Matrix x, Matrix w, Vector bias, Vector params, ffi::Result<Matrix> c,
                     int64_t act) {
  auto xd = x.dimensions(), wd = w.dimensions(), cd = c->dimensions();
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  if (wd[1] != k || k == 0 || bias.dimensions()[0] != n || cd[0] != m || cd[1] != n)
    return ffi::Error::InvalidArgument("dcls_jax linear_act: x, w, bias and c disagree on M, K or N (or K = 0)");
  if (act < kIdentity || act > kStarRelu || params.dimensions()[0] != 2)
    return ffi::Error::InvalidArgument("dcls_jax linear_act: unknown activation, or params not (s, b)");
  if (m == 0 || n == 0) return ffi::Error::Success();
  const Shape s(m, n, k, false, true, pool.num_threads());
  std::vector<float> padded(s.npad, 0.0f);   // whole panels: a tile's bias loads stay inside
  std::memcpy(padded.data(), bias.typed_data(), n * sizeof(float));
  const float* ps = params.typed_data();
  return Product(pool, s, x.typed_data(), w.typed_data(), c->typed_data(),
                 Epilogue{padded.data(), act, ps[0], ps[1]});
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DclsMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<int64_t>("ta")
                                  .Attr<int64_t>("tb"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DclsLinearAct, LinearAct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Arg<Vector>()
                                  .Arg<Vector>()
                                  .Ret<Matrix>()
                                  .Attr<int64_t>("act"));
