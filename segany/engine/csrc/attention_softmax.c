/* segany's CPU kernel for the image encoder's attention: the decomposed relative-position bias and the
 * softmax in one pass over the logits, float32 or bfloat16, on AVX-512.
 *
 * SAM's attention logits get a bias that is the sum of two small factors: for a query row and a key at
 * (y, x) on the keys' k_h x k_w grid, rel_h[row][y] + rel_w[row][x]. Run through PyTorch as separate
 * operations, a band of logits goes through memory five times (the product's bfloat16 output widened to
 * float32, the two broadcast adds, the softmax, the probabilities narrowed to bfloat16); for a global
 * block (4096 x 4096 logits per head) those passes cost more than the products themselves. Here each row
 * is read once, biased, normalised in float32 in a row buffer that stays in L1/L2, and written back in
 * place as probabilities in the logits' dtype. Arithmetic order as PyTorch's path: (logit + rel_h) +
 * rel_w in float32, then softmax with the row's maximum subtracted. Loaded by segany/engine/attention.py.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int segany_attention_abi(void) { return 3; }

#include "simd_exp.h"

static inline __m512 load16(const void *base, long i, __mmask16 m, int bf16) {
  if (bf16) {
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, (const float *)base + i);
}

/* float32 -> bfloat16, round to nearest even as PyTorch's conversion (vcvtneps2bf16; a NaN stays NaN,
 * float32 subnormals - probabilities below 1e-38 - become 0) */
static inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

/* logits: rows x (k_h * k_w), row-major, row stride `stride` elements, float32 (bf16 = 0) or bfloat16
 * (bf16 = 1); rel_h: rows x k_h and rel_w: rows x k_w, float32, contiguous. Each row becomes
 * softmax(logits + rel_h[row][y] + rel_w[row][x]) in place. */
void segany_rel_pos_softmax(void *logits, long rows, long stride, int k_h, int k_w, const float *rel_h,
                            const float *rel_w, int bf16, int num_threads) {
  const long n = (long)k_h * k_w;
  const long padded = (n + 15) & ~15L;
#pragma omp parallel num_threads(num_threads)
  {
    float *buf = (float *)aligned_alloc(64, padded * sizeof(float) + 64);
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
      char *row = (char *)logits + r * stride * (bf16 ? 2 : 4);
      const float *rh = rel_h + r * k_h, *rw = rel_w + r * k_w;
      __m512 vmax = _mm512_set1_ps(-__builtin_inff());
      for (int y = 0; y < k_h; y++) {
        __m512 h = _mm512_set1_ps(rh[y]);
        for (int x = 0; x < k_w; x += 16) {
          __mmask16 m = (k_w - x >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (k_w - x)) - 1);
          __m512 v = _mm512_add_ps(_mm512_add_ps(load16(row, (long)y * k_w + x, m, bf16), h),
                                   _mm512_maskz_loadu_ps(m, rw + x));
          _mm512_mask_storeu_ps(buf + (long)y * k_w + x, m, v);
          vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
        }
      }
      __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
      __m512 vsum = _mm512_setzero_ps();
      for (long i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_load_ps(buf + i), mx)));
        _mm512_store_ps(buf + i, e);
        vsum = _mm512_add_ps(vsum, e);
      }
      __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
      for (long i = 0; i < n; i += 16) {
        __mmask16 m = (n - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 p = _mm512_mul_ps(_mm512_load_ps(buf + i), inv);
        if (bf16)
          _mm256_mask_storeu_epi16((uint16_t *)row + i, m, to_bf16(p));
        else
          _mm512_mask_storeu_ps((float *)row + i, m, p);
      }
    }
    free(buf);
  }
}

