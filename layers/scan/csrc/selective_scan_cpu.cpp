// Selective scan on the CPU: a compiled loop for forward and backward.
//
// Channels are processed SIMD_W at a time as one vector ("lanes"); a block of SIMD_W channels of one scan
// direction (one B/C group) of one image is the unit of work. Time runs in chunks of CHUNK steps: a chunk's u and
// delta are transposed into time-major local buffers ([t] -> one vector of lanes), while B and C are read in
// place (row n of a group is contiguous in time and shared by all its lanes). The forward saves the state at the
// start of every chunk; the backward recomputes a chunk's states from that checkpoint.
//
// Blocks (forward) and parts of groups (backward) are handed to threads one at a time. Every output element of the
// forward is computed by the same sequence of operations whatever the number of threads (a block is never split),
// so decoding is bit-identical across thread counts; the backward's dL/dB, dL/dC may differ in rounding.
//
// The inner loops use GCC/Clang vector types (one Vec = SIMD_W lanes); exp and the transposes have AVX-512
// versions, used when the build machine has AVX-512 (the extension is compiled with -march=native).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define CSM_AVX512 1  // the exp and the transposes have AVX-512 paths; everything else is generic vector code
#else
#define CSM_AVX512 0
#endif

namespace {

constexpr int SIMD_W = 16;  // channels per vector: one AVX-512 register, two AVX2 ones
constexpr int CHUNK = 64;   // time steps per chunk and checkpoint interval (a multiple of 16: see load_lanes)
// Vector state updates (time steps x states x blocks) that are worth another thread: a parallel region costs
// microseconds, much more on a busy machine, and small scans are common (tests, tiny models).
constexpr int64_t PARALLEL_MIN_WORK = 1 << 14;
constexpr int64_t TASKS_PER_THREAD = 4;  // backward: split groups until there are this many tasks per thread

// GCC/Clang vector types: arithmetic is elementwise, a scalar operand is broadcast.
typedef float Vec __attribute__((vector_size(SIMD_W * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(SIMD_W * sizeof(int32_t))));
typedef double VecD __attribute__((vector_size(SIMD_W * sizeof(double))));

constexpr float LOG2E = 1.4426950408889634f;

inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }
inline Vec vmin(Vec a, Vec b) { return a < b ? a : b; }

// 2^f for f in [-1/2, 1/2]: minimax polynomial for the relative error (2e-7 in float32) with p(0) = 1 and
// p'(0) = ln 2 (to 3e-7): a decay close to 1 then has a relative error proportional to -log(decay), so the error
// does not build up over the thousands of steps that a slow decay spans.
inline Vec exp2_poly(Vec f) {
  Vec p = f * 1.326472690e-3f + 9.671512661e-3f;
  p = p * f + 5.550733744e-2f;
  p = p * f + 2.402224208e-1f;
  p = p * f + 6.931469776e-1f;
  return p * f + 1.f;
}

// 2^y, branch-free and inlined (the decays exp(dt * A) dominate the scan's cost): y = k + f with k an integer and
// |f| <= 1/2, 2^f by a polynomial, times 2^k.
inline Vec exp2v(Vec y) {
#if CSM_AVX512
  static_assert(SIMD_W == 16, "the AVX-512 path holds one vector in one register");
  // vreduceps gives f = y - round(y) in one instruction and vscalefps multiplies by 2^k with correct overflow to
  // inf and underflow to 0, so no clamping is needed.
  const __m512 yv = (__m512)y;
  const __m512 f = _mm512_reduce_ps(yv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (Vec)_mm512_scalef_ps((__m512)exp2_poly((Vec)f), _mm512_sub_ps(yv, f));
#else
  // y is clamped to [-127, 127] so that the biased exponent k + 127 is in [0, 254]; it is 0 (the result is then
  // exactly 0) below about -126.5, where float's normal range ends. k comes from an integer conversion so that
  // -ffast-math cannot reassociate f = y - k into a form that loses y's low bits.
  y = vmin(vmax(y, Vec{} - 127.f), Vec{} + 127.f);
  const VecI biased = __builtin_convertvector(y + 127.5f, VecI);  // y + 127.5 > 0: truncation is floor
  const Vec f = y - __builtin_convertvector(biased - 127, Vec);
  return exp2_poly(f) * (Vec)(biased << 23);
#endif
}

inline Vec expv(Vec x) { return exp2v(x * LOG2E); }

// log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|), with log1p(e) = 2 atanh(e / (2 + e)) by its series
// (s = e / (2 + e) <= 1/3; 7 terms give a relative error below 2e-8, also for e -> 0).
inline Vec softplus(Vec x) {
  const Vec ax = vmax(x, -x);
  const Vec e = expv(-ax);
  const Vec s = e / (2.f + e);
  const Vec s2 = s * s;
  Vec p = s2 * (1.f / 13) + 1.f / 11;
  p = p * s2 + 1.f / 9;
  p = p * s2 + 1.f / 7;
  p = p * s2 + 1.f / 5;
  p = p * s2 + 1.f / 3;
  p = p * s2 + 1.f;
  return vmax(x, Vec{}) + 2.f * s * p;
}

// d softplus(x) / dx
inline Vec sigmoid(Vec x) { return 1.f / (1.f + expv(-x)); }

// Denormals are flushed to zero while a kernel runs: a state that decays for many steps would otherwise crawl
// through the subnormal range, which is many times slower on x86. (-ffast-math does not set this for a shared
// library.) Every thread sets the same mode, so results stay independent of the thread count.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// The outputs are written for the first time by the kernel: with transparent huge pages in their default
// "madvise" mode, ask for them, since faulting in a 64 MB output 4 KB at a time costs about a third of the
// forward's time. Only the 2 MB-aligned interior can use huge pages.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t HUGE_PAGE = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) & ~(HUGE_PAGE - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors are fine
#endif
}

// Runs body(task, scratch) for every task in [0, n_tasks) on ATen's threads, each thread with its own scratch
// (make_scratch()) and with denormals flushed. Tasks are handed out one at a time from a shared counter instead of
// in fixed ranges: a thread whose core is shared with another process then simply takes fewer tasks instead of
// holding up the others. Which thread runs a task does not change its result.
template <typename MakeScratch, typename Body>
void run_tasks(int64_t n_tasks, int64_t work, const MakeScratch& make_scratch, const Body& body) {
  const int64_t workers = std::min<int64_t>(
      {static_cast<int64_t>(at::get_num_threads()), n_tasks, std::max<int64_t>(1, work / PARALLEL_MIN_WORK)});
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(1, workers), 1, [&](int64_t, int64_t) {
    FlushDenormals flush;
    auto scratch = make_scratch();
    for (int64_t task = next++; task < n_tasks; task = next++) body(task, scratch);
  });
}

struct Dims {
  int64_t batch, channels, length, groups, per_group, n_state, blocks, n_chunks;
};

Dims dims_of(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B) {
  Dims d;
  d.batch = u.size(0);
  d.channels = u.size(1);
  d.length = u.size(2);
  d.groups = B.size(1);
  d.per_group = d.channels / d.groups;
  d.n_state = A.size(1);
  d.blocks = (d.per_group + SIMD_W - 1) / SIMD_W;  // blocks per group
  d.n_chunks = (d.length + CHUNK - 1) / CHUNK;
  return d;
}

