// Batch-1 decode attention for one new token (decode_attention.py), in one launch.
//
// Compiled at run time by NVRTC (torch.cuda._compile_kernel), once per macro set and device.
// For one sequence and one new token it does what fast_model.layer_forward does between the qkv
// projection and o_proj: add the qkv bias, rope q and k, write k and v into the caches at the
// token's slot, and softmax(q K^T / sqrt(D) + mask) V over the first attend_len cache slots for
// every query head (fp32 scores and softmax, as the torch path).
//
// The launcher defines:
//   HEAD_DIM  32, 64 or 128
//   GROUP     query heads per KV head, 1..16 (the 16 rows of the MMAs; unused rows are zero)
//   ROTARY    rotated dims = width of the cos/sin rows (even, <= HEAD_DIM)
//   WARPS     warps per block (4 or 8, see decode_attention.plan)
//   X_FP16    1 for float16 activations, 0 for bfloat16
//   SCALE     HEAD_DIM ** -0.5 as a float literal
//
// Work split (flash-decoding): grid (KV heads, splits). A block takes all GROUP query heads of its
// KV head over one chunk of key positions, so every K/V byte is read once per step; its warps take
// the chunk's 16-key tiles in turn. Scores and the P V product are tensor-core MMAs (m16n8k16,
// fp32 accumulate): each warp keeps an online softmax (running max, sum, unnormalised output) in
// the MMA accumulators. The warps of a block merge in shared memory, the blocks of a KV head in
// an fp32 workspace: the last block to finish (an atomic ticket per KV head) combines them, writes
// the output and sets the ticket back to 0, so the next launch (a CUDA-graph replay too) starts
// clean.
//
// Rope follows transformers' GLM apply_rotary_pos_emb: the pairs (2i, 2i+1) with 2i < ROTARY
// turn by the angle of cos/sin entry i (only the first half of each table row is used).

typedef unsigned int u32;
typedef unsigned short u16;

constexpr int kThreads = WARPS * 32;
constexpr int kChunks = HEAD_DIM / 8;          // 16-byte chunks per K/V/q row
constexpr int kSpans = HEAD_DIM / 32;          // 32-dim slices of q.k: two k=16 MMAs each
constexpr int kHalves = (HEAD_DIM + 63) / 64;  // 64-dim slices of P V: eight n=8 MMAs each
constexpr int kFrag = kHalves * 1024;          // floats of one P V accumulator image (32 lanes)
constexpr int kPart = kFrag + 32;              // a block's partial: the image, row max, row sum
constexpr int kSlices = WARPS < 4 ? WARPS : 4;  // accumulator images a block merges in shared memory
constexpr int kMaxSplits = 64;                 // blocks per KV head (decode_attention.MAX_SPLITS)
constexpr int kTile = 16;                      // keys per warp step
constexpr float kLog2e = 1.4426950408889634f;

static_assert(HEAD_DIM % 32 == 0 && HEAD_DIM <= 128, "head_dim 32, 64 or 128");
static_assert(GROUP >= 1 && GROUP <= 16, "at most 16 query heads per KV head (the MMA rows)");
static_assert(ROTARY % 2 == 0 && ROTARY <= HEAD_DIM, "rotary width even and within the head");
static_assert(WARPS == 1 || WARPS == 2 || WARPS == 4 || WARPS == 8, "merge_warps folds 8 warps into 4 images");

#if X_FP16
#define MMA_TYPE "f16"
#else
#define MMA_TYPE "bf16"
#endif