/* ---------------------------------------------------------------------------------------------------
 * Attention in one kernel, a tile of query rows at a time: the tile's logits (q k^T, float32) stay in a
 * per-thread buffer, get their bias and softmax there and are multiplied with v, so the N x N logits
 * never go through memory and one parallel region covers every window and head. q, k and v are read in
 * place from the qkv projection's rows and the output is written in place to the image's rows, so no
 * copies cut windows out, split heads, or put them back.
 *
 * qkv: one row of qkv_row elements per position of the image (B*H*W rows); head h's q, k and v at
 * q_off + h*head_stride, k_off + h*head_stride, v_off + h*head_stride of a row (SAM: q | k | v, each
 * heads x d; TinyViT: per head q, k, v). index[w * n + i]: the row of window w's i-th position (for a
 * global block: the image's positions, one "window" per image), -1 for a position in the zero padding,
 * whose q, k, v are read from the row `pad` instead. out: one row of out_row elements per position,
 * head h's d values at h*d; padded positions are not written. n = k_h * k_w positions per window.
 *
 * The bias, one of: the decomposed relative-position bias of SAM's ViT (table_h, table_w non-NULL: for
 * a query at (y, x) and a key at (y', x'), rel_h[y'] + rel_w[x'] with rel_h[y'] = q_raw . table_h[y][y']
 * and rel_w[x'] = q_raw . table_w[x][x'], MViTv2's decomposition, computed per query row here; q is
 * scaled before the product as released: q * scale) or TinyViT's learned bias of every query/key pair
 * (bias: heads x n x n, float32; the logits are scaled after the product as released: (q k^T) * scale
 * + bias); or none (q scaled before the product). The bias and softmax run in float32.
 *
 * bfloat16: products of bfloat16 values summed in float32 (vdpbf16ps); q scaled in float32 and rounded
 * to bfloat16; the probabilities rounded to bfloat16 for the product with v, whose float32 result is
 * divided by the row's float32 sum. k is packed per window and head by channel pairs within blocks of
 * 16 keys (kb x (d/2) x 16 x 2, zero keys past n, kb even), v by pairs of keys ((n+1)/2 x d x 2, a zero
 * key past an odd n); the rel-pos tables the same way, k_h x ceil(k_h/16) x (d/2) x 16 x 2.
 * float32: every product and sum in float32 with fused multiply-adds (differences from PyTorch's order of
 * float32 rounding only); k packed kb x d x 16, v as n x d rows, the tables k_h x ceil(k_h/16) x d x 16.
 * d: a multiple of 16, at most 80 (SAM's heads: 64, 80; TinyViT's: 32).
 */
#define TILE_ROWS 8

static inline const void *row_at(const void *qkv, long qkv_row, const void *pad, long at, int elem) {
  return at >= 0 ? (const char *)qkv + at * qkv_row * elem : pad;
}

/* A task of the kernels' parallel loop: window w, head h (wh = w * heads + h), its query rows r0..r0+rows */
typedef struct {
  long wh, w;
  int h, r0, rows;
} tile_task;

static inline tile_task task_at(long task, long tiles, int heads, int n) {
  tile_task t;
  t.wh = task / tiles;
  t.w = t.wh / heads;
  t.h = (int)(t.wh % heads);
  t.r0 = (int)(task % tiles) * TILE_ROWS;
  t.rows = n - t.r0 < TILE_ROWS ? n - t.r0 : TILE_ROWS;
  return t;
}

/* A row of logits (float32, n valid) with its bias, then exp(logit - max): returns 1 / sum. The
 * probabilities are written to prob (bfloat16: pbf, float32: in place in row). */
static inline float softmax_row(float *row, int n, const float *brow, float scale, const float *rh, const float *rw,
                                int k_h, int k_w, __m512 vmax, int biased, uint16_t *pbf) {
  if (brow) { /* TinyViT: (q k^T) * scale + bias */
    const __m512 vscale = _mm512_set1_ps(scale);
    vmax = _mm512_set1_ps(-__builtin_inff());
    for (int i = 0; i < n; i += 16) {
      __mmask16 m = (n - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
      __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + i), vscale), _mm512_maskz_loadu_ps(m, brow + i));
      _mm512_mask_storeu_ps(row + i, m, v);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
    }
  } else if (rh && !biased) { /* SAM: (logit + rel_h) + rel_w, as PyTorch's path adds it */
    vmax = _mm512_set1_ps(-__builtin_inff());
    for (int y = 0; y < k_h; y++) {
      __m512 hv = _mm512_set1_ps(rh[y]);
      for (int x = 0; x < k_w; x += 16) {
        __mmask16 m = (k_w - x >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (k_w - x)) - 1);
        float *at = row + y * k_w + x;
        __m512 v = _mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m, at), hv), _mm512_maskz_loadu_ps(m, rw + x));
        _mm512_mask_storeu_ps(at, m, v);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
      }
    }
  } else if (!rh) {
    vmax = _mm512_set1_ps(-__builtin_inff());
    for (int i = 0; i < n; i += 16) {
      __mmask16 m = (n - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
      vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, row + i));
    }
  }
  __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = (n - i >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + i), mx)));
    vsum = _mm512_add_ps(vsum, e);
    if (pbf)
      _mm256_mask_storeu_epi16(pbf + i, m, to_bf16(e));
    else
      _mm512_mask_storeu_ps(row + i, m, e);
  }
  if (pbf && (n & 1)) pbf[n] = 0;
  return 1.0f / _mm512_reduce_add_ps(vsum);
}