// One block of lanes: image b, group g, channels [ch0, ch0 + width).
struct Block {
  int64_t b, g, ch0;
  int width;
  Block(const Dims& d, int64_t b_, int64_t g_, int64_t blk)
      : b(b_), g(g_), ch0(g_ * d.per_group + blk * SIMD_W),
        width(static_cast<int>(std::min<int64_t>(SIMD_W, d.per_group - blk * SIMD_W))) {}
};

#if CSM_AVX512
// Masks of the butterfly stages of a 16 x 16 transpose (see transpose16).
struct ButterflyMasks {
  alignas(64) int32_t lo[4][16];
  alignas(64) int32_t hi[4][16];
};
constexpr ButterflyMasks make_butterfly_masks() {
  ButterflyMasks m{};
  for (int s = 0; s < 4; ++s) {
    const int w = 8 >> s;
    for (int j = 0; j < 16; ++j) {
      m.lo[s][j] = (j & w) ? 16 + j - w : j;
      m.hi[s][j] = (j & w) ? 16 + j : j + w;
    }
  }
  return m;
}
constexpr ButterflyMasks BUTTERFLY = make_butterfly_masks();

// r[i][j] -> r[j][i] in registers: stage w exchanges element (i, j | w) with (i | w, j) for all i, j with bit w
// clear, two two-source permutes per pair of rows; after the stages for w = 8, 4, 2, 1 every bit of i and j has
// been swapped. (Fully unrolled, so that r stays in registers.)
inline void transpose16(__m512 r[16]) {
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    const int w = 8 >> s;
    const __m512i lo = _mm512_load_si512(BUTTERFLY.lo[s]), hi = _mm512_load_si512(BUTTERFLY.hi[s]);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & w) continue;
      const __m512 a = r[i], b = r[i | w];
      r[i] = _mm512_permutex2var_ps(a, lo, b);
      r[i | w] = _mm512_permutex2var_ps(a, hi, b);
    }
  }
}

inline __mmask16 first_lanes(int count) { return count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1); }
#endif

// dst[t][j] = src[j * row_stride + t] for t < steps, j < width; lanes >= width get 0 (so their dt * u is 0). dst
// has room for CHUNK steps (its entries past `steps` may be overwritten).
void load_lanes(Vec* dst, const float* src, int64_t row_stride, int width, int steps) {
#if CSM_AVX512
  // 16 x 16 tiles; masked-off elements are not read at all, so rows past `width` and steps past `steps` are safe
  for (int t = 0; t < steps; t += 16) {
    const __mmask16 cols = first_lanes(steps - t);
    __m512 r[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) r[j] = _mm512_maskz_loadu_ps(j < width ? cols : 0, src + j * row_stride + t);
    transpose16(r);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) dst[t + i] = (Vec)r[i];
  }
#else
  if (width < SIMD_W) std::fill(dst, dst + steps, Vec{});
  for (int j = 0; j < width; ++j)
    for (int t = 0; t < steps; ++t) dst[t][j] = src[j * row_stride + t];
#endif
}

// dst[j * row_stride + t] = src[t][j] for t < steps, j < width. src has CHUNK entries.
void store_lanes(float* dst, const Vec* src, int64_t row_stride, int width, int steps) {
#if CSM_AVX512
  for (int t = 0; t < steps; t += 16) {
    const __mmask16 cols = first_lanes(steps - t);
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = (__m512)src[t + i];
    transpose16(r);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) _mm512_mask_storeu_ps(dst + j * row_stride + t, j < width ? cols : 0, r[j]);
  }
#else
  for (int j = 0; j < width; ++j)
    for (int t = 0; t < steps; ++t) dst[j * row_stride + t] = src[t][j];
#endif
}

// Requests for the cache lines of the rows that the next chunk (or block) will read or write, issued in shares
// while the current one is computed. The scan touches many rows a short stretch at a time (u, delta, y and the
// gradients by SIMD_W rows, B and C by N): more streams than the hardware prefetcher follows. Lines are asked into
// L2, since the rows of a block are often a power of two apart and would evict each other from L1.
class RowPrefetcher {
 public:
  void clear() { rows_.clear(); }
  // rows[r * row_stride + t] for r < n_rows, t < steps
  void add(const float* rows, int64_t row_stride, int64_t n_rows, int steps, bool for_write) {
    for (int64_t r = 0; r < n_rows; ++r) rows_.push_back({rows + r * row_stride, steps, for_write});
  }
  // the i-th of `shares` equal shares of the rows added
  void issue(int64_t i, int64_t shares) const {
    const size_t begin = rows_.size() * i / shares, end = rows_.size() * (i + 1) / shares;
    for (size_t r = begin; r < end; ++r) {
      const uintptr_t last = reinterpret_cast<uintptr_t>(rows_[r].begin + rows_[r].steps);
      for (uintptr_t line = reinterpret_cast<uintptr_t>(rows_[r].begin) & ~uintptr_t(63); line < last; line += 64) {
        const void* p = reinterpret_cast<const void*>(line);
        if (rows_[r].for_write)
          __builtin_prefetch(p, 1, 1);
        else
          __builtin_prefetch(p, 0, 1);
        asm volatile("" : : "r"(p));  // GCC deletes loops whose only effect is prefetching: give this one another
      }
    }
  }

 private:
  struct Row {
    const float* begin;
    int steps;
    bool for_write;
  };
  std::vector<Row> rows_;
};

// A value per lane and column for a block of rows: out[n][j] = scale * rows[j * n_cols + n] (A's states, dt_proj's
// rank); 0 in unused lanes.
std::vector<Vec> load_lane_table(const float* rows, int64_t n_cols, int width, float scale) {
  std::vector<Vec> out(n_cols, Vec{});
  for (int j = 0; j < width; ++j)
    for (int64_t n = 0; n < n_cols; ++n) out[n][j] = scale * rows[j * n_cols + n];
  return out;
}

// Per-parameter lane values (D, delta_bias); 0 when absent or in unused lanes.
Vec load_param(const float* p, int width) {
  Vec out{};
  for (int j = 0; p && j < width; ++j) out[j] = p[j];
  return out;
}

// Inputs of one chunk of one block, time-major.
struct ChunkInputs {
  std::vector<Vec> u, x, dt, dtu;  // x = delta + delta_bias; dt = softplus(x) or x
  ChunkInputs() : u(CHUNK), x(CHUNK), dt(CHUNK), dtu(CHUNK) {}

  void load(const float* u_rows, const float* delta_rows, Vec bias, bool use_softplus, int64_t length, int width,
            int steps) {
    load_lanes(u.data(), u_rows, length, width, steps);
    load_lanes(x.data(), delta_rows, length, width, steps);
    derive(bias, use_softplus, steps);
  }

  // x, dt and dtu from u and delta, once u[t] and x[t] = delta[t] hold the chunk's inputs
  void derive(Vec bias, bool use_softplus, int steps) {
    for (int t = 0; t < steps; ++t) {
      x[t] += bias;
      dt[t] = use_softplus ? softplus(x[t]) : x[t];
      dtu[t] = dt[t] * u[t];
    }
  }
};