// --- conversions and memory ----------------------------------------------------------------------
__device__ __forceinline__ float to_float(u32 h16) {
#if X_FP16
  float f;
  asm("{.reg .b16 h; cvt.u16.u32 h, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "r"(h16));
  return f;
#else
  return __uint_as_float(h16 << 16);
#endif
}

// Two floats -> one register of two 16-bit values, `lo` in the low half (the lower index of an
// MMA operand pair). cvt packs its first source into the high half.
__device__ __forceinline__ u32 pack(float lo, float hi) {
  u32 r;
  asm("cvt.rn." MMA_TYPE "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ u16 to_half(float f) { return (u16)(pack(f, 0.f) & 0xffffu); }

__device__ __forceinline__ void unpack8(uint4 v, float (&x)[8]) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = to_float(w[i] & 0xffffu);
    x[2 * i + 1] = to_float(w[i] >> 16);
  }
}

__device__ __forceinline__ uint4 pack8(const float (&x)[8]) {
  return make_uint4(pack(x[0], x[1]), pack(x[2], x[3]), pack(x[4], x[5]), pack(x[6], x[7]));
}

__device__ __forceinline__ u32 word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// K/V rows are read once per step: no L1 allocation; L2 fetches whole 256-byte segments (a
// D = 128 row) since the tile's other lanes want the rest.
// Not ld.global.nc (nor __ldg / const __restrict__ inputs): ptxas moves such loads above
// griddepcontrol.wait (seen in SASS for sm_90), and with programmatic dependent launch every input
// here may still be being written by the previous kernel until then.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Other blocks' partial results: from L2, never a stale L1 line.
__device__ __forceinline__ float4 load_l2_x4(const float* p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float load_l2(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// exp(x - max) through exp2; a max of -inf (nothing seen yet, or only -inf scores) counts as 0 so
// -inf - -inf never makes a NaN.
__device__ __forceinline__ float exp_from(float x, float max) {
  return exp2f((x - (max == neg_inf() ? 0.f : max)) * kLog2e);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// c += A (16 x 16, row) * B (16 x 8, col), fp32 accumulate.
__device__ __forceinline__ void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// --- where a lane works ----------------------------------------------------------------------------
// MMA fragments name a lane by row = lane / 4 (PTX groupID) and quad = lane % 4 (threadID_in_group).
//
// Key order inside a 16-key tile is free as long as the score MMA and the P V MMA agree; it is
// chosen so that no data moves between lanes: in score MMA n (n = 0, 1) the lane's B column
// (= row) is key score_key(row, n) = 4 (row / 2) + row % 2 + 2n, which puts its C columns
// 2 quad, 2 quad + 1 on keys 4 quad + 2n, 4 quad + 2n + 1. So a lane's scores are keys 4 quad + j
// (j = 0..3) of query rows `row` and `row + 8`, which are the keys its A fragment of P covers in
// the P V MMA when k slots 2 quad, 2 quad + 1, 2 quad + 8, 2 quad + 9 are keys 4 quad + 0, 1, 2, 3.
// Dims of q.k are permuted the same way in A and B (see query_fragments), so 16-byte K loads feed
// the B operand directly; the P V MMA's column `row` of n-tile i (half h) is dim 64 h + 8 row + i,
// so 16-byte V loads feed it too and the accumulator element c of n-tile (h, i) is query row
// row + 8 (c / 2), dim 64 h + 16 quad + 8 (c % 2) + i.
struct Lane {
  int warp, lane, row, quad;
};

__device__ __forceinline__ int score_key(int row, int n) { return 4 * (row >> 1) + (row & 1) + 2 * n; }

// An image of a warp's P V accumulators is float4 number (h * 8 + i) * 32 + lane for n-tile (h, i)
// of `lane` (one 16-byte store per n-tile, 32 lanes contiguous): elements c = 0..3 are query rows
// r, r, r + 8, r + 8 and dims d, d + 8, d, d + 8 with r = lane / 4, d = 64 h + 16 (lane % 4) + i.
// Block partials in the workspace use the same order.
struct ImageSlot {
  int row, dim;  // of element 0
};
__device__ __forceinline__ ImageSlot image_slot(int e4) {
  const int lane = e4 & 31;
  return {lane >> 2, 64 * (e4 >> 8) + 16 * (lane & 3) + ((e4 >> 5) & 7)};
}

struct SplitStats {
  float max[kMaxSplits][16], sum[kMaxSplits][16];  // then the blocks' weights in max
};

struct Shared {
  uint4 q[16][kChunks];          // the group's roped query heads; rows >= GROUP zero
  uint4 k[kChunks], v[kChunks];  // the new token's roped key and its value
  float warp_max[WARPS][16], warp_sum[WARPS][16];
  float row_max[16], row_sum[16];  // the block's, per query row
  union {
    float4 image[kSlices][kFrag / 4];  // the warps' rescaled accumulators, to be added up
    SplitStats split;                  // last block, once its own partial is out
  } u;
  int last;
};

// What a lane holds of one tile: K chunks and mask first (needed first), V apart (so the next
// tile's K can be requested while this tile's V is still in use).
struct Keys {
  uint4 k[2][kSpans];  // score MMA n, span s: dims 32 s + 8 quad .. + 7 of key score_key(row, n)
  float mask[4];       // keys 4 quad + j; -inf past the chunk
};
struct Values {
  uint4 v[4][kHalves];  // keys 4 quad + j, dims 64 h + 8 row .. + 7
};

struct Chunk {
  const uint4* k_rows;  // this KV head's cache rows
  const uint4* v_rows;
  const u16* mask;
  int end;         // one past the block's last key
  long long slot;  // the new token's cache position: read from shared memory, not the cache
};

// The cache rows other than the slot; zero past the chunk end (their weight is 0, and garbage
// could be NaN) and at the slot, which patch_* fills once the new token is in shared memory
// (another block is writing that row now).
__device__ __forceinline__ uint4 cache_chunk(const uint4* rows, int key, int chunk, const Chunk& at) {
  if (key >= at.end || key == at.slot || chunk >= kChunks) return make_uint4(0, 0, 0, 0);
  return load_stream(rows + (size_t)key * kChunks + chunk);
}

__device__ __forceinline__ void load_keys(Keys& t, int tile, const Lane& at, const Chunk& c) {
#pragma unroll
  for (int n = 0; n < 2; ++n) {
#pragma unroll
    for (int s = 0; s < kSpans; ++s)
      t.k[n][s] = cache_chunk(c.k_rows, tile + score_key(at.row, n), 4 * s + at.quad, c);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int key = tile + 4 * at.quad + j;
    t.mask[j] = key < c.end ? to_float(c.mask[key]) : neg_inf();
  }
}

__device__ __forceinline__ void load_values(Values& t, int tile, const Lane& at, const Chunk& c) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int h = 0; h < kHalves; ++h) t.v[j][h] = cache_chunk(c.v_rows, tile + 4 * at.quad + j, 8 * h + at.row, c);
  }
}

__device__ __forceinline__ void patch_keys(Keys& t, int tile, const Lane& at, const Chunk& c, const Shared& s) {
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    if (tile + score_key(at.row, n) != c.slot) continue;
#pragma unroll
    for (int sp = 0; sp < kSpans; ++sp) t.k[n][sp] = s.k[4 * sp + at.quad];
  }
}

