// Channels-last depthwise cross-correlation on the CPU, as XLA FFI custom calls (dcls_jax/native.py compiles
// this file on first use against the installed jaxlib's headers and registers the two handlers).
//
//   DclsDepthwiseForward:  y[n,p,q,c]  = sum_{i,j} x[n, p*sh+i-ph, q*sw+j-pw, c] * w[i,j,c]
//   DclsDepthwiseKernelGrad: dw[i,j,c] = sum_{n,p,q} x[n, p*sh+i-ph, q*sw+j-pw, c] * g[n,p,q,c]
//
// x (N, H, W, C), w and dw (KH, KW, C), y and g (N, HO, WO, C), all float32; positions outside x read as zero,
// so any padding (also negative, a crop) is an attribute, and the output size is the result's shape. The input
// gradient is the forward on the cotangent with the flipped kernel (native.py).
//
// Work is split into tasks: a sample's block of output rows times a chunk of channels (the forward: one vector;
// the kernel gradient: up to 128). Each task copies the input rows and channels it reads into a zero-padded,
// 64-byte aligned tile (channels rounded up to the vector), so the inner loops have no bounds or tails. The
// forward holds a block of output columns of one vector of channels in registers across all taps (at stride 1
// the input vectors move by one column per tap: one load per tap), its kernel stored one vector's taps after
// another; the kernel gradient holds a block of taps across a row of outputs. Taps that read only padding for
// a whole block (kernels larger than the map) are skipped. Tasks run on XLA's
// intra-op thread pool. The kernel gradient sums fixed groups of tasks in order, then the groups in order: its
// rounding does not depend on the number of threads.
#include <array>
#include <utility>
#include <vector>

#include "common.h"

namespace {

using namespace dcls_jax;  // NOLINT: this file's kernels are the namespace's users

using Array3 = ffi::Buffer<ffi::F32, 3>;
using Array4 = ffi::Buffer<ffi::F32, 4>;

// The most output columns (forward: times two rows) or kernel columns (kernel gradient) held in registers.
constexpr int64_t kMaxBlock = kRegisters == 32 ? 12 : 6;
// Vectors of channels per task's tile. The forward takes one: its loads then walk one contiguous plane (with
// 96 or more channels interleaved, columns 384+ bytes apart used half of L1's sets; 17x17 10-25% faster). The
// kernel gradient takes up to 8 (128 channels): it re-reads a row of the cotangent per tap row and channel.
constexpr int64_t kForwardChunkVecs = 1;
constexpr int64_t kGradChunkVecs = 8;
constexpr int64_t kTileFloats = 1 << 19;  // ~2 MiB of input rows per task (an L2) where the batch allows
constexpr int64_t kMinTasks = 16;         // enough tasks for the pool's threads

// The register block for a loop of n: the fewest padded iterations plus a per-block overhead of two, then the
// least padding (17 -> 9, 23 -> 12, 56 -> 8, 14 -> 7, 13 -> 7; a block of 1 would leave the loads unshared).
int64_t block_for(int64_t n) {
  auto cost = [n](int64_t b) { return round_up(n, b) + 2 * div_up(n, b); };
  int64_t best = 1;
  for (int64_t b = 2; b <= kMaxBlock; ++b)
    if (cost(b) < cost(best) || (cost(b) == cost(best) && round_up(n, b) < round_up(n, best))) best = b;
  return best;
}

// Tasks: (sample, block of output rows, chunk of channels); tile: a task's input rows, zero-padded, its
// chunk's channels rounded up to the vector.
struct Geometry {
  int64_t n, h, w, c, kh, kw, ho, wo, sh, sw, ph, pw;
  int64_t cp, chunk, chunks, qb, wo_pad, jb, kw_pad, tile_w, rows, blocks;