// One chunk of the recurrence for one block: h (N lane vectors) enters as the state before the chunk and leaves as
// the state after it; ybuf[t] += sum_n C[n, t] h_t[n]. State-major: one state row stays in a register while time
// runs, and y is revisited once per state. after_row(n) runs after state row n (the forward's prefetching).
template <typename AfterRow>
inline void scan_chunk(const ChunkInputs& in, const std::vector<Vec>& a2, const float* Bg, const float* Cg,
                       int64_t length, int64_t t0, int steps, std::vector<Vec>& h, std::vector<Vec>& ybuf,
                       const AfterRow& after_row) {
  const int64_t N = static_cast<int64_t>(h.size());
  for (int64_t n = 0; n < N; ++n) {
    const Vec an = a2[n];
    const float* Bn = Bg + n * length + t0;
    const float* Cn = Cg + n * length + t0;
    Vec hv = h[n];
    for (int t = 0; t < steps; ++t) {
      hv = exp2v(in.dt[t] * an) * hv + in.dtu[t] * Bn[t];
      ybuf[t] += hv * Cn[t];
    }
    h[n] = hv;
    after_row(n);
  }
}

// The backward of one chunk of one block over its state rows: every row's decays and states over the chunk are
// recomputed from the checkpoint h0 (the forward's arithmetic) into buffers that stay in L1, then walked backwards
// with the carry in a register. Rows meet only in the per-step sums over n (gdA, ghB), so G rows are walked side by
// side: each row's steps form a serial chain (state, then carry), and G independent chains keep the vector units
// busy while one waits for its previous step. With gh = dL/dh_t: dL/d(dt A) = gh a_t h_{t-1}, dL/dB = gh dt u,
// dL/dC = gy h_t, and dt gets A dL/d(dt A) + u sum_n gh B.
//   B, C: row n of the chunk at B + n * bc_stride (steps contiguous); a, a2: A and A log2(e) per row;
//   carry: a_{t+1} dL/dh_{t+1} entering from the chunk after, updated; gA: dL/dA per row, accumulated;
//   gB_acc, gC_acc: [n * CHUNK + t], accumulated; gdA, ghB: [t], accumulated; hs, dec: G * (CHUNK + 1) scratch.
template <int G>
inline void backward_rows(const ChunkInputs& in, const Vec* gy, const Vec* a, const Vec* a2, const Vec* h0,
                          const float* B, const float* C, int64_t bc_stride, int steps, int64_t n0, Vec* carry,
                          VecD* gA, Vec* gB_acc, Vec* gC_acc, Vec* gdA, Vec* ghB, Vec* hs, Vec* dec) {
  constexpr int H = CHUNK + 1;  // hs[g * H + t + 1] = h_t, hs[g * H] = the checkpoint; dec[g * H + t] = a_t
  const float* Bn[G];
  const float* Cn[G];
  Vec hv[G], cv[G], gav[G], an[G], a2n[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    Bn[g] = B + (n0 + g) * bc_stride;
    Cn[g] = C + (n0 + g) * bc_stride;
    an[g] = a[n0 + g];
    a2n[g] = a2[n0 + g];
    hv[g] = h0[n0 + g];
    hs[g * H] = hv[g];
  }
  for (int t = 0; t < steps; ++t) {
    const Vec dt = in.dt[t], dtu = in.dtu[t], gyt = gy[t];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const Vec decay = exp2v(dt * a2n[g]);
      hv[g] = decay * hv[g] + dtu * Bn[g][t];
      dec[g * H + t] = decay;
      hs[g * H + t + 1] = hv[g];
      gC_acc[(n0 + g) * CHUNK + t] += gyt * hv[g];
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    cv[g] = carry[n0 + g];
    gav[g] = Vec{};
  }
  for (int t = steps - 1; t >= 0; --t) {
    const Vec dt = in.dt[t], dtu = in.dtu[t], gyt = gy[t];
    Vec sum_dA{}, sum_hB{};
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const Vec gh = cv[g] + gyt * Cn[g][t];
      cv[g] = dec[g * H + t] * gh;  // a_t dL/dh_t: the carry into step t - 1
      const Vec glog = cv[g] * hs[g * H + t];
      sum_dA += glog * an[g];
      sum_hB += gh * Bn[g][t];
      gav[g] += glog * dt;
      gB_acc[(n0 + g) * CHUNK + t] += gh * dtu;
    }
    gdA[t] += sum_dA;
    ghB[t] += sum_hB;
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    carry[n0 + g] = cv[g];
    gA[n0 + g] += __builtin_convertvector(gav[g], VecD);
  }
}

constexpr int BACKWARD_ROWS = 4;  // state rows walked side by side (backward_rows)

// backward_rows over all n_state rows of a chunk of one block; gdA and ghB are zeroed first.
inline void backward_chunk(const ChunkInputs& in, const Vec* gy, const Vec* a, const Vec* a2, const Vec* h0,
                           const float* B, const float* C, int64_t bc_stride, int steps, int64_t n_state,
                           Vec* carry, VecD* gA, Vec* gB_acc, Vec* gC_acc, Vec* gdA, Vec* ghB, Vec* hs, Vec* dec) {
  std::fill(gdA, gdA + steps, Vec{});
  std::fill(ghB, ghB + steps, Vec{});
  int64_t n = 0;
  for (; n + BACKWARD_ROWS <= n_state; n += BACKWARD_ROWS)
    backward_rows<BACKWARD_ROWS>(in, gy, a, a2, h0, B, C, bc_stride, steps, n, carry, gA, gB_acc, gC_acc, gdA, ghB,
                                 hs, dec);
  for (; n < n_state; ++n)
    backward_rows<1>(in, gy, a, a2, h0, B, C, bc_stride, steps, n, carry, gA, gB_acc, gC_acc, gdA, ghB, hs, dec);
}

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const c10::optional<at::Tensor>& D,
                  const c10::optional<at::Tensor>& bias) {
  for (const at::Tensor* t : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(t->device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == at::kFloat, "selective_scan_cpu: tensors must be float32");
    TORCH_CHECK(t->is_contiguous(), "selective_scan_cpu: tensors must be contiguous");
  }
  for (const auto* t : {&D, &bias}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() && (*t)->numel() == u.size(1),
                  "selective_scan_cpu: D and delta_bias must be contiguous float32 of size K*D");
    }
  }
}

