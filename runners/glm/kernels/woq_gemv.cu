// Batch-1 GEMV kernels for the packed int8 / int4 weights of woq.py (`quant_kernel: cuda`).
//
// Compiled at run time by NVRTC (torch.cuda._compile_kernel, see woq_cuda.py), once per variant.
// The launcher defines, per variant:
//   ROWS    output rows per warp (they share the activation loads and conversions)
//   WARPS   warps per block
//   UNROLL  16-byte weight chunks per lane and row requested before any is used
//   KSPLIT  warps of a block that share the same rows, each taking every KSPLIT-th run of K
//   NORM    1: fuse an rmsnorm of the input (see Fusion); a compile-time switch, as a run-time
//           one costs registers (and so occupancy) in every call
//   GATED   1: the weight's rows are interleaved gate/up pairs of a SwiGLU MLP and the output is
//           silu(gate) * up per pair, N / 2 values (ROWS even, so a pair stays in one warp)
//   X_FP16  1 for float16 activations, 0 for bfloat16
//
// Why hand-written: at batch 1 decode streams every weight byte once, so the kernel's job is to
// keep enough bytes in flight. Each lane issues UNROLL * ROWS 16-byte streaming loads up front
// (no L1 allocation, 256-byte L2 prefetch); the Triton GEMV could keep only one tile per thread
// in flight and stayed at 2.1-3.2 TB/s (benchmarks/NOTES-issue3.md).
//
// Programmatic dependent launch (sm_90+, used when woq_cuda captures a CUDA graph): the kernel
// may start while the previous one finishes. Only weights (constants of the graph) are read
// before `griddepcontrol.wait`; activations and residual after it, and so is every store.
// Activations are read with coherent loads (`load_coherent`), never `.nc` / __ldg: the
// non-coherent path promises data unchanged for the whole kernel, which lets ptxas hoist such a
// load above the wait. Without the launch attribute both instructions do nothing.
//
// Small integers become floats without the int-to-float instruction: placed in the mantissa of a
// float constant (2^23 for int8, 256 for int4 nibbles), then the constant is taken out.

typedef unsigned int u32;
typedef unsigned short u16;

// Volatile: volatile asm statements keep their order, so this load stays after the wait.
__device__ __forceinline__ uint4 load_coherent(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ u16 load_coherent(const u16* p) {
  u16 v;
  asm volatile("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// Two packed 16-bit activations -> floats.
__device__ __forceinline__ void unpack2(u32 v, float& lo, float& hi) {
#if X_FP16
  asm("{.reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}"
      : "=f"(lo), "=f"(hi)
      : "r"(v));
#else
  lo = __uint_as_float(v << 16);
  hi = __uint_as_float(v & 0xffff0000u);
#endif
}

// Eight activations (one uint4) -> floats.
__device__ __forceinline__ void unpack8(uint4 v, float* out) {
  unpack2(v.x, out[0], out[1]);
  unpack2(v.y, out[2], out[3]);
  unpack2(v.z, out[4], out[5]);
  unpack2(v.w, out[6], out[7]);
}

__device__ __forceinline__ u16 to_activation(float f) {
  u16 h;
#if X_FP16
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}

__device__ __forceinline__ float activation_to_float(u16 h) {
  float lo, hi;
  unpack2((u32)h, lo, hi);
  return lo;
}

__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream be scheduled once every block of this one has started, so
// its weight loads overlap this kernel's last wave (it still waits for this one to finish).
__device__ __forceinline__ void allow_next_kernel() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// int8 byte `b` of `biased` (already XOR 0x80: q + 128 as an unsigned byte) -> 2^23 + q + 128.
__device__ __forceinline__ float biased_byte(u32 biased, int b) {
  return __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440 + b));
}

// Where a warp works: ROWS consecutive output rows, and slice `slice` of KSPLIT of their chunks.
// Warps of one block that share rows (KSPLIT > 1) interleave over K in 32-chunk runs (512 bytes
// of each row per run), so every run is one coalesced request per row.
struct WarpWork {
  int lane, slice, row0;
};

__device__ __forceinline__ WarpWork warp_work() {
  const int warp = threadIdx.x >> 5;
  return {(int)(threadIdx.x & 31), warp % KSPLIT, (int)(blockIdx.x * (WARPS / KSPLIT) + warp / KSPLIT) * ROWS};
}

static_assert(!GATED || ROWS % 2 == 0, "a gate/up pair must stay in one warp");

constexpr int kStride = 32 * KSPLIT;      // between one lane's consecutive chunks
constexpr int kStep = kStride * UNROLL;   // chunks a warp covers per loop trip

// Request UNROLL chunks of each row (the ones at `base + kStride * u`), zero past the end.
__device__ __forceinline__ void load_chunks(uint4 (&wv)[UNROLL][ROWS], const uint4* const (&rows)[ROWS], int base,
                                            int chunks) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = base + kStride * u;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      wv[u][r] = c < chunks ? load_streaming(rows[r] + c) : make_uint4(0, 0, 0, 0);
  }
}