static inline __m512bh pair_at(const uint16_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

/* logits[r][j] = q[r] . k[j] for ROWS rows and every key block (two blocks at a time), written to s
 * (row stride s_stride). With rh/rw (a key grid whose rows are whole multiples of 16 keys, as the
 * global blocks' 64 x 64) the bias is added as the logits are stored, (logit + rel_h) + rel_w as
 * PyTorch's path adds it, and each row's maximum is kept in vmax. */
#define DEFINE_TILE_LOGITS(NAME, ROWS)                                                                       \
  static void NAME(const uint16_t *q, int d, const uint16_t *kp, int kb, float *s, long s_stride,              \
                   const float *rh, long rh_stride, const float *rw, long rw_stride, int k_h, int k_w,           \
                   __m512 *vmax) {                                                                             \
    const int pairs = d / 2;                                                                                   \
    for (int b = 0; b < kb; b += 2) {                                                                          \
      const uint16_t *k0 = kp + (long)b * pairs * 32, *k1 = k0 + (long)pairs * 32;                             \
      __m512 acc[ROWS][2];                                                                                     \
      for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();                              \
      for (int p = 0; p < pairs; p++) {                                                                        \
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(k0 + p * 32);                                              \
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(k1 + p * 32);                                              \
        for (int r = 0; r < ROWS; r++) {                                                                       \
          __m512bh x = pair_at(q + (long)r * d + 2 * p);                                                       \
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);                                                      \
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);                                                      \
        }                                                                                                      \
      }                                                                                                        \
      if (rh) {                                                                                                \
        const int j = b * 16, y = j / k_w, x = j % k_w; /* both blocks on key row y (k_w % 32 == 0) */        \
        if (y < k_h) {                                                                                         \
          for (int r = 0; r < ROWS; r++) {                                                                     \
            __m512 h = _mm512_set1_ps(rh[r * rh_stride + y]);                                                  \
            __m512 wr0 = _mm512_loadu_ps(rw + r * rw_stride + x), wr1 = _mm512_loadu_ps(rw + r * rw_stride + x + 16); \
            acc[r][0] = _mm512_add_ps(_mm512_add_ps(acc[r][0], h), wr0);                                       \
            acc[r][1] = _mm512_add_ps(_mm512_add_ps(acc[r][1], h), wr1);                                       \
            vmax[r] = _mm512_max_ps(vmax[r], _mm512_max_ps(acc[r][0], acc[r][1]));                             \
          }                                                                                                    \
        }                                                                                                      \
      }                                                                                                        \
      for (int r = 0; r < ROWS; r++) {                                                                         \
        _mm512_storeu_ps(s + r * s_stride + b * 16, acc[r][0]);                                                \
        _mm512_storeu_ps(s + r * s_stride + b * 16 + 16, acc[r][1]);                                           \
      }                                                                                                        \
    }                                                                                                          \
  }
DEFINE_TILE_LOGITS(tile_logits_full, TILE_ROWS)
DEFINE_TILE_LOGITS(tile_logits_1, 1)

/* out[r] = (p[r] . v) * inv[r] for ROWS rows (p: bfloat16 pairs), NV = d / 16 output vectors. */
#define DEFINE_TILE_VALUES(NAME, ROWS, NV)                                                                     \
  static void NAME(const uint16_t *p, long p_stride, const uint16_t *vp, int n_pairs, const float *inv,        \
                   uint16_t *out, long o_row, int d) {                                                         \
    __m512 acc[ROWS][NV];                                                                                      \
    for (int r = 0; r < ROWS; r++)                                                                             \
      for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();                                            \
    for (int t = 0; t < n_pairs; t++) {                                                                        \
      const uint16_t *vt = vp + (long)t * d * 2;                                                               \
      __m512bh w[NV];                                                                                          \
      for (int c = 0; c < NV; c++) w[c] = (__m512bh)_mm512_loadu_si512(vt + c * 32);                          \
      for (int r = 0; r < ROWS; r++) {                                                                         \
        __m512bh x = pair_at(p + r * p_stride + 2 * t);                                                        \
        for (int c = 0; c < NV; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], x, w[c]);                        \
      }                                                                                                        \
    }                                                                                                          \
    for (int r = 0; r < ROWS; r++)                                                                             \
      for (int c = 0; c < NV; c++)                                                                             \
        _mm256_storeu_si256((__m256i *)(out + (long)r * o_row + c * 16),                                       \
                            to_bf16(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r]))));                        \
  }