// Returns y (batch, K*D, L) and the chunk checkpoints (batch, K, blocks, n_chunks, N, SIMD_W): the state entering
// each chunk, in the backward's lane layout.
std::vector<at::Tensor> forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                const c10::optional<at::Tensor>& bias, bool use_softplus) {
  check_inputs(u, delta, A, B, C, D, bias);
  const Dims d = dims_of(u, A, B);
  const int64_t N = d.n_state, L = d.length;
  auto y = at::empty_like(u);
  auto checkpoints = at::empty({d.batch, d.groups, d.blocks, d.n_chunks, N, SIMD_W}, u.options());
  for (const at::Tensor* t : {&y, &checkpoints}) advise_huge_pages(*t);
  const float *up = u.data_ptr<float>(), *dp = delta.data_ptr<float>(), *Ap = A.data_ptr<float>();
  const float *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>();
  const float* Dp = D.has_value() ? D->data_ptr<float>() : nullptr;
  const float* biasp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  Vec* hp = reinterpret_cast<Vec*>(checkpoints.data_ptr<float>());

  struct Scratch {
    ChunkInputs in;
    std::vector<Vec> h, ybuf;
    RowPrefetcher prefetch;
  };
  const int64_t n_tasks = d.batch * d.groups * d.blocks;  // one block each
  const auto make_scratch = [&] { return Scratch{{}, std::vector<Vec>(N), std::vector<Vec>(CHUNK), {}}; };
  run_tasks(n_tasks, n_tasks * L * N, make_scratch, [&](int64_t task, Scratch& s) {
    const ChunkInputs& in = s.in;
    std::vector<Vec>& h = s.h;
    std::vector<Vec>& ybuf = s.ybuf;
    const Block blk(d, task / (d.groups * d.blocks), (task / d.blocks) % d.groups, task % d.blocks);
    const std::vector<Vec> a2 = load_lane_table(Ap + blk.ch0 * N, N, blk.width, LOG2E);  // decay = 2^(dt * a2)
    const Vec d_lane = load_param(Dp ? Dp + blk.ch0 : nullptr, blk.width);
    const Vec bias_lane = load_param(biasp ? biasp + blk.ch0 : nullptr, blk.width);
    const float* Bg = Bp + (blk.b * d.groups + blk.g) * N * L;
    const float* Cg = Cp + (blk.b * d.groups + blk.g) * N * L;
    const int64_t row0 = (blk.b * d.channels + blk.ch0) * L;
    Vec* ckpt = hp + task * d.n_chunks * N;
    std::fill(h.begin(), h.end(), Vec{});
    for (int64_t chunk = 0; chunk < d.n_chunks; ++chunk) {
      const int64_t t0 = chunk * CHUNK;
      const int steps = static_cast<int>(std::min<int64_t>(CHUNK, L - t0));
      std::copy(h.begin(), h.end(), ckpt + chunk * N);
      s.prefetch.clear();
      if (chunk + 1 < d.n_chunks) {
        const int next = static_cast<int>(std::min<int64_t>(CHUNK, L - t0 - CHUNK));
        for (const float* rows : {up + row0, dp + row0})
          s.prefetch.add(rows + t0 + CHUNK, L, blk.width, next, false);
        for (const float* rows : {Bg, Cg}) s.prefetch.add(rows + t0 + CHUNK, L, N, next, false);
        s.prefetch.add(yp + row0 + t0 + CHUNK, L, blk.width, next, true);
      }
      s.in.load(up + row0 + t0, dp + row0 + t0, bias_lane, use_softplus, L, blk.width, steps);
      for (int t = 0; t < steps; ++t) ybuf[t] = d_lane * in.u[t];
      // a share of the prefetches per state row: all at once would stall on full miss queues
      scan_chunk(in, a2, Bg, Cg, L, t0, steps, h, ybuf, [&](int64_t n) { s.prefetch.issue(n, N); });
      store_lanes(yp + row0 + t0, ybuf.data(), L, blk.width, steps);
    }
  });
  return {y, checkpoints};
}

std::vector<at::Tensor> backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                 const c10::optional<at::Tensor>& bias, bool use_softplus,
                                 const at::Tensor& checkpoints, const at::Tensor& gy_in) {
  check_inputs(u, delta, A, B, C, D, bias);
  const at::Tensor gy = gy_in.contiguous().to(at::kFloat);
  const Dims d = dims_of(u, A, B);
  const int64_t N = d.n_state, L = d.length;
  // A task is one part of the blocks of one group of one image. It walks time backwards chunk by chunk and, inside
  // a chunk, over its blocks, so dL/dB and dL/dC of the chunk add up over the blocks lane-wise in a local buffer
  // and are reduced over lanes once per chunk. Groups are split into parts only to give every thread several tasks
  // to balance; each part has its own dL/dB, dL/dC output (summed at the end), so no two threads write the same
  // element.
  const int64_t groups_total = std::max<int64_t>(1, d.batch * d.groups);
  const int64_t parts_wanted = (TASKS_PER_THREAD * at::get_num_threads() + groups_total - 1) / groups_total;
  const int64_t per_part = std::max<int64_t>(1, (d.blocks + parts_wanted - 1) / parts_wanted);
  const int64_t parts = std::max<int64_t>(1, (d.blocks + per_part - 1) / per_part);
  auto gu = at::empty_like(u);
  auto gdelta = at::empty_like(delta);
  auto gB_parts = at::empty({parts, d.batch, d.groups, N, L}, u.options());
  auto gC_parts = at::empty({parts, d.batch, d.groups, N, L}, u.options());
  for (const at::Tensor* t : {&gu, &gdelta, &gB_parts, &gC_parts}) advise_huge_pages(*t);
  auto opts64 = u.options().dtype(at::kDouble);
  auto gA_batch = at::empty({d.batch, d.channels, N}, opts64);  // per image, summed over images at the end
  auto gD_batch = at::empty({d.batch, d.channels}, opts64);
  auto gbias_batch = at::empty({d.batch, d.channels}, opts64);

  const float *up = u.data_ptr<float>(), *dp = delta.data_ptr<float>(), *Ap = A.data_ptr<float>();
  const float *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>(), *gyp = gy.data_ptr<float>();
  const float* Dp = D.has_value() ? D->data_ptr<float>() : nullptr;
  const float* biasp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const Vec* hp = reinterpret_cast<const Vec*>(checkpoints.data_ptr<float>());
  float *gup = gu.data_ptr<float>(), *gdp = gdelta.data_ptr<float>();
  float *gBp = gB_parts.data_ptr<float>(), *gCp = gC_parts.data_ptr<float>();
  double *gAp = gA_batch.data_ptr<double>(), *gDp = gD_batch.data_ptr<double>();
  double* gbiasp = gbias_batch.data_ptr<double>();

  struct Scratch {
    ChunkInputs in;
    std::vector<Vec> gy_t, gdA, ghB, gout;  // [t]
    std::vector<Vec> hs, decay;             // backward_chunk's scratch: BACKWARD_ROWS * (CHUNK + 1) each
    std::vector<Vec> gB_acc, gC_acc;        // [n][t], summed lane-wise over the blocks of a part
    RowPrefetcher prefetch;
  };
  const auto make_scratch = [&] {
    const std::vector<Vec> steps(CHUNK), states_steps(N * CHUNK);
    const std::vector<Vec> rows(BACKWARD_ROWS * (CHUNK + 1));
    return Scratch{{}, steps, steps, steps, steps, rows, rows, states_steps, states_steps, {}};
  };
  const int64_t n_tasks = d.batch * d.groups * parts;
  run_tasks(n_tasks, d.batch * d.groups * d.blocks * L * N, make_scratch, [&](int64_t task, Scratch& s) {
    const int64_t b = task / (d.groups * parts), g = (task / parts) % d.groups, part = task % parts;
    const int64_t blk0 = part * per_part, n_blk = std::min(d.blocks, blk0 + per_part) - blk0;
    const float* Bg = Bp + (b * d.groups + g) * N * L;
    const float* Cg = Cp + (b * d.groups + g) * N * L;
    float* gBg = gBp + ((part * d.batch + b) * d.groups + g) * N * L;
    float* gCg = gCp + ((part * d.batch + b) * d.groups + g) * N * L;
    // Per block of the part: A and A log2(e), the carry a_{t+1} dL/dh_{t+1} entering a chunk from the one after it,
    // and the parameter gradients, accumulated in double over the whole sequence.
    std::vector<Vec> a, a2;
    for (int64_t i = 0; i < n_blk; ++i) {
      const Block blk(d, b, g, blk0 + i);
      const std::vector<Vec> a_i = load_lane_table(Ap + blk.ch0 * N, N, blk.width, 1.f);
      const std::vector<Vec> a2_i = load_lane_table(Ap + blk.ch0 * N, N, blk.width, LOG2E);
      a.insert(a.end(), a_i.begin(), a_i.end());
      a2.insert(a2.end(), a2_i.begin(), a2_i.end());
    }
    std::vector<Vec> carry(n_blk * N, Vec{});
    std::vector<VecD> gA_acc(n_blk * N, VecD{}), gD_acc(n_blk, VecD{}), gbias_acc(n_blk, VecD{});

    for (int64_t chunk = d.n_chunks - 1; chunk >= 0; --chunk) {
      const int64_t t0 = chunk * CHUNK;
      const int steps = static_cast<int>(std::min<int64_t>(CHUNK, L - t0));
      std::fill(s.gB_acc.begin(), s.gB_acc.end(), Vec{});
      std::fill(s.gC_acc.begin(), s.gC_acc.end(), Vec{});
      for (int64_t i = 0; i < n_blk; ++i) {
        const Block blk(d, b, g, blk0 + i);
        const int64_t row0 = (b * d.channels + blk.ch0) * L;
        ChunkInputs& in = s.in;
        in.load(up + row0 + t0, dp + row0 + t0, load_param(biasp ? biasp + blk.ch0 : nullptr, blk.width),
                use_softplus, L, blk.width, steps);
        load_lanes(s.gy_t.data(), gyp + row0 + t0, L, blk.width, steps);
        const Vec* gy_t = s.gy_t.data();
        const Vec* h0 = hp + (((b * d.groups + g) * d.blocks + blk0 + i) * d.n_chunks + chunk) * N;

        // the rows of the next block, or of the first block of the previous chunk
        s.prefetch.clear();
        if (i + 1 < n_blk || chunk > 0) {
          const bool same_chunk = i + 1 < n_blk;
          const Block next(d, b, g, blk0 + (same_chunk ? i + 1 : 0));
          const int64_t next_t0 = same_chunk ? t0 : t0 - CHUNK;
          const int next_steps = same_chunk ? steps : CHUNK;
          const int64_t next_row0 = (b * d.channels + next.ch0) * L + next_t0;
          for (const float* rows : {up + next_row0, dp + next_row0, gyp + next_row0})
            s.prefetch.add(rows, L, next.width, next_steps, false);
          for (const float* rows : {gup + next_row0, gdp + next_row0})
            s.prefetch.add(rows, L, next.width, next_steps, true);
          if (!same_chunk)
            for (const float* rows : {Bg + next_t0, Cg + next_t0}) s.prefetch.add(rows, L, N, next_steps, false);
        }

        s.prefetch.issue(0, 1);  // all at once: the first rows are needed as soon as this block is done

        Vec *gdA = s.gdA.data(), *ghB = s.ghB.data();
        backward_chunk(in, gy_t, a.data() + i * N, a2.data() + i * N, h0, Bg + t0, Cg + t0, L, steps, N,
                       carry.data() + i * N, gA_acc.data() + i * N, s.gB_acc.data(), s.gC_acc.data(), gdA, ghB,
                       s.hs.data(), s.decay.data());

        // Per-step gradients: u and dt, then delta through the softplus; D and delta_bias sum them over time.
        const Vec d_lane = load_param(Dp ? Dp + blk.ch0 : nullptr, blk.width);
        Vec* gout = s.gout.data();
        for (int t = 0; t < steps; ++t) gout[t] = ghB[t] * in.dt[t] + d_lane * gy_t[t];
        store_lanes(gup + row0 + t0, gout, L, blk.width, steps);
        for (int t = 0; t < steps; ++t) {
          Vec gdt = gdA[t] + ghB[t] * in.u[t];
          if (use_softplus) gdt *= sigmoid(in.x[t]);
          gout[t] = gdt;
          gD_acc[i] += __builtin_convertvector(gy_t[t], VecD) * __builtin_convertvector(in.u[t], VecD);
          gbias_acc[i] += __builtin_convertvector(gdt, VecD);
        }
        store_lanes(gdp + row0 + t0, gout, L, blk.width, steps);
      }
      // dL/dB and dL/dC of the chunk: sum the lanes once for all blocks of the part.
      for (int64_t n = 0; n < N; ++n) {
        for (int t = 0; t < steps; ++t) {
          float sb = 0.f, sc = 0.f;
          for (int j = 0; j < SIMD_W; ++j) {
            sb += s.gB_acc[n * CHUNK + t][j];
            sc += s.gC_acc[n * CHUNK + t][j];
          }
          gBg[n * L + t0 + t] = sb;
          gCg[n * L + t0 + t] = sc;
        }
      }
    }
    for (int64_t i = 0; i < n_blk; ++i) {
      const Block blk(d, b, g, blk0 + i);
      for (int j = 0; j < blk.width; ++j) {
        const int64_t ch = b * d.channels + blk.ch0 + j;
        for (int64_t n = 0; n < N; ++n) gAp[ch * N + n] = gA_acc[i * N + n][j];
        gDp[ch] = gD_acc[i][j];
        gbiasp[ch] = gbias_acc[i][j];
      }
    }
  });
  auto gA = gA_batch.sum(0).to(at::kFloat);
  auto gD = gD_batch.sum(0).to(at::kFloat);
  auto gbias = gbias_batch.sum(0).to(at::kFloat);
  auto gB = parts == 1 ? gB_parts[0] : gB_parts.sum(0);
  auto gC = parts == 1 ? gC_parts[0] : gC_parts.sum(0);
  return {gu, gdelta, gA, gB, gC, gD, gbias};
}