// Sum each of N per-lane partials over the warp and, with KSPLIT > 1, over the block's slices;
// returns true in the warps that hold the totals afterwards (slice 0; every lane has them).
template <int N>
__device__ __forceinline__ bool reduce_partials(float (&vals)[N], const WarpWork& at) {
#pragma unroll
  for (int i = 0; i < N; ++i) vals[i] = warp_sum(vals[i]);
#if KSPLIT > 1
  __shared__ float partial[WARPS][N];
  const int warp = threadIdx.x >> 5;
  if (at.lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) partial[warp][i] = vals[i];
  }
  __syncthreads();
  if (at.slice != 0) return false;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float total = 0.f;
#pragma unroll
    for (int s = 0; s < KSPLIT; ++s) total += partial[warp + s][i];
    vals[i] = total;
  }
#endif
  return true;
}

// Optional fusions around the GEMV:
// - rmsnorm prologue (NORM 1): the input is rmsnorm(x) * norm. The norm weight multiplies each
//   activation as it is loaded; the 1 / rms factor is a scalar per input row, so it multiplies
//   the finished dot product, with sum(x^2) gathered from the same loads.
// - residual epilogue (`residual` not null): the output is residual + W x.
// - SwiGLU epilogue (GATED 1): see store_rows. In the epilogue, not as a prologue of the down
//   projection: there every warp would recompute silu for all K inputs (measured 1.1 ms per
//   step at glm-4-9b shape), here it is once per output pair.
struct Fusion {
  const uint4* norm;  // [K] in the activation dtype (read only with NORM 1)
  float eps;
  const u16* residual;  // [N] in the activation dtype, or null
};

// Eight activations starting at uint4 `i` of x: norm-weighted when fusing, squares summed.
__device__ __forceinline__ void load_activations(const uint4* x, int i, const Fusion& f, float* out,
                                                 float& sum_sq) {
  unpack8(load_coherent(x + i), out);
#if NORM
  float g[8];
  unpack8(__ldg(f.norm + i), g);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    sum_sq = fmaf(out[j], out[j], sum_sq);
    out[j] *= g[j];
  }
#endif
}

// The warp's outputs from its finished rows: `dots[r]` is row row0 + r's dot product with its
// weight scale applied; lane r writes row r (every lane holds every total after the reduction).
// GATED: rows 2j, 2j + 1 are gate_j, up_j, and lane r (even) writes silu(gate) * up at r / 2.
__device__ __forceinline__ void store_rows(u16* y, int row0, int n, const float (&dots)[ROWS + 1], float inv_rms,
                                           const Fusion& f, int lane) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (lane != r || row0 + r >= n) continue;
#if GATED
    if (r & 1) continue;
    const float gate = dots[r] * inv_rms, up = dots[r + 1] * inv_rms;
    y[(row0 + r) >> 1] = to_activation(gate / (1.f + __expf(-gate)) * up);