__device__ __forceinline__ void patch_values(Values& t, int tile, const Lane& at, const Chunk& c, const Shared& s) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (tile + 4 * at.quad + j != c.slot) continue;
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      if (8 * h + at.row < kChunks) t.v[j][h] = s.v[8 * h + at.row];
    }
  }
}

// --- the new token ----------------------------------------------------------------------------------
// Pairs (2i, 2i+1) of dims 8c .. 8c + 7 of a q or k row, 2i < ROTARY, turned by cos/sin entry i
// (angles[j]: cos | sin << 16 of pair i = 4c + j).
__device__ __forceinline__ void rope(float (&x)[8], int c, const u32 (&angles)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = 4 * c + j;
    if (2 * i < ROTARY) {
      const float co = to_float(angles[j] & 0xffffu), si = to_float(angles[j] >> 16);
      const float a = x[2 * j], b = x[2 * j + 1];
      x[2 * j] = a * co - b * si;
      x[2 * j + 1] = b * co + a * si;
    }
  }
}

// Bias-added, roped q rows of the group and k, and v, into shared memory in the activation dtype
// (the MMAs take them so, the caches store them so: rounded once, from fp32); the block that
// writes the caches (k_out/v_out not null) stores k and v at the slot. All loads come first: the
// cache stores may alias the inputs as far as the compiler knows, and would otherwise serialise
// one round trip per item.
__device__ void new_token(Shared& s, const uint4* qkv, const uint4* qkv_bias, int has_bias, const u16* cos,
                          const u16* sin, uint4* k_out, uint4* v_out, int head, int kv_heads) {
  constexpr int kItems = (GROUP + 2) * kChunks;  // row GROUP: k, GROUP + 1: v
  constexpr int kRounds = (kItems + kThreads - 1) / kThreads;
  const int q_heads = kv_heads * GROUP;
  uint4 raw[kRounds], raw_bias[kRounds];
  u32 angles[kRounds][4];  // cos | sin << 16 of the item's four pairs
#pragma unroll
  for (int i = 0; i < kRounds; ++i) {
    const int item = i * kThreads + (int)threadIdx.x;
    if (item >= kItems) break;
    const int r = item / kChunks, c = item % kChunks;
    const int src = r < GROUP ? head * GROUP + r : r == GROUP ? q_heads + head : q_heads + kv_heads + head;
    raw[i] = qkv[src * kChunks + c];
    raw_bias[i] = has_bias ? qkv_bias[src * kChunks + c] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int pair = 4 * c + j;
      angles[i][j] = r <= GROUP && 2 * pair < ROTARY ? (u32)cos[pair] | (u32)sin[pair] << 16 : 0u;
    }
  }