// Pixel index of step t of scan direction k over an H x W map (L = H * W): k = 0 row-major, 1 column-major,
// 2 and 3 the same reversed (VMamba's cross-scan order).
inline int64_t pixel_of(int64_t k, int64_t t, int64_t height, int64_t width, int64_t length) {
  if (k >= 2) t = length - 1 - t;
  if (k % 2 == 0) return t;
  return (t % height) * width + t / height;  // t = w * H + h
}

// One chunk of the recurrence for one block, time-major: the states stay in registers (NN of them; NN = 0: n_state
// states kept in h) and a step's y is summed in a register, y = ybuf[t] + h_0 C_0 + h_1 C_1 + ... B and C are the
// chunk's packed rows, [n * CHUNK + t]. h enters as the state before the chunk and leaves as the state after it.
template <int NN>
inline void scan_chunk_packed(const ChunkInputs& in, const Vec* a2, const float* Bk, const float* Ck, int steps,
                              int n_state, Vec* h, Vec* ybuf) {
  Vec regs[NN > 0 ? NN : 1];
  Vec* hs = NN > 0 ? regs : h;
  if (NN > 0) {
    n_state = NN;
    for (int n = 0; n < NN; ++n) regs[n] = h[n];
  }
  for (int t = 0; t < steps; ++t) {
    const Vec dt = in.dt[t], dtu = in.dtu[t];
    Vec y = ybuf[t];
#pragma GCC unroll 16
    for (int n = 0; n < n_state; ++n) {
      hs[n] = exp2v(dt * a2[n]) * hs[n] + dtu * Bk[n * CHUNK + t];
      y += hs[n] * Ck[n * CHUNK + t];
    }
    ybuf[t] = y;
  }
  if (NN > 0)
    for (int n = 0; n < NN; ++n) h[n] = regs[n];
}

// The 2-D selective scan of SS2D without the cross-scan and cross-merge copies: its shapes and the pixel rows of a
// chunk of one direction.
//   x      (batch, L, Dn)            the map, channels last, pixels row-major (L = H * W): u of every direction
//   x_dbl  (batch, L, K * (R + 2N))  x_proj of every pixel, pixel-major: for direction k, (dt_r, B, C) at
//                                    columns k * (R + 2N) + [0, R), [R, R + N), [R + N, R + 2N)
//   dt_w   (K, Dn, R)                dt_proj weights: delta[k, d, t] = sum_r dt_w[k, d, r] * dt_r[k, r, t]
//   A      (K*Dn, N); D, bias (K*Dn)
struct Ss2dDims {
  int64_t batch, L, Dn, K, R, N, row_len, blocks, n_chunks, height, width;