DEFINE_TILE_VALUES(tile_values_4x4, 4, 4)
DEFINE_TILE_VALUES(tile_values_1x4, 1, 4)
DEFINE_TILE_VALUES(tile_values_4x5, 4, 5)
DEFINE_TILE_VALUES(tile_values_1x5, 1, 5)
DEFINE_TILE_VALUES(tile_values_4x3, 4, 3)
DEFINE_TILE_VALUES(tile_values_1x3, 1, 3)
DEFINE_TILE_VALUES(tile_values_4x2, 4, 2)
DEFINE_TILE_VALUES(tile_values_1x2, 1, 2)
DEFINE_TILE_VALUES(tile_values_4x1, 4, 1)
DEFINE_TILE_VALUES(tile_values_1x1, 1, 1)

static void tile_values(const uint16_t *p, long p_stride, int rows, const uint16_t *vp, int n_pairs, int nv,
                        const float *inv, uint16_t *out, long o_row, int d) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const uint16_t *pr = p + r * p_stride;
    uint16_t *o = out + (long)r * o_row;
    switch (nv) {
      case 4: tile_values_4x4(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
      case 5: tile_values_4x5(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
      case 3: tile_values_4x3(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
      case 2: tile_values_4x2(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
      default: tile_values_4x1(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
    }
  }
  for (; r < rows; r++) {
    const uint16_t *pr = p + r * p_stride;
    uint16_t *o = out + (long)r * o_row;
    switch (nv) {
      case 4: tile_values_1x4(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
      case 5: tile_values_1x5(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
      case 3: tile_values_1x3(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
      case 2: tile_values_1x2(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
      default: tile_values_1x1(pr, p_stride, vp, n_pairs, inv + r, o, o_row, d); break;
    }
  }
}

/* dst[j] = q . table[j] for the nb * 16 rows of a packed table (nb x pairs x 16 x 2): one query's
 * rel-pos factor (its q against the table of its own coordinate), float32 sums of bfloat16 products. */
static void rel_terms(const uint16_t *q, const uint16_t *table, int nb, int pairs, float *dst) {
  for (int b = 0; b < nb; b++) {
    const uint16_t *t = table + (long)b * pairs * 32;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int p = 0;
    for (; p + 2 <= pairs; p += 2) {
      acc0 = _mm512_dpbf16_ps(acc0, pair_at(q + 2 * p), (__m512bh)_mm512_loadu_si512(t + p * 32));
      acc1 = _mm512_dpbf16_ps(acc1, pair_at(q + 2 * p + 2), (__m512bh)_mm512_loadu_si512(t + p * 32 + 32));
    }
    if (p < pairs) acc0 = _mm512_dpbf16_ps(acc0, pair_at(q + 2 * p), (__m512bh)_mm512_loadu_si512(t + p * 32));
    _mm512_storeu_ps(dst + b * 16, _mm512_add_ps(acc0, acc1));
  }
}

static void gather_keys(const uint16_t *qkv, long qkv_row, const long *index, const uint16_t *pad, long off, int n,
                        int d, int kb, uint16_t *kp) {
  const int pairs = d / 2;
  uint32_t *dst = (uint32_t *)kp;
  for (int b = 0; b < kb; b++)
    for (int jj = 0; jj < 16; jj++) {
      const int j = b * 16 + jj;
      const uint32_t *src = NULL;
      if (j < n) src = (const uint32_t *)((index[j] >= 0 ? qkv + index[j] * qkv_row : pad) + off);
      for (int p = 0; p < pairs; p++) dst[((long)b * pairs + p) * 16 + jj] = src ? src[p] : 0u;
    }
}

static void gather_values(const uint16_t *qkv, long qkv_row, const long *index, const uint16_t *pad, long off, int n,
                          int d, uint16_t *vp) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36,
                                      4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const int n_pairs = (n + 1) / 2;
  for (int t = 0; t < n_pairs; t++) {
    const uint16_t *a = (index[2 * t] >= 0 ? qkv + index[2 * t] * qkv_row : pad) + off;
    const uint16_t *b = 2 * t + 1 < n ? (index[2 * t + 1] >= 0 ? qkv + index[2 * t + 1] * qkv_row : pad) + off : NULL;
    uint16_t *dst = vp + (long)t * d * 2;
    for (int c0 = 0; c0 < d; c0 += 32) {
      const int cols = d - c0 < 32 ? d - c0 : 32;
      const __mmask32 m = cols == 32 ? 0xffffffffu : ((1u << cols) - 1);
      __m512i x = _mm512_maskz_loadu_epi16(m, a + c0);
      __m512i y = b ? _mm512_maskz_loadu_epi16(m, b + c0) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 2 * c0, _mm512_permutex2var_epi16(x, lo, y));
      if (cols > 16) _mm512_storeu_si512(dst + 2 * c0 + 32, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
}

void segany_attention_rows_bf16(const uint16_t *qkv, long qkv_row, const uint16_t *pad, const long *index, long windows,
                                int n, int heads, int d, long q_off, long k_off, long v_off, long head_stride, float scale,
                                const float *bias, const uint16_t *table_h, const uint16_t *table_w, int k_h, int k_w,
                                uint16_t *out, long out_row, int num_threads) {
  const int kb = ((n + 31) / 32) * 2;
  const int n_pairs = (n + 1) / 2;
  const long s_stride = (long)kb * 16;
  const long p_stride = (long)n_pairs * 2;
  const long tiles = (n + TILE_ROWS - 1) / TILE_ROWS;
  const int nv = d / 16;
  const long tasks = windows * heads * tiles;
  const int rel = table_h != NULL;
  const int bias_at_store = rel && k_w % 32 == 0;
  const int nbh = (k_h + 15) / 16, nbw = (k_w + 15) / 16;
#pragma omp parallel num_threads(num_threads)
  {
    float *rel_h = (float *)aligned_alloc(64, TILE_ROWS * nbh * 16 * sizeof(float));
    float *rel_w = (float *)aligned_alloc(64, TILE_ROWS * nbw * 16 * sizeof(float));
    float *s = (float *)aligned_alloc(64, TILE_ROWS * s_stride * sizeof(float));
    uint16_t *p = (uint16_t *)aligned_alloc(64, ((TILE_ROWS * p_stride * sizeof(uint16_t) + 63) / 64) * 64);
    uint16_t *kp = (uint16_t *)aligned_alloc(64, (long)kb * 16 * d * sizeof(uint16_t));
    uint16_t *vp = (uint16_t *)aligned_alloc(64, (long)n_pairs * 2 * d * sizeof(uint16_t));
    uint16_t *qs = (uint16_t *)aligned_alloc(64, ((TILE_ROWS * d * sizeof(uint16_t) + 63) / 64) * 64);
    uint16_t *o = (uint16_t *)aligned_alloc(64, ((TILE_ROWS * d * sizeof(uint16_t) + 63) / 64) * 64);
    long packed = -1;
    float inv[TILE_ROWS];
#pragma omp for schedule(static)
    for (long task = 0; task < tasks; task++) {
      const tile_task t = task_at(task, tiles, heads, n);
      const long wh = t.wh;
      const int h = t.h, r0 = t.r0, rows = t.rows;
      const long *win = index + t.w * n;
      const long head = (long)h * head_stride;
      if (wh != packed) {
        gather_keys(qkv, qkv_row, win, pad, k_off + head, n, d, kb, kp);
        gather_values(qkv, qkv_row, win, pad, v_off + head, n, d, vp);
        packed = wh;
      }
      for (int r = 0; r < rows; r++) {
        const int i = r0 + r;
        const uint16_t *qi = (const uint16_t *)row_at(qkv, qkv_row, pad, win[i], 2) + q_off + head;
        if (!bias) { /* SAM: q scaled before the product (float32, rounded to bfloat16) */
          for (int c = 0; c < d; c += 16) {
            __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(qi + c))), 16));
            _mm256_storeu_si256((__m256i *)(qs + r * d + c), to_bf16(_mm512_mul_ps(x, _mm512_set1_ps(scale))));
          }
        } else { /* TinyViT: the logits are scaled */
          memcpy(qs + r * d, qi, d * sizeof(uint16_t));
        }
        if (rel) { /* the rel-pos terms of the unscaled q */
          rel_terms(qi, table_h + (long)(i / k_w) * nbh * 16 * d, nbh, d / 2, rel_h + r * nbh * 16);
          rel_terms(qi, table_w + (long)(i % k_w) * nbw * 16 * d, nbw, d / 2, rel_w + r * nbw * 16);
        }
      }
      __m512 vmax[TILE_ROWS];
      for (int r = 0; r < TILE_ROWS; r++) vmax[r] = _mm512_set1_ps(-__builtin_inff());
      if (rows == TILE_ROWS)
        tile_logits_full(qs, d, kp, kb, s, s_stride, bias_at_store ? rel_h : NULL, nbh * 16, rel_w, nbw * 16, k_h, k_w, vmax);
      else
        for (int r = 0; r < rows; r++)
          tile_logits_1(qs + r * d, d, kp, kb, s + r * s_stride, s_stride, bias_at_store ? rel_h + r * nbh * 16 : NULL, 0,
                        rel_w + r * nbw * 16, 0, k_h, k_w, vmax + r);
      for (int r = 0; r < rows; r++)
        inv[r] = softmax_row(s + r * s_stride, n, bias ? bias + ((long)h * n + r0 + r) * n : NULL, scale,
                             rel ? rel_h + r * nbh * 16 : NULL, rel ? rel_w + r * nbw * 16 : NULL, k_h, k_w, vmax[r],
                             bias_at_store, p + r * p_stride);
      tile_values(p, p_stride, rows, vp, n_pairs, nv, inv, o, d, d);
      for (int r = 0; r < rows; r++) {
        const long at = win[r0 + r];
        if (at >= 0) memcpy(out + at * out_row + (long)h * d, o + r * d, d * sizeof(uint16_t));
      }
    }
    free(rel_h);
    free(rel_w);
    free(s);
    free(p);
    free(kp);
    free(vp);
    free(qs);
    free(o);
  }
}

/* ---- float32 ---- */
static void gather_keys_f32(const float *qkv, long qkv_row, const long *index, const float *pad, long off, int n, int d,
                            int kb, float *kp) {
  for (int b = 0; b < kb; b++)
    for (int jj = 0; jj < 16; jj++) {
      const int j = b * 16 + jj;
      const float *src = j < n ? (const float *)row_at(qkv, qkv_row, pad, index[j], 4) + off : NULL;
      for (int c = 0; c < d; c++) kp[((long)b * d + c) * 16 + jj] = src ? src[c] : 0.0f;
    }
}

static void gather_values_f32(const float *qkv, long qkv_row, const long *index, const float *pad, long off, int n, int d,
                              float *vp) {
  for (int j = 0; j < n; j++) memcpy(vp + (long)j * d, (const float *)row_at(qkv, qkv_row, pad, index[j], 4) + off, d * sizeof(float));
}

/* dst[j] = q . table[j] for the nb * 16 rows of a packed float32 table (nb x d x 16) */
static void rel_terms_f32(const float *q, const float *table, int nb, int d, float *dst) {
  for (int b = 0; b < nb; b++) {
    const float *t = table + (long)b * d * 16;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int c = 0;
    for (; c + 2 <= d; c += 2) {
      acc0 = _mm512_fmadd_ps(_mm512_set1_ps(q[c]), _mm512_loadu_ps(t + c * 16), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_set1_ps(q[c + 1]), _mm512_loadu_ps(t + c * 16 + 16), acc1);
    }
    if (c < d) acc0 = _mm512_fmadd_ps(_mm512_set1_ps(q[c]), _mm512_loadu_ps(t + c * 16), acc0);
    _mm512_storeu_ps(dst + b * 16, _mm512_add_ps(acc0, acc1));
  }
}

#define DEFINE_TILE_LOGITS_F32(NAME, ROWS)                                                                   \
  static void NAME(const float *q, int d, const float *kp, int kb, float *s, long s_stride) {                 \
    for (int b = 0; b < kb; b += 2) {                                                                          \
      const float *k0 = kp + (long)b * d * 16, *k1 = k0 + (long)d * 16;                                        \
      __m512 acc[ROWS][2];                                                                                     \
      for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();                              \
      for (int c = 0; c < d; c++) {                                                                            \
        __m512 w0 = _mm512_loadu_ps(k0 + c * 16), w1 = _mm512_loadu_ps(k1 + c * 16);                           \
        for (int r = 0; r < ROWS; r++) {                                                                       \
          __m512 x = _mm512_set1_ps(q[(long)r * d + c]);                                                       \
          acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);                                                       \
          acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);                                                       \
        }                                                                                                      \
      }                                                                                                        \
      for (int r = 0; r < ROWS; r++) {                                                                         \
        _mm512_storeu_ps(s + r * s_stride + b * 16, acc[r][0]);                                                \
        _mm512_storeu_ps(s + r * s_stride + b * 16 + 16, acc[r][1]);                                           \
      }                                                                                                        \
    }                                                                                                          \
  }
DEFINE_TILE_LOGITS_F32(tile_logits_f32_full, TILE_ROWS)
DEFINE_TILE_LOGITS_F32(tile_logits_f32_1, 1)

/* out[r] = (p[r] . v) * inv[r], p float32 (ROWS x n), v packed as n x d rows, NV = d / 16 vectors */
#define DEFINE_TILE_VALUES_F32(NAME, ROWS, NV)                                                               \
  static void NAME(const float *p, long p_stride, const float *vp, int n, const float *inv,          \
                   float *out, long o_row) {                                                                   \
    __m512 acc[ROWS][NV];                                                                                      \
    for (int r = 0; r < ROWS; r++)                                                                             \
      for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();                                            \
    for (int j = 0; j < n; j++) {                                                                              \
      const float *vj = vp + (long)j * NV * 16;                                                                              \
      __m512 w[NV];                                                                                            \
      for (int c = 0; c < NV; c++) w[c] = _mm512_loadu_ps(vj + c * 16);                                        \
      for (int r = 0; r < ROWS; r++) {                                                                         \
        __m512 x = _mm512_set1_ps(p[r * p_stride + j]);                                                        \
        for (int c = 0; c < NV; c++) acc[r][c] = _mm512_fmadd_ps(x, w[c], acc[r][c]);                          \
      }                                                                                                        \
    }                                                                                                          \
    for (int r = 0; r < ROWS; r++)                                                                             \
      for (int c = 0; c < NV; c++) _mm512_storeu_ps(out + r * o_row + c * 16, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r]))); \
  }