#pragma unroll
  for (int i = 0; i < kRounds; ++i) {
    const int item = i * kThreads + (int)threadIdx.x;
    if (item < kItems) {
      const int r = item / kChunks, c = item % kChunks;
      float x[8], b[8];
      unpack8(raw[i], x);
      unpack8(raw_bias[i], b);
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] += b[j];
      if (r <= GROUP) rope(x, c, angles[i]);
      const uint4 y = pack8(x);
      if (r < GROUP) {
        s.q[r][c] = y;
      } else if (r == GROUP) {
        s.k[c] = y;
        if (k_out != nullptr) k_out[c] = y;
      } else {
        s.v[c] = y;
        if (v_out != nullptr) v_out[c] = y;
      }
    }
  }
  for (int i = threadIdx.x; i < (16 - GROUP) * kChunks; i += kThreads)
    s.q[GROUP + i / kChunks][i % kChunks] = make_uint4(0, 0, 0, 0);
}

// A operands of the score MMAs: for span s, MMA half u takes the lane's dims 32 s + 8 quad + 4 u
// + {0, 1} as k slots 2 quad, 2 quad + 1 and + {2, 3} as slots 2 quad + 8, + 9 (rows `row`,
// `row + 8`): the same dims its K chunk word 2u, 2u + 1 gives the B operand.
__device__ __forceinline__ void query_fragments(u32 (&qf)[kSpans][2][4], const Shared& s, const Lane& at) {
#pragma unroll
  for (int sp = 0; sp < kSpans; ++sp) {
    const uint4 lo = s.q[at.row][4 * sp + at.quad], hi = s.q[at.row + 8][4 * sp + at.quad];
    qf[sp][0][0] = lo.x, qf[sp][0][1] = hi.x, qf[sp][0][2] = lo.y, qf[sp][0][3] = hi.y;
    qf[sp][1][0] = lo.z, qf[sp][1][1] = hi.z, qf[sp][1][2] = lo.w, qf[sp][1][3] = hi.w;
  }
}

// --- one warp over its tiles ------------------------------------------------------------------------
struct Softmax {
  float max[2], sum[2];      // rows `row`, `row + 8`; sum is this lane's part
  float acc[kHalves][8][4];  // P V accumulators (see Lane)
};

// Scores of the tile (scaled, masked) -> probabilities relative to the new running max, with the
// accumulators and sums rescaled to it; returns P as the A operand of the P V MMA.
__device__ __forceinline__ void softmax_step(Softmax& st, const float (&sc)[2][4], const float (&mask)[4],
                                             u32 (&pa)[4]) {
  float p[2][4];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float x[4], tile_max = neg_inf();
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // key 4 quad + j: score MMA j / 2, column parity j % 2
      x[j] = fmaf(sc[j >> 1][2 * r + (j & 1)], SCALE, mask[j]);
      tile_max = fmaxf(tile_max, x[j]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float max = fmaxf(st.max[r], tile_max);
    const float alpha = exp_from(st.max[r], max);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      p[r][j] = exp_from(x[j], max);
      sum += p[r][j];
    }
    st.max[r] = max;
    st.sum[r] = fmaf(st.sum[r], alpha, sum);
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
#pragma unroll
      for (int i = 0; i < 8; ++i) st.acc[h][i][2 * r] *= alpha, st.acc[h][i][2 * r + 1] *= alpha;
    }
  }
  pa[0] = pack(p[0][0], p[0][1]), pa[1] = pack(p[1][0], p[1][1]);
  pa[2] = pack(p[0][2], p[0][3]), pa[3] = pack(p[1][2], p[1][3]);
}