  Ss2dDims(const char* name, const at::Tensor& x, const at::Tensor& x_dbl, const at::Tensor& dt_w,
           const at::Tensor& A, const at::Tensor& D, const at::Tensor& bias, int64_t height_, int64_t width_) {
    for (const at::Tensor* t : {&x, &x_dbl, &dt_w, &A, &D, &bias}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(), name,
                  ": tensors must be contiguous float32 on the CPU");
    }
    TORCH_CHECK(x.dim() == 3 && x_dbl.dim() == 3 && dt_w.dim() == 3 && A.dim() == 2, name, ": wrong ranks");
    batch = x.size(0), L = x.size(1), Dn = x.size(2);
    K = dt_w.size(0), R = dt_w.size(2), N = A.size(1), row_len = K * (R + 2 * N);
    height = height_, width = width_;
    TORCH_CHECK(height * width == L, name, ": height * width must equal L");
    TORCH_CHECK(K >= 1 && K <= 4 && dt_w.size(1) == Dn && A.size(0) == K * Dn && D.numel() == K * Dn &&
                    bias.numel() == K * Dn && x_dbl.size(0) == batch && x_dbl.size(1) == L &&
                    x_dbl.size(2) == row_len,
                name, ": inconsistent shapes");
    blocks = (Dn + SIMD_W - 1) / SIMD_W;
    n_chunks = (L + CHUNK - 1) / CHUNK;
  }

  // The chunk checkpoints of the forward: (batch, K, blocks, n_chunks, N, SIMD_W), the state entering each chunk.
  std::vector<int64_t> checkpoint_shape() const { return {batch, K, blocks, n_chunks, N, SIMD_W}; }
  int64_t checkpoint_index(int64_t b, int64_t k, int64_t blk, int64_t chunk) const {
    return (((b * K + k) * blocks + blk) * n_chunks + chunk) * N;
  }
};

// The rows of one chunk of direction k, packed time-contiguous: pix[t] the pixel of step t0 + t, dtr[r * CHUNK + t],
// Bk[n * CHUNK + t], Ck[n * CHUNK + t] from x_dbl's row of that pixel (xdk: image b's x_dbl at direction k's columns).
void gather_chunk(const Ss2dDims& d, const float* xdk, int64_t k, int64_t t0, int steps, int64_t* pix, float* dtr,
                  float* Bk, float* Ck) {
  const int64_t R = d.R, N = d.N;
  for (int t = 0; t < steps; ++t) {
    const int64_t p = pix[t] = pixel_of(k, t0 + t, d.height, d.width, d.L);
    const float* row = xdk + p * d.row_len;
    for (int64_t r = 0; r < R; ++r) dtr[r * CHUNK + t] = row[r];
    for (int64_t n = 0; n < N; ++n) {
      Bk[n * CHUNK + t] = row[R + n];
      Ck[n * CHUNK + t] = row[R + N + n];
    }
  }
}

// One block's parameters in one direction: decays as 2^(dt * a2) (a = A itself for the backward), dt_proj's
// weights per rank, D and delta_bias; 0 in unused lanes.
struct BlockParams {
  std::vector<Vec> a, a2, w;
  Vec d, bias;

  BlockParams() = default;
  BlockParams(const Ss2dDims& dims, const float* Ap, const float* wp, const float* Dp, const float* biasp, int64_t k,
              int64_t c) {
    const int64_t kc = k * dims.Dn + c;
    const int width = static_cast<int>(std::min<int64_t>(SIMD_W, dims.Dn - c));
    a = load_lane_table(Ap + kc * dims.N, dims.N, width, 1.f);
    a2 = load_lane_table(Ap + kc * dims.N, dims.N, width, LOG2E);
    w = load_lane_table(wp + kc * dims.R, dims.R, width, 1.f);
    d = load_param(Dp + kc, width);
    bias = load_param(biasp + kc, width);
  }

  // delta of step t from the chunk's packed dt_r (the low-rank dt_proj)
  Vec delta(const float* dtr, int t) const {
    Vec out{};
    for (size_t r = 0; r < w.size(); ++r) out += w[r] * dtr[r * CHUNK + t];
    return out;
  }
};

// `lanes` floats of src into a vector, 0 past them (the last block of a width that is not a multiple of SIMD_W)
inline Vec load_partial(const float* src, int lanes) {
  Vec v{};
  std::memcpy(&v, src, lanes * sizeof(float));
  return v;
}

inline float lane_sum(Vec v) {
#if CSM_AVX512
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.f;
  for (int j = 0; j < SIMD_W; ++j) s += v[j];
  return s;
#endif
}