#else
    float out = dots[r] * inv_rms;
    if (f.residual != nullptr) out += activation_to_float(load_coherent(f.residual + row0 + r));
    y[row0 + r] = to_activation(out);
#endif
  }
}

// One loop over a warp's chunks: `compute(wv, base)` consumes the chunks `load_chunks` requested.
// (Requesting the next trip's chunks before computing this trip's never won the timing on the
// H200: twice the registers, fewer warps.)
template <typename Compute>
__device__ __forceinline__ void stream_chunks(const uint4* const (&rows)[ROWS], int first, int chunks,
                                              Compute compute) {
  uint4 wv[UNROLL][ROWS];
  load_chunks(wv, rows, first, chunks);
  // The first weights are on their way; x may now be read. In a branch of its own: ptxas
  // otherwise schedules the wait above the weight loads (they are .nc, so it may), and the
  // launch would overlap nothing but its own start-up.
  if (first < chunks) wait_for_previous_kernel();
  else wait_for_previous_kernel();
  for (int base = first; base < chunks; base += kStep) {
    compute(wv, base);
    load_chunks(wv, rows, base + kStep, chunks);
  }
}

// y[n] = scale[n] * sum_k w[n, k] * x[k]; w int8 [N, K] row-major, K % 16 == 0.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
int8_gemv(const uint4* x, const uint4* __restrict__ w, const float* __restrict__ scale,
          u16* __restrict__ y, int n, int k, const uint4* norm, double eps, const u16* residual,
          int add_residual) {
  allow_next_kernel();
  const Fusion fusion{norm, (float)eps, add_residual ? residual : nullptr};
  const WarpWork at = warp_work();
  const int chunks = k >> 4;  // 16 int8 weights per uint4; their activations are two uint4
  const uint4* rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) rows[r] = w + (size_t)min(at.row0 + r, n - 1) * chunks;  // past N: re-read, not stored
  float acc[ROWS][2];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = 0.f;
  float sum_sq = 0.f;

  stream_chunks(rows, at.slice * 32 + at.lane, chunks, [&](const uint4 (&wv)[UNROLL][ROWS], int base) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = base + kStride * u;
      if (c >= chunks) break;
      float xf[16];
      load_activations(x, 2 * c, fusion, xf, sum_sq);
      load_activations(x, 2 * c + 1, fusion, xf + 8, sum_sq);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const u32 words[4] = {wv[u][r].x ^ 0x80808080u, wv[u][r].y ^ 0x80808080u, wv[u][r].z ^ 0x80808080u,
                              wv[u][r].w ^ 0x80808080u};
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const float q = biased_byte(words[j >> 2], j & 3) - 8388736.0f;  // 2^23 + 128
          acc[r][j & 1] = fmaf(xf[j], q, acc[r][j & 1]);
        }
      }
    }
  });
  float total[ROWS + 1];  // the rows' dot products, then sum(x^2)
#pragma unroll
  for (int r = 0; r < ROWS; ++r) total[r] = acc[r][0] + acc[r][1];
  total[ROWS] = sum_sq;
  if (!reduce_partials(total, at)) return;
  const float inv_rms = NORM ? rsqrtf(total[ROWS] / k + fusion.eps) : 1.f;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) total[r] *= scale[min(at.row0 + r, n - 1)];
  store_rows(y, at.row0, n, total, inv_rms, fusion, at.lane);
}

// (t & mask) | magic in one LOP3: written out because the compiler, given two immediates,
// emits an AND and an OR; `magic` must come in a register.
template <u32 mask>
__device__ __forceinline__ float masked_into(u32 t, u32 magic) {
  u32 out;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(t), "n"(mask), "r"(magic));
  return __uint_as_float(out);
}

// The two nibbles of a byte placed at bits 15-22 of `t`, as floats 256 + q and 256 + 16 q: OR-ed
// into the mantissa of 256.0 (bit pattern `f256`), where bit 15 is worth 1 and bit 22 is the
// highest mantissa bit, so both nibbles fit.
__device__ __forceinline__ float nibble_lo(u32 t, u32 f256) { return masked_into<0x00078000u>(t, f256); }
__device__ __forceinline__ float nibble_hi(u32 t, u32 f256) { return masked_into<0x00780000u>(t, f256); }