__device__ __forceinline__ void accumulate_pv(Softmax& st, const u32 (&pa)[4], const Values& t) {
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // element i of each key's chunk: word i / 2, half i % 2
      const u32 sel = (i & 1) ? 0x7632u : 0x5410u;
      const u32 b0 = __byte_perm(word(t.v[0][h], i >> 1), word(t.v[1][h], i >> 1), sel);
      const u32 b1 = __byte_perm(word(t.v[2][h], i >> 1), word(t.v[3][h], i >> 1), sel);
      mma(st.acc[h][i], pa, b0, b1);
    }
  }
}

// The warp's tiles: first, first + WARPS * 16, ... below c.end. The first tile's loads (kt, vt)
// were issued before the new token was ready; each later tile's K is requested while the
// previous tile's P V runs, its V after.
__device__ __forceinline__ void attend(Softmax& st, const u32 (&qf)[kSpans][2][4], Keys& kt, Values& vt, int first,
                                       const Lane& at, const Chunk& c, const Shared& s) {
  for (int tile = first; tile < c.end; tile += WARPS * kTile) {
    float sc[2][4] = {};
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int sp = 0; sp < kSpans; ++sp) {
        mma(sc[n], qf[sp][0], kt.k[n][sp].x, kt.k[n][sp].y);
        mma(sc[n], qf[sp][1], kt.k[n][sp].z, kt.k[n][sp].w);
      }
    }
    const float mask[4] = {kt.mask[0], kt.mask[1], kt.mask[2], kt.mask[3]};  // kt is reloaded below
    const int next = tile + WARPS * kTile;
    if (next < c.end) {
      load_keys(kt, next, at, c);
      patch_keys(kt, next, at, c, s);
    }
    u32 pa[4];
    softmax_step(st, sc, mask, pa);
    accumulate_pv(st, pa, vt);
    if (next < c.end) {
      load_values(vt, next, at, c);
      patch_values(vt, next, at, c, s);
    }
  }
}

// --- merging -----------------------------------------------------------------------------------------
__device__ __forceinline__ void store_image(float4* image, const Softmax& st, const Lane& at) {
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float* a = st.acc[h][i];
      image[(h * 8 + i) * 32 + at.lane] = make_float4(a[0], a[1], a[2], a[3]);
    }
  }
}

__device__ __forceinline__ void add_image(Softmax& st, const float4* image, const Lane& at) {
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float4 v = image[(h * 8 + i) * 32 + at.lane];
      st.acc[h][i][0] += v.x, st.acc[h][i][1] += v.y, st.acc[h][i][2] += v.z, st.acc[h][i][3] += v.w;
    }
  }
}

// Warps -> the block: each warp rescales its accumulators to the block's row max; their sum is
// left as kSlices images in s.u.image (block_sum adds them up), the block's row max and sum in
// s.row_max / s.row_sum. Plain stores and loads: shared-memory float atomics are CAS loops.
__device__ __forceinline__ void merge_warps(Shared& s, Softmax& st, const Lane& at) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.sum[r] += __shfl_xor_sync(0xffffffffu, st.sum[r], 1);
    st.sum[r] += __shfl_xor_sync(0xffffffffu, st.sum[r], 2);
    if (at.quad == 0) {
      s.warp_max[at.warp][at.row + 8 * r] = st.max[r];
      s.warp_sum[at.warp][at.row + 8 * r] = st.sum[r];
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float max = neg_inf();
#pragma unroll
    for (int w = 0; w < WARPS; ++w) max = fmaxf(max, s.warp_max[w][at.row + 8 * r]);
    const float f = exp_from(st.max[r], max);  // 0 for a warp without keys (its max is -inf)
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
#pragma unroll
      for (int i = 0; i < 8; ++i) st.acc[h][i][2 * r] *= f, st.acc[h][i][2 * r + 1] *= f;
    }
  }
  if (threadIdx.x < 16) {
    const int r = threadIdx.x;
    float max = neg_inf(), sum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) max = fmaxf(max, s.warp_max[w][r]);
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += s.warp_sum[w][r] * exp_from(s.warp_max[w][r], max);
    s.row_max[r] = max, s.row_sum[r] = sum;
  }
  if (WARPS > kSlices) {  // 8 warps: the upper four fold into the lower four (4 images fit in 48 KB)
    if (at.warp >= kSlices) store_image(s.u.image[at.warp - kSlices], st, at);
    __syncthreads();
    if (at.warp < kSlices) add_image(st, s.u.image[at.warp], at);  // then rewrites this same slice
  }
  if (at.warp < kSlices) store_image(s.u.image[at.warp], st, at);
  __syncthreads();
}