// The whole 2-D selective scan of SS2D (shapes: Ss2dDims). Returns {y, checkpoints}: y (batch, L, Dn) is the sum
// over directions of each direction's y, put back at its pixels (cross-merge); with save_states, checkpoints holds
// the state entering every chunk (Ss2dDims::checkpoint_shape) for ss2d_backward, else it is empty.
//
// A task is one image and a group of `group` blocks of SIMD_W channels (adjacent in memory at every pixel); it runs
// the K directions one after the other, chunk by chunk: the chunk's pixels are gathered once for the group (u of
// all its blocks, and dt_r, B, C packed time-contiguous, so that they stay in cache while every block of the group
// scans them), the blocks scan, and the group's y is written at the chunk's pixels (direction 0) or added to them.
// Every output element is computed by the same operations in the same order whatever the group size and the number
// of threads, so decoding is bit-identical across thread counts.
std::vector<at::Tensor> ss2d_forward(const at::Tensor& x, const at::Tensor& x_dbl, const at::Tensor& dt_w,
                                     const at::Tensor& A, const at::Tensor& D, const at::Tensor& bias,
                                     bool use_softplus, int64_t height, int64_t width, bool save_states) {
  const Ss2dDims d("ss2d_forward", x, x_dbl, dt_w, A, D, bias, height, width);
  const int64_t batch = d.batch, L = d.L, Dn = d.Dn, K = d.K, N = d.N, blocks = d.blocks;
  auto out = at::empty_like(x);
  auto checkpoints = save_states ? at::empty(d.checkpoint_shape(), x.options()) : at::empty({0}, x.options());
  if (out.numel() == 0) return {out, checkpoints};
  const float *xp = x.data_ptr<float>(), *xd = x_dbl.data_ptr<float>(), *wp = dt_w.data_ptr<float>();
  const float *Ap = A.data_ptr<float>(), *Dp = D.data_ptr<float>(), *biasp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  Vec* ckp = save_states ? reinterpret_cast<Vec*>(checkpoints.data_ptr<float>()) : nullptr;
  // Blocks per task: as few tasks as keep every thread busy (each task reads the chunk's rows once), at most 8
  // blocks (the group's u and y of a chunk, 64 KB, stay in L2).
  const int64_t threads_per_image = (at::get_num_threads() + batch - 1) / batch;
  const int64_t group = std::clamp<int64_t>((blocks + threads_per_image - 1) / threads_per_image, 1, 8);
  const int64_t groups = (blocks + group - 1) / group;

  struct Scratch {
    ChunkInputs in;
    std::vector<Vec> h, ybuf, u, y;  // h: group * N states; u, y: [t * group + i] for block i of the group
    std::vector<float> dtr, Bk, Ck;  // the chunk's dt_r, B, C of the direction: [row * CHUNK + t]
    std::vector<int64_t> pix;
  };
  const auto make_scratch = [&] {
    return Scratch{{},
                   std::vector<Vec>(group * N),
                   std::vector<Vec>(CHUNK),
                   std::vector<Vec>(CHUNK * group),
                   std::vector<Vec>(CHUNK * group),
                   std::vector<float>(d.R * CHUNK),
                   std::vector<float>(N * CHUNK),
                   std::vector<float>(N * CHUNK),
                   std::vector<int64_t>(CHUNK)};
  };
  run_tasks(batch * groups, batch * blocks * K * L * N, make_scratch, [&](int64_t task, Scratch& s) {
    const int64_t b = task / groups, blk0 = (task % groups) * group;
    const int64_t n_blk = std::min(blocks, blk0 + group) - blk0, ch0 = blk0 * SIMD_W;
    const int64_t lanes = std::min(n_blk * SIMD_W, Dn - ch0);  // the group's channels at one pixel
    const float* xb = xp + b * L * Dn + ch0;
    float* ob = op + b * L * Dn + ch0;
    ChunkInputs& in = s.in;
    std::vector<BlockParams> params(n_blk);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < n_blk; ++i) params[i] = BlockParams(d, Ap, wp, Dp, biasp, k, ch0 + i * SIMD_W);
      const float* xdk = xd + b * L * d.row_len + k * (d.R + 2 * N);
      std::fill(s.h.begin(), s.h.end(), Vec{});
      for (int64_t chunk = 0; chunk < d.n_chunks; ++chunk) {
        const int64_t t0 = chunk * CHUNK;
        const int steps = static_cast<int>(std::min<int64_t>(CHUNK, L - t0));
        gather_chunk(d, xdk, k, t0, steps, s.pix.data(), s.dtr.data(), s.Bk.data(), s.Ck.data());
        for (int t = 0; t < steps; ++t) {
          Vec* u = s.u.data() + t * group;
          if (lanes < n_blk * SIMD_W) u[n_blk - 1] = Vec{};  // zero lanes past the last channel
          std::memcpy(u, xb + s.pix[t] * Dn, lanes * sizeof(float));
        }
        for (int64_t i = 0; i < n_blk; ++i) {
          const BlockParams& prm = params[i];
          for (int t = 0; t < steps; ++t) {
            const Vec u = s.u[t * group + i];
            in.u[t] = u;
            in.x[t] = prm.delta(s.dtr.data(), t);
            s.ybuf[t] = prm.d * u;
          }
          in.derive(prm.bias, use_softplus, steps);
          Vec* h = s.h.data() + i * N;
          if (ckp) std::copy(h, h + N, ckp + d.checkpoint_index(b, k, blk0 + i, chunk));
          if (N == 16)
            scan_chunk_packed<16>(in, prm.a2.data(), s.Bk.data(), s.Ck.data(), steps, 16, h, s.ybuf.data());
          else
            scan_chunk_packed<0>(in, prm.a2.data(), s.Bk.data(), s.Ck.data(), steps, N, h, s.ybuf.data());
          for (int t = 0; t < steps; ++t) s.y[t * group + i] = s.ybuf[t];
        }
        for (int t = 0; t < steps; ++t) {
          float* dst = ob + s.pix[t] * Dn;
          const float* y = reinterpret_cast<const float*>(s.y.data() + t * group);
          if (k == 0)
            std::memcpy(dst, y, lanes * sizeof(float));
          else
            for (int64_t j = 0; j < lanes; ++j) dst[j] += y[j];
        }
      }
    }
  });
  return {out, checkpoints};
}