// y[n] = sum_g scale[n, g] * sum_{k in g} (q[n, k] - zero[n, g]) * x[k]; the int4 layout of woq.py:
// packed [N, K/2] bytes, group G (G/2 a multiple of 16, so a 16-byte chunk lies in one group);
// byte j of a group holds element j (low nibble) and element j + G/2 (high nibble).
extern "C" __global__ void __launch_bounds__(WARPS * 32)
int4_gemv(const uint4* x, const uint4* __restrict__ packed, const u16* __restrict__ scale,
          const u16* __restrict__ zero, u16* __restrict__ y, int n, int k, int group, const uint4* norm,
          double eps, const u16* residual, int add_residual) {
  allow_next_kernel();
  const Fusion fusion{norm, (float)eps, add_residual ? residual : nullptr};
  const WarpWork at = warp_work();
  const int chunks = k >> 5;  // 32 weights (16 bytes) per chunk
  const int chunks_per_group = group >> 5;
  const int groups = k / group;
  const uint4* rows[ROWS];
  int meta[ROWS];  // start of the row's scale / zero entries
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = min(at.row0 + r, n - 1);  // past N: re-read, not stored
    rows[r] = packed + (size_t)row * chunks;
    meta[r] = row * groups;
  }
  float acc[ROWS + 1];  // the rows' dot products, then sum(x^2)
#pragma unroll
  for (int r = 0; r <= ROWS; ++r) acc[r] = 0.f;
  const u32 f256 = 0x43800000u;  // 256.0f

  stream_chunks(rows, at.slice * 32 + at.lane, chunks, [&](const uint4 (&wv)[UNROLL][ROWS], int base) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = base + kStride * u;
      if (c >= chunks) break;
      const int g = c / chunks_per_group;
      const int first = g * group + (c - g * chunks_per_group) * 16;  // element of the low nibble of byte 0
      float x_lo[16], x_hi[16];
      const int lo = first >> 3, hi = (first + (group >> 1)) >> 3;
      load_activations(x, lo, fusion, x_lo, acc[ROWS]);
      load_activations(x, lo + 1, fusion, x_lo + 8, acc[ROWS]);
      load_activations(x, hi, fusion, x_hi, acc[ROWS]);
      load_activations(x, hi + 1, fusion, x_hi + 8, acc[ROWS]);
      float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        sum_lo += x_lo[j];
        sum_hi += x_hi[j];
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const u32 words[4] = {wv[u][r].x, wv[u][r].y, wv[u][r].z, wv[u][r].w};
        float dot_lo = 0.f, dot_hi = 0.f;  // sum x (256 + q) and sum x (256 + 16 q)
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          // byte b of the word moved to bits 15-22
          const u32 t[4] = {words[m] << 15, words[m] << 7, words[m] >> 1, words[m] >> 9};
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            dot_lo = fmaf(x_lo[4 * m + b], nibble_lo(t[b], f256), dot_lo);
            dot_hi = fmaf(x_hi[4 * m + b], nibble_hi(t[b], f256), dot_hi);
          }
        }
        const float s = activation_to_float(scale[meta[r] + g]);
        const float z = activation_to_float(zero[meta[r] + g]);
        // sum x (q - z) = dot_lo - 256 sum_lo + dot_hi / 16 - 16 sum_hi - z (sum_lo + sum_hi)
        const float dot = dot_lo + 0.0625f * dot_hi - (256.f + z) * sum_lo - (16.f + z) * sum_hi;
        acc[r] = fmaf(s, dot, acc[r]);
      }
    }
  });
  if (!reduce_partials(acc, at)) return;
  const float inv_rms = NORM ? rsqrtf(acc[ROWS] / k + fusion.eps) : 1.f;
  store_rows(y, at.row0, n, acc, inv_rms, fusion, at.lane);
}