DEFINE_TILE_VALUES_F32(tile_values_f32_4x1, 4, 1)
DEFINE_TILE_VALUES_F32(tile_values_f32_4x2, 4, 2)
DEFINE_TILE_VALUES_F32(tile_values_f32_4x3, 4, 3)
DEFINE_TILE_VALUES_F32(tile_values_f32_4x4, 4, 4)
DEFINE_TILE_VALUES_F32(tile_values_f32_4x5, 4, 5)
DEFINE_TILE_VALUES_F32(tile_values_f32_1x1, 1, 1)
DEFINE_TILE_VALUES_F32(tile_values_f32_1x2, 1, 2)
DEFINE_TILE_VALUES_F32(tile_values_f32_1x3, 1, 3)
DEFINE_TILE_VALUES_F32(tile_values_f32_1x4, 1, 4)
DEFINE_TILE_VALUES_F32(tile_values_f32_1x5, 1, 5)

static void tile_values_f32(const float *p, long p_stride, int rows, const float *vp, int n, int nv,
                            const float *inv, float *out, long o_row) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *pr = p + r * p_stride;
    float *o = out + (long)r * o_row;
    switch (nv) {
      case 1: tile_values_f32_4x1(pr, p_stride, vp, n, inv + r, o, o_row); break;
      case 2: tile_values_f32_4x2(pr, p_stride, vp, n, inv + r, o, o_row); break;
      case 3: tile_values_f32_4x3(pr, p_stride, vp, n, inv + r, o, o_row); break;
      case 4: tile_values_f32_4x4(pr, p_stride, vp, n, inv + r, o, o_row); break;
      default: tile_values_f32_4x5(pr, p_stride, vp, n, inv + r, o, o_row); break;
    }
  }
  for (; r < rows; r++) {
    const float *pr = p + r * p_stride;
    float *o = out + (long)r * o_row;
    switch (nv) {
      case 1: tile_values_f32_1x1(pr, p_stride, vp, n, inv + r, o, o_row); break;
      case 2: tile_values_f32_1x2(pr, p_stride, vp, n, inv + r, o, o_row); break;
      case 3: tile_values_f32_1x3(pr, p_stride, vp, n, inv + r, o, o_row); break;
      case 4: tile_values_f32_1x4(pr, p_stride, vp, n, inv + r, o, o_row); break;
      default: tile_values_f32_1x5(pr, p_stride, vp, n, inv + r, o, o_row); break;
    }
  }
}