__device__ __forceinline__ float4 block_sum(const Shared& s, int e4) {
  float4 t = s.u.image[0][e4];
#pragma unroll
  for (int w = 1; w < kSlices; ++w) {
    const float4 v = s.u.image[w][e4];
    t.x += v.x, t.y += v.y, t.z += v.z, t.w += v.w;
  }
  return t;
}

// Image float4 e4 into the output [heads, HEAD_DIM], rows r / r + 8 scaled by lo / hi.
__device__ __forceinline__ void store4(u16* out, int head, int e4, float4 v, float lo, float hi) {
  const ImageSlot at = image_slot(e4);
  if (at.dim >= HEAD_DIM) return;  // then d + 8 < HEAD_DIM too: HEAD_DIM is a multiple of 16
  u16* o = out + (head * GROUP + at.row) * HEAD_DIM + at.dim;
  if (at.row < GROUP) o[0] = to_half(v.x * lo), o[8] = to_half(v.y * lo);
  if (at.row + 8 < GROUP) o[8 * HEAD_DIM] = to_half(v.z * hi), o[8 * HEAD_DIM + 8] = to_half(v.w * hi);
}

// Blocks -> the output (last block of a KV head): weight each block's image by
// exp(its max - the max) / the total sum and add them up.
__device__ void combine_splits(Shared& s, const float* parts, int splits, u16* out, int head, const Lane& at) {
  SplitStats& st = s.u.split;
  for (int i = threadIdx.x; i < splits * 16; i += kThreads) {
    const int b = i >> 4, r = i & 15;
    st.max[b][r] = load_l2(parts + (size_t)b * kPart + kFrag + r);
    st.sum[b][r] = load_l2(parts + (size_t)b * kPart + kFrag + 16 + r);
  }
  __syncthreads();
  for (int r = at.warp; r < GROUP; r += WARPS) {  // a warp per row, its lanes over the splits
    const int b0 = at.lane, b1 = at.lane + 32;
    const float m0 = b0 < splits ? st.max[b0][r] : neg_inf(), m1 = b1 < splits ? st.max[b1][r] : neg_inf();
    const float max = warp_max(fmaxf(m0, m1));
    const float w0 = b0 < splits ? exp_from(m0, max) : 0.f, w1 = b1 < splits ? exp_from(m1, max) : 0.f;
    const float l0 = b0 < splits ? st.sum[b0][r] : 0.f, l1 = b1 < splits ? st.sum[b1][r] : 0.f;
    const float sum = warp_sum(w0 * l0 + w1 * l1);
    if (b0 < splits) st.max[b0][r] = w0 / sum;  // now the weight of block b0
    if (b1 < splits) st.max[b1][r] = w1 / sum;
  }
  __syncthreads();
  for (int e4 = threadIdx.x; e4 < kFrag / 4; e4 += kThreads) {
    const ImageSlot slot = image_slot(e4);
    if (slot.row >= GROUP || slot.dim >= HEAD_DIM) continue;  // padding rows / dims
    const bool hi_row = slot.row + 8 < GROUP;
    float4 total = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int b = 0; b < splits; ++b) {
      const float lo = st.max[b][slot.row], hi = hi_row ? st.max[b][slot.row + 8] : 0.f;
      if (lo == 0.f && hi == 0.f) continue;  // a chunk the mask hides entirely
      const float4 v = load_l2_x4(parts + (size_t)b * kPart + 4 * e4);
      total.x = fmaf(lo, v.x, total.x), total.y = fmaf(lo, v.y, total.y);
      total.z = fmaf(hi, v.z, total.z), total.w = fmaf(hi, v.w, total.w);
    }
    store4(out, head, e4, total, 1.f, 1.f);
  }
}