  Geometry(int64_t n_, int64_t h_, int64_t w_, int64_t c_, int64_t kh_, int64_t kw_, int64_t ho_, int64_t wo_,
           int64_t sh_, int64_t sw_, int64_t ph_, int64_t pw_, int64_t chunk_vecs)
      : n(n_), h(h_), w(w_), c(c_), kh(kh_), kw(kw_), ho(ho_), wo(wo_), sh(sh_), sw(sw_), ph(ph_), pw(pw_) {
    cp = round_up(c, kLanes);
    const int64_t vecs = cp / kLanes;
    chunk = div_up(vecs, div_up(vecs, chunk_vecs)) * kLanes;
    chunks = div_up(cp, chunk);
    qb = block_for(wo);
    wo_pad = round_up(wo, qb);
    jb = block_for(kw);
    kw_pad = round_up(kw, jb);
    tile_w = (wo_pad - 1) * sw + kw_pad;
    const int64_t by_tasks = std::max<int64_t>(1, n * ho * chunks / kMinTasks);
    const int64_t by_tile = std::max<int64_t>(1, (kTileFloats / (tile_w * chunk) - kh) / sh + 1);
    rows = std::max<int64_t>(1, std::min({ho, by_tasks, by_tile}));
    blocks = div_up(ho, rows);
  }
  int64_t tile_h() const { return (rows - 1) * sh + kh; }
  int64_t tasks() const { return n * blocks * chunks; }
};

struct Task {
  int64_t n, p0, rows, cs, width;  // sample, first output row, rows, first channel, chunk width (of kLanes)
  Task(const Geometry& g, int64_t t) {
    const int64_t ch = t % g.chunks, b = (t / g.chunks) % g.blocks;
    n = t / (g.chunks * g.blocks);
    p0 = b * g.rows;
    rows = std::min(g.rows, g.ho - p0);
    cs = ch * g.chunk;
    width = std::min(g.chunk, g.cp - cs);
  }
};

// The input rows and channels a task reads: tile[r][u][k] = x[n, p0*sh - ph + r, u - pw, cs + k] (0 outside).
// Only the padding is zero-filled (filling the whole tile first had cost ~10% of a 7x7 forward).
const float* fill_tile(const Geometry& g, const Task& k, const float* x, Scratch& scratch) {
  const int64_t row0 = k.p0 * g.sh - g.ph, cnt = std::min(k.width, g.c - k.cs), cw = k.width;
  float* tile = scratch.get(g.tile_h() * g.tile_w * cw);
  const int64_t u0 = std::clamp<int64_t>(g.pw, 0, g.tile_w);                 // tile columns in x: [u0, u1)
  const int64_t u1 = std::clamp<int64_t>(g.w + g.pw, u0, g.tile_w);
  for (int64_t r = 0; r < g.tile_h(); ++r) {
    const int64_t ih = row0 + r;
    float* row = tile + r * g.tile_w * cw;
    if (ih < 0 || ih >= g.h || u0 == u1) {
      std::memset(row, 0, g.tile_w * cw * sizeof(float));
      continue;
    }
    std::memset(row, 0, u0 * cw * sizeof(float));
    std::memset(row + u1 * cw, 0, (g.tile_w - u1) * cw * sizeof(float));
    const float* src = x + ((k.n * g.h + ih) * g.w + (u0 - g.pw)) * g.c + k.cs;
    float* dst = row + u0 * cw;
    if (cnt == g.c && cnt == cw) {
      std::memcpy(dst, src, (u1 - u0) * g.c * sizeof(float));
    } else if (cnt == kLanes && cw == kLanes) {   // one vector per column (the forward's tiles)
      for (int64_t u = u0; u < u1; ++u, src += g.c, dst += cw) store(dst, load(src));
    } else {
      for (int64_t u = u0; u < u1; ++u, src += g.c, dst += cw) {
        std::memcpy(dst, src, cnt * sizeof(float));
        std::memset(dst + cnt, 0, (cw - cnt) * sizeof(float));
      }
    }
  }
  return tile;
}

// Output row r (of the task), columns q0 .. q0+QB-1 (those < WO), channels c0 .. c0+kLanes-1 (those < C).
template <int QB>
inline void store_outputs(const Geometry& g, const Task& k, const vec* acc, float* y, int64_t r, int64_t c0,
                          int64_t q0) {
  const int64_t nc = std::min(kLanes, g.c - k.cs - c0);
  float* yrow = y + ((k.n * g.ho + k.p0 + r) * g.wo) * g.c + k.cs + c0;
  for (int64_t b = 0; b < QB && q0 + b < g.wo; ++b) {
    float* dst = yrow + (q0 + b) * g.c;
    if (nc == kLanes) {
      store(dst, acc[b]);
    } else {
      float lanes[kLanes];
      store(lanes, acc[b]);
      std::memcpy(dst, lanes, nc * sizeof(float));
    }
  }
}

// The taps [lo, hi) of a kernel axis of size k that read x (of that axis' size) for some output of a block,
// its first and last outputs reading x at first + tap and last + tap: the others read only padding (zeros).
// Skipping them changes no sum; it cuts a 17x17 kernel's work on a 14x14 map by a third, on 7x7 by two thirds.
struct Live {
  int64_t lo, hi;
  Live(int64_t first, int64_t last, int64_t size, int64_t k)
      : lo(std::max<int64_t>(0, -last)), hi(std::min(k, size - first)) {}
};

Live live_rows(const Geometry& g, const Task& k, int64_t r, int64_t rows) {
  const int64_t first = (k.p0 + r) * g.sh - g.ph;
  return Live(first, first + (rows - 1) * g.sh, g.h, g.kh);
}

template <int QB>
Live live_columns(const Geometry& g, int64_t q0) {
  return Live(q0 * g.sw - g.pw, (q0 + QB - 1) * g.sw - g.pw, g.w, g.kw);
}

// R output rows (sharing each weight load) by QB output columns by one vector of channels, at (r, q0, c0).
template <int QB, int R>
inline void forward_block(const Geometry& g, const Task& k, const float* tile, const float* wp, float* y,
                          int64_t r, int64_t c0, int64_t q0) {
  const int64_t cw = k.width, step = g.sw * cw, row_step = g.sh * g.tile_w * cw;
  const Live rows = live_rows(g, k, r, R), cols = live_columns<QB>(g, q0);
  vec acc[R][QB] = {};
  for (int64_t i = rows.lo; i < rows.hi; ++i) {
    const float* xrow = tile + ((r * g.sh + i) * g.tile_w + q0 * g.sw) * cw + c0;
    const float* wrow = wp + ((k.cs + c0) / kLanes * g.kh + i) * g.kw * kLanes;
    for (int64_t j = cols.lo; j < cols.hi; ++j) {
      const vec wv = load(wrow + j * kLanes);
      const float* xp = xrow + j * cw;
#pragma GCC unroll 2
      for (int rr = 0; rr < R; ++rr)
#pragma GCC unroll 12
        for (int b = 0; b < QB; ++b) acc[rr][b] += load(xp + rr * row_step + b * step) * wv;
    }
  }
  for (int rr = 0; rr < R; ++rr) store_outputs<QB>(g, k, acc[rr], y, r + rr, c0, q0);
}

// Stride 1, one output row: the QB input vectors of one tap move by one column per tap (one load per tap).
template <int QB>
inline void forward_block_s1(const Geometry& g, const Task& k, const float* tile, const float* wp, float* y,
                             int64_t r, int64_t c0, int64_t q0) {
  const int64_t cw = k.width;
  const Live rows = live_rows(g, k, r, 1), cols = live_columns<QB>(g, q0);
  vec acc[QB] = {};
  for (int64_t i = rows.lo; i < rows.hi && cols.lo < cols.hi; ++i) {
    const float* xrow = tile + ((r + i) * g.tile_w + q0) * cw + c0;
    const float* wrow = wp + ((k.cs + c0) / kLanes * g.kh + i) * g.kw * kLanes;
    vec xs[QB];
#pragma GCC unroll 12
    for (int b = 0; b < QB; ++b) xs[b] = load(xrow + (cols.lo + b) * cw);
    for (int64_t j = cols.lo; j < cols.hi; ++j) {
      const vec wv = load(wrow + j * kLanes);
#pragma GCC unroll 12
      for (int b = 0; b < QB; ++b) acc[b] += xs[b] * wv;
      if (j + 1 < cols.hi) {
#pragma GCC unroll 12
        for (int b = 0; b + 1 < QB; ++b) xs[b] = xs[b + 1];
        xs[QB - 1] = load(xrow + (j + QB) * cw);
      }
    }
  }
  store_outputs<QB>(g, k, acc, y, r, c0, q0);
}

template <int QB>
void forward_task(const Geometry& g, const float* x, const float* wp, float* y, int64_t t) {
  thread_local Scratch scratch;
  const Task k(g, t);
  const float* tile = fill_tile(g, k, x, scratch);
  if (g.sh == 1 && g.sw == 1) {
    for (int64_t r = 0; r < k.rows; ++r)
      for (int64_t c0 = 0; c0 < k.width; c0 += kLanes)
        for (int64_t q0 = 0; q0 < g.wo_pad; q0 += QB) forward_block_s1<QB>(g, k, tile, wp, y, r, c0, q0);
    return;
  }
  for (int64_t r = 0; r < k.rows; r += 2) {
    for (int64_t c0 = 0; c0 < k.width; c0 += kLanes) {
      for (int64_t q0 = 0; q0 < g.wo_pad; q0 += QB) {
        if (r + 1 < k.rows) {
          forward_block<QB, 2>(g, k, tile, wp, y, r, c0, q0);
        } else {
          forward_block<QB, 1>(g, k, tile, wp, y, r, c0, q0);
        }
      }
    }
  }
}

// One task's share of the kernel gradient, added to `part`: (KH, KW_pad, width) floats.
template <int JB>
void kernel_grad_task(const Geometry& g, const float* x, const float* gy, float* part, int64_t t) {
  thread_local Scratch scratch, gscratch;
  const Task k(g, t);
  const float* tile = fill_tile(g, k, x, scratch);
  const int64_t cw = k.width, cnt = std::min(cw, g.c - k.cs), step = g.sw * cw;
  float* gtile = gscratch.zeroed(k.rows * g.wo * cw);
  for (int64_t r = 0; r < k.rows; ++r) {
    const float* src = gy + ((k.n * g.ho + k.p0 + r) * g.wo) * g.c + k.cs;
    float* dst = gtile + r * g.wo * cw;
    for (int64_t q = 0; q < g.wo; ++q) std::memcpy(dst + q * cw, src + q * g.c, cnt * sizeof(float));
  }
  // Row by row (an input row and a cotangent row stay in L1 across the taps), adding into the partial.
  for (int64_t r = 0; r < k.rows; ++r) {
    const float* grow = gtile + r * g.wo * cw;
    const Live rows = live_rows(g, k, r, 1);
    for (int64_t i = rows.lo; i < rows.hi; ++i) {
      const float* xrow = tile + (r * g.sh + i) * g.tile_w * cw;
      for (int64_t c0 = 0; c0 < cw; c0 += kLanes) {
        for (int64_t j0 = 0; j0 < g.kw_pad; j0 += JB) {
          vec acc[JB] = {};
          const float* xp0 = xrow + j0 * cw + c0;
          const float* gp = grow + c0;
          if (g.sw == 1) {   // the JB input vectors of one output column move by one column per column
            vec xs[JB];
#pragma GCC unroll 12
            for (int b = 0; b < JB; ++b) xs[b] = load(xp0 + b * cw);
            for (int64_t q = 0; q < g.wo; ++q) {
              const vec gv = load(gp + q * cw);
#pragma GCC unroll 12
              for (int b = 0; b < JB; ++b) acc[b] += xs[b] * gv;
              if (q + 1 < g.wo) {
#pragma GCC unroll 12
                for (int b = 0; b + 1 < JB; ++b) xs[b] = xs[b + 1];
                xs[JB - 1] = load(xp0 + (q + JB) * cw);
              }
            }
          } else {
            for (int64_t q = 0; q < g.wo; ++q) {
              const vec gv = load(gp + q * cw);
              const float* xp = xp0 + q * step;
#pragma GCC unroll 12
              for (int b = 0; b < JB; ++b) acc[b] += load(xp + b * cw) * gv;
            }
          }
          float* dst = part + (i * g.kw_pad + j0) * cw + c0;
#pragma GCC unroll 12
          for (int b = 0; b < JB; ++b) store(dst + b * cw, load(dst + b * cw) + acc[b]);
        }
      }
    }
  }
}

using TaskFn = void (*)(const Geometry&, const float*, const float*, float*, int64_t);

template <int... B>
constexpr std::array<TaskFn, sizeof...(B)> forward_table(std::integer_sequence<int, B...>) {
  return {&forward_task<B + 1>...};
}
template <int... B>
constexpr std::array<TaskFn, sizeof...(B)> kernel_grad_table(std::integer_sequence<int, B...>) {
  return {&kernel_grad_task<B + 1>...};
}
constexpr auto kForward = forward_table(std::make_integer_sequence<int, kMaxBlock>{});
constexpr auto kKernelGrad = kernel_grad_table(std::make_integer_sequence<int, kMaxBlock>{});

ffi::Error check(const Geometry& g) {
  if (g.n < 0 || g.c <= 0 || g.kh <= 0 || g.kw <= 0 || g.sh <= 0 || g.sw <= 0)
    return ffi::Error::InvalidArgument("dcls_jax depthwise: bad shapes or strides");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, Array4 x, Array3 w,
                   ffi::Result<Array4> y, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (yd[0] != xd[0] || yd[3] != xd[3] || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("dcls_jax depthwise forward: x, w and y disagree on batch or channels");
  Geometry g(xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], yd[1], yd[2], sh, sw, ph, pw, kForwardChunkVecs);
  if (auto e = check(g); e.failure()) return e;
  if (g.n * g.ho * g.wo == 0) return ffi::Error::Success();
  // the kernel, channels padded to the lanes, one vector's taps after another: wp[c / kLanes][i][j][c % kLanes]
  std::vector<float> wp(g.kh * g.kw * g.cp, 0.0f);
  const int64_t taps = g.kh * g.kw;
  for (int64_t k = 0; k < taps; ++k)
    for (int64_t c = 0; c < g.c; ++c) wp[((c / kLanes) * taps + k) * kLanes + c % kLanes] = w.typed_data()[k * g.c + c];
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  const TaskFn task = kForward[g.qb - 1];
  parallel_for(pool, g.tasks(), [&](int64_t t) { task(g, xs, wp.data(), ys, t); });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, Array4 x, Array4 gy,
                      ffi::Result<Array3> dw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  auto xd = x.dimensions(), gd = gy.dimensions(), wd = dw->dimensions();
  if (gd[0] != xd[0] || gd[3] != xd[3] || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("dcls_jax depthwise kernel gradient: x, g and dw disagree");
  Geometry g(xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], gd[1], gd[2], sh, sw, ph, pw, kGradChunkVecs);
  if (auto e = check(g); e.failure()) return e;
  float* out = dw->typed_data();
  // Each chunk of channels' tasks in G fixed groups of consecutive tasks, a group's tasks summed in order into
  // its partial, the partials then summed in order: the same rounding for any number of threads. About
  // kMinTasks (chunk, group) items in all: more partials would only cost memory and their sum.
  const int64_t part_size = g.kh * g.kw_pad * g.chunk, per_chunk = g.n * g.blocks;
  const int64_t groups = std::max<int64_t>(1, std::min(per_chunk, div_up(kMinTasks, g.chunks)));
  std::vector<float> parts(g.chunks * groups * part_size, 0.0f);
  if (g.n * g.ho * g.wo > 0) {
    const float* xs = x.typed_data();
    const float* gs = gy.typed_data();
    const TaskFn task = kKernelGrad[g.jb - 1];
    parallel_for(pool, g.chunks * groups, [&](int64_t item) {
      const int64_t ch = item / groups, grp = item % groups;
      float* part = parts.data() + item * part_size;
      for (int64_t u = grp * per_chunk / groups; u < (grp + 1) * per_chunk / groups; ++u)
        task(g, xs, gs, part, u * g.chunks + ch);
    });
  }
  // The sum of the partials and its copy into dw, a chunk's kernel row (i) per task.
  parallel_for(pool, g.chunks * g.kh, [&](int64_t item) {
    const int64_t ch = item / g.kh, i = item % g.kh;
    const int64_t cs = ch * g.chunk, cw = std::min(g.chunk, g.cp - cs), cnt = std::min(cw, g.c - cs);
    float* sum = parts.data() + ch * groups * part_size + i * g.kw_pad * cw;
    for (int64_t grp = 1; grp < groups; ++grp)
      for (int64_t e = 0; e < g.kw * cw; ++e) sum[e] += sum[grp * part_size + e];
    for (int64_t j = 0; j < g.kw; ++j)
      std::memcpy(out + (i * g.kw + j) * g.c + cs, sum + j * cw, cnt * sizeof(float));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DclsDepthwiseForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Array4>()
                                  .Arg<Array3>()
                                  .Ret<Array4>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DclsDepthwiseKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Array4>()
                                  .Arg<Array4>()
                                  .Ret<Array3>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));