void segany_attention_rows_f32(const float *qkv, long qkv_row, const float *pad, const long *index, long windows, int n,
                               int heads, int d, long q_off, long k_off, long v_off, long head_stride, float scale,
                               const float *bias, const float *table_h, const float *table_w, int k_h, int k_w, float *out,
                               long out_row, int num_threads) {
  const int kb = ((n + 31) / 32) * 2;
  const long s_stride = (long)kb * 16;
  const long tiles = (n + TILE_ROWS - 1) / TILE_ROWS;
  const int nv = d / 16;
  const long tasks = windows * heads * tiles;
  const int rel = table_h != NULL;
  const int nbh = (k_h + 15) / 16, nbw = (k_w + 15) / 16;
#pragma omp parallel num_threads(num_threads)
  {
    float *rel_h = (float *)aligned_alloc(64, TILE_ROWS * nbh * 16 * sizeof(float));
    float *rel_w = (float *)aligned_alloc(64, TILE_ROWS * nbw * 16 * sizeof(float));
    float *s = (float *)aligned_alloc(64, TILE_ROWS * s_stride * sizeof(float));
    float *kp = (float *)aligned_alloc(64, (long)kb * 16 * d * sizeof(float));
    float *vp = (float *)aligned_alloc(64, (long)n * d * sizeof(float) + 64);
    float *qs = (float *)aligned_alloc(64, TILE_ROWS * d * sizeof(float));
    float *o = (float *)aligned_alloc(64, TILE_ROWS * d * sizeof(float));
    long packed = -1;
    float inv[TILE_ROWS];
#pragma omp for schedule(static)
    for (long task = 0; task < tasks; task++) {
      const tile_task t = task_at(task, tiles, heads, n);
      const long wh = t.wh;
      const int h = t.h, r0 = t.r0, rows = t.rows;
      const long *win = index + t.w * n;
      const long head = (long)h * head_stride;
      if (wh != packed) {
        gather_keys_f32(qkv, qkv_row, win, pad, k_off + head, n, d, kb, kp);
        gather_values_f32(qkv, qkv_row, win, pad, v_off + head, n, d, vp);
        packed = wh;
      }
      for (int r = 0; r < rows; r++) {
        const int i = r0 + r;
        const float *qi = (const float *)row_at(qkv, qkv_row, pad, win[i], 4) + q_off + head;
        if (!bias) /* SAM: q * scale before the product */
          for (int c = 0; c < d; c += 16)
            _mm512_storeu_ps(qs + r * d + c, _mm512_mul_ps(_mm512_loadu_ps(qi + c), _mm512_set1_ps(scale)));
        else /* TinyViT: the logits are scaled */
          memcpy(qs + r * d, qi, d * sizeof(float));
        if (rel) { /* the rel-pos terms of the unscaled q */
          rel_terms_f32(qi, (const float *)table_h + (long)(i / k_w) * nbh * 16 * d, nbh, d, rel_h + r * nbh * 16);
          rel_terms_f32(qi, (const float *)table_w + (long)(i % k_w) * nbw * 16 * d, nbw, d, rel_w + r * nbw * 16);
        }
      }
      if (rows == TILE_ROWS)
        tile_logits_f32_full(qs, d, kp, kb, s, s_stride);
      else
        for (int r = 0; r < rows; r++) tile_logits_f32_1(qs + r * d, d, kp, kb, s + r * s_stride, s_stride);
      for (int r = 0; r < rows; r++)
        inv[r] = softmax_row(s + r * s_stride, n, bias ? bias + ((long)h * n + r0 + r) * n : NULL, scale,
                             rel ? rel_h + r * nbh * 16 : NULL, rel ? rel_w + r * nbw * 16 : NULL, k_h, k_w,
                             _mm512_set1_ps(-__builtin_inff()), 0, NULL);
      tile_values_f32(s, s_stride, rows, vp, n, nv, inv, o, d);
      for (int r = 0; r < rows; r++) {
        const long at = win[r0 + r];
        if (at >= 0) memcpy(out + at * out_row + (long)h * d, o + r * d, d * sizeof(float));
      }
    }
    free(rel_h);
    free(rel_w);
    free(s);
    free(kp);
    free(vp);
    free(qs);
    free(o);
  }
}