// --- the kernel ----------------------------------------------------------------------------------------
// qkv [(Hq + 2 Hkv) * D] (q heads, k heads, v heads), qkv_bias likewise (read when has_bias),
// cos/sin [ROTARY], slots [1] int64, caches [Hkv, cache_len, D], mask [attend_len] additive,
// out [Hq * D]; work [Hkv, splits, kPart] fp32 and tickets [Hkv] (zero between launches) when
// splits > 1. Grid (Hkv, splits), WARPS * 32 threads; block (h, b) takes keys
// [b * keys_per_split, (b + 1) * keys_per_split) of attend_len (a multiple of 16 per block).
// Inputs are not __restrict__: see load_stream.
extern "C" __global__ void __launch_bounds__(kThreads)
decode_attention(const uint4* qkv, const uint4* qkv_bias, int has_bias, const u16* cos, const u16* sin,
                 const long long* slots, uint4* k_cache, uint4* v_cache, const u16* mask, u16* __restrict__ out,
                 float* __restrict__ work, unsigned* __restrict__ tickets, int attend_len, int cache_len,
                 int keys_per_split) {
  __shared__ __align__(16) Shared s;
  const int head = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const Lane at{(int)threadIdx.x >> 5, (int)threadIdx.x & 31, ((int)threadIdx.x & 31) >> 2, (int)threadIdx.x & 3};
#if __CUDA_ARCH__ >= 900
  // Let the next kernel (o_proj) get scheduled; it waits for this one before reading our output.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  // Every input below may come from the previous kernel (with programmatic dependent launch).
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int start = split * keys_per_split;
  const long long slot = slots[0];
  const size_t head_rows = (size_t)head * cache_len * kChunks;
  const Chunk chunk{k_cache + head_rows, v_cache + head_rows, mask, min(start + keys_per_split, attend_len), slot};

  // The first tile's K/V requests go out before the new token is computed, overlapping both.
  const int first = start + at.warp * kTile;
  const bool worked = first < chunk.end;
  Keys kt;
  Values vt;
  if (worked) {
    load_keys(kt, first, at, chunk);
    load_values(vt, first, at, chunk);
  }
  const bool writes = split == 0 && slot >= 0 && slot < cache_len;  // one block per KV head
  new_token(s, qkv, qkv_bias, has_bias, cos, sin, writes ? k_cache + head_rows + slot * kChunks : nullptr,
            writes ? v_cache + head_rows + slot * kChunks : nullptr, head, gridDim.x);
  __syncthreads();

  Softmax st;
  st.max[0] = st.max[1] = neg_inf();
  st.sum[0] = st.sum[1] = 0.f;
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
#pragma unroll
    for (int i = 0; i < 8; ++i) st.acc[h][i][0] = st.acc[h][i][1] = st.acc[h][i][2] = st.acc[h][i][3] = 0.f;
  }
  if (worked) {
    u32 qf[kSpans][2][4];
    query_fragments(qf, s, at);
    patch_keys(kt, first, at, chunk, s);
    patch_values(vt, first, at, chunk, s);
    attend(st, qf, kt, vt, first, at, chunk, s);
  }
  merge_warps(s, st, at);

  if (splits == 1) {
    for (int e4 = threadIdx.x; e4 < kFrag / 4; e4 += kThreads) {
      const int row = image_slot(e4).row;  // a padding row's 1 / sum is computed, never stored
      const float hi = row + 8 < GROUP ? 1.f / s.row_sum[row + 8] : 0.f;
      store4(out, head, e4, block_sum(s, e4), 1.f / s.row_sum[row], hi);
    }
    return;
  }
  float* parts = work + (size_t)head * splits * kPart;
  float* part = parts + (size_t)split * kPart;
  for (int e4 = threadIdx.x; e4 < kFrag / 4; e4 += kThreads) reinterpret_cast<float4*>(part)[e4] = block_sum(s, e4);
  if (threadIdx.x < 16) {
    part[kFrag + threadIdx.x] = s.row_max[threadIdx.x];
    part[kFrag + 16 + threadIdx.x] = s.row_sum[threadIdx.x];
  }
  __threadfence();  // the partial is visible before the ticket says so
  __syncthreads();
  if (threadIdx.x == 0) s.last = atomicAdd(&tickets[head], 1u) == (unsigned)(splits - 1);
  __syncthreads();
  if (!s.last) return;
  __threadfence();
  if (threadIdx.x == 0) tickets[head] = 0;  // every block of this head has taken its ticket
  combine_splits(s, parts, splits, out, head, at);
}