// The gradients of ss2d_forward (with save_states) for the output gradient gy (batch, L, Dn). Returns
// {gx (batch, L, Dn), gx_dbl (batch, L, K * (R + 2N)), gdt_w (K, Dn, R), gA (K*Dn, N), gD, gbias (K*Dn)}.
//
// A task is one image and one direction with all its channel blocks; it walks the chunks backwards and, inside a
// chunk, the blocks: every block recomputes its states from the forward's checkpoint one state row at a time and
// walks them back (as `backward`), and the blocks' gradients of the chunk's dt_r, B and C add up lane-wise in
// local buffers that are reduced over the lanes once per chunk and stored in that direction's columns of gx_dbl
// at the chunk's pixels. So every element of gx_dbl is written by one task, once. The gradient of u goes to a
// per-direction copy of gx (summed over directions at the end) and the parameter gradients to per-image, per-
// direction double accumulators (summed over images).
std::vector<at::Tensor> ss2d_backward(const at::Tensor& x, const at::Tensor& x_dbl, const at::Tensor& dt_w,
                                      const at::Tensor& A, const at::Tensor& D, const at::Tensor& bias,
                                      bool use_softplus, int64_t height, int64_t width,
                                      const at::Tensor& checkpoints, const at::Tensor& gy_in) {
  const Ss2dDims d("ss2d_backward", x, x_dbl, dt_w, A, D, bias, height, width);
  const at::Tensor gy = gy_in.contiguous().to(at::kFloat);
  TORCH_CHECK(gy.sizes() == x.sizes(), "ss2d_backward: the output gradient must have x's shape");
  TORCH_CHECK(checkpoints.is_contiguous() && checkpoints.sizes() == at::IntArrayRef(d.checkpoint_shape()),
              "ss2d_backward: checkpoints of another shape than the forward's");
  const int64_t batch = d.batch, L = d.L, Dn = d.Dn, K = d.K, R = d.R, N = d.N, blocks = d.blocks;
  auto gx_dirs = at::empty({K, batch, L, Dn}, x.options());
  auto gx_dbl = at::empty_like(x_dbl);
  auto opts64 = x.options().dtype(at::kDouble);
  auto gw_parts = at::zeros({batch, K, Dn, R}, opts64);
  auto gA_parts = at::zeros({batch, K * Dn, N}, opts64);
  auto gD_parts = at::zeros({batch, K * Dn}, opts64);
  auto gbias_parts = at::zeros({batch, K * Dn}, opts64);
  for (const at::Tensor* t : {&gx_dirs, &gx_dbl}) advise_huge_pages(*t);
  if (x.numel() == 0) {
    return {gx_dirs.sum(0), gx_dbl.zero_(), gw_parts.sum(0).to(at::kFloat), gA_parts.sum(0).to(at::kFloat),
            gD_parts.sum(0).to(at::kFloat), gbias_parts.sum(0).to(at::kFloat)};
  }
  const float *xp = x.data_ptr<float>(), *xd = x_dbl.data_ptr<float>(), *wp = dt_w.data_ptr<float>();
  const float *Ap = A.data_ptr<float>(), *Dp = D.data_ptr<float>(), *biasp = bias.data_ptr<float>();
  const float* gyp = gy.data_ptr<float>();
  const Vec* ckp = reinterpret_cast<const Vec*>(checkpoints.data_ptr<float>());
  float *gxp = gx_dirs.data_ptr<float>(), *gxdp = gx_dbl.data_ptr<float>();
  double *gwp = gw_parts.data_ptr<double>(), *gAp = gA_parts.data_ptr<double>();
  double *gDp = gD_parts.data_ptr<double>(), *gbiasp = gbias_parts.data_ptr<double>();

  struct Scratch {
    ChunkInputs in;
    std::vector<Vec> gy_t, gdA, ghB, gdt;     // [t]
    std::vector<Vec> hs, decay;               // backward_chunk's scratch: BACKWARD_ROWS * (CHUNK + 1) each
    std::vector<Vec> gB_acc, gC_acc, gr_acc;  // [n or r][t], summed lane-wise over the blocks
    std::vector<float> dtr, Bk, Ck;           // the chunk's packed rows, as in the forward
    std::vector<int64_t> pix;
  };
  const auto make_scratch = [&] {
    const std::vector<Vec> steps(CHUNK);
    const std::vector<Vec> rows(BACKWARD_ROWS * (CHUNK + 1));
    return Scratch{{}, steps, steps, steps, steps, rows, rows,
                   std::vector<Vec>(N * CHUNK), std::vector<Vec>(N * CHUNK), std::vector<Vec>(R * CHUNK),
                   std::vector<float>(R * CHUNK), std::vector<float>(N * CHUNK), std::vector<float>(N * CHUNK),
                   std::vector<int64_t>(CHUNK)};
  };
  run_tasks(batch * K, batch * blocks * K * L * N, make_scratch, [&](int64_t task, Scratch& s) {
    const int64_t b = task / K, k = task % K;
    const float* xb = xp + b * L * Dn;
    const float* gyb = gyp + b * L * Dn;
    float* gxb = gxp + (k * batch + b) * L * Dn;
    const float* xdk = xd + b * L * d.row_len + k * (R + 2 * N);
    float* gxdk = gxdp + b * L * d.row_len + k * (R + 2 * N);
    std::vector<BlockParams> params(blocks);
    for (int64_t i = 0; i < blocks; ++i) params[i] = BlockParams(d, Ap, wp, Dp, biasp, k, i * SIMD_W);
    // Per block: the carry a_{t+1} dL/dh_{t+1} entering a chunk from the one after it, and the parameter
    // gradients, accumulated in double over the whole sequence.
    std::vector<Vec> carry(blocks * N, Vec{});
    std::vector<VecD> gA_acc(blocks * N, VecD{}), gw_acc(blocks * R, VecD{}), gD_acc(blocks, VecD{}),
        gbias_acc(blocks, VecD{});
    std::vector<Vec> gw_chunk(R);
    ChunkInputs& in = s.in;
    for (int64_t chunk = d.n_chunks - 1; chunk >= 0; --chunk) {
      const int64_t t0 = chunk * CHUNK;
      const int steps = static_cast<int>(std::min<int64_t>(CHUNK, L - t0));
      gather_chunk(d, xdk, k, t0, steps, s.pix.data(), s.dtr.data(), s.Bk.data(), s.Ck.data());
      std::fill(s.gB_acc.begin(), s.gB_acc.end(), Vec{});
      std::fill(s.gC_acc.begin(), s.gC_acc.end(), Vec{});
      std::fill(s.gr_acc.begin(), s.gr_acc.end(), Vec{});
      for (int64_t i = 0; i < blocks; ++i) {
        const BlockParams& prm = params[i];
        const int64_t c = i * SIMD_W;
        const int lanes = static_cast<int>(std::min<int64_t>(SIMD_W, Dn - c));
        for (int t = 0; t < steps; ++t) {
          const int64_t p = s.pix[t] * Dn + c;
          in.u[t] = load_partial(xb + p, lanes);
          s.gy_t[t] = load_partial(gyb + p, lanes);
          in.x[t] = prm.delta(s.dtr.data(), t);
        }
        in.derive(prm.bias, use_softplus, steps);
        const Vec* gy_t = s.gy_t.data();
        const Vec* h0 = ckp + d.checkpoint_index(b, k, i, chunk);

        Vec *gdA = s.gdA.data(), *ghB = s.ghB.data();
        backward_chunk(in, gy_t, prm.a.data(), prm.a2.data(), h0, s.Bk.data(), s.Ck.data(), CHUNK, steps, N,
                       carry.data() + i * N, gA_acc.data() + i * N, s.gB_acc.data(), s.gC_acc.data(), gdA, ghB,
                       s.hs.data(), s.decay.data());

        // Per-step gradients: u (to this direction's gx at the step's pixel) and dt, then delta through the
        // softplus, then dt_proj's input dt_r and weights; D and delta_bias sum over time.
        Vec* gdt = s.gdt.data();
        std::fill(gw_chunk.begin(), gw_chunk.end(), Vec{});
        Vec gD_chunk{}, gbias_chunk{};
        for (int t = 0; t < steps; ++t) {
          const Vec gu = ghB[t] * in.dt[t] + prm.d * gy_t[t];
          std::memcpy(gxb + s.pix[t] * Dn + c, &gu, lanes * sizeof(float));
          Vec g = gdA[t] + ghB[t] * in.u[t];
          if (use_softplus) g *= sigmoid(in.x[t]);
          gdt[t] = g;
          gD_chunk += gy_t[t] * in.u[t];
          gbias_chunk += g;
          for (int64_t r = 0; r < R; ++r) {
            s.gr_acc[r * CHUNK + t] += prm.w[r] * g;
            gw_chunk[r] += g * s.dtr[r * CHUNK + t];
          }
        }
        for (int64_t r = 0; r < R; ++r) gw_acc[i * R + r] += __builtin_convertvector(gw_chunk[r], VecD);
        gD_acc[i] += __builtin_convertvector(gD_chunk, VecD);
        gbias_acc[i] += __builtin_convertvector(gbias_chunk, VecD);
      }
      // The chunk's dL/d(dt_r, B, C): sum the lanes once for all blocks, into the pixels' rows of gx_dbl.
      for (int t = 0; t < steps; ++t) {
        float* row = gxdk + s.pix[t] * d.row_len;
        for (int64_t r = 0; r < R; ++r) row[r] = lane_sum(s.gr_acc[r * CHUNK + t]);
        for (int64_t n = 0; n < N; ++n) {
          row[R + n] = lane_sum(s.gB_acc[n * CHUNK + t]);
          row[R + N + n] = lane_sum(s.gC_acc[n * CHUNK + t]);
        }
      }
    }
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t c = i * SIMD_W;
      const int lanes = static_cast<int>(std::min<int64_t>(SIMD_W, Dn - c));
      for (int j = 0; j < lanes; ++j) {
        const int64_t kc = k * Dn + c + j;
        for (int64_t n = 0; n < N; ++n) gAp[(b * K * Dn + kc) * N + n] = gA_acc[i * N + n][j];
        for (int64_t r = 0; r < R; ++r) gwp[(b * K * Dn + kc) * R + r] = gw_acc[i * R + r][j];
        gDp[b * K * Dn + kc] = gD_acc[i][j];
        gbiasp[b * K * Dn + kc] = gbias_acc[i][j];
      }
    }
  });
  auto gx = K == 1 ? gx_dirs[0] : gx_dirs.sum(0);
  return {gx, gx_dbl, gw_parts.sum(0).to(at::kFloat), gA_parts.sum(0).to(at::kFloat), gD_parts.sum(0).to(at::kFloat),
          gbias_parts.sum(0).to(at::kFloat)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward: (y, checkpoints)");
  m.def("backward", &backward, "selective scan backward: (gu, gdelta, gA, gB, gC, gD, gdelta_bias)");
  m.def("ss2d_forward", &ss2d_forward,
        "SS2D's 2-D selective scan, cross-scan and merge included: (y, checkpoints if save_states)");
  m.def("ss2d_backward", &ss2d_backward, "gradients of ss2d_forward: (gx, gx_dbl, gdt_w, gA, gD, gdelta_bias)");
  m.attr("chunk") = CHUNK;
}
