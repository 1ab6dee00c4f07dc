/* segany's CPU kernels for the mask decoder's image side, bfloat16 on AVX-512 BF16. */

/* The mask upscaling and hypernetwork product in one pass.
 *
 * The decoder's output upscaling is ConvT(2x2, stride 2) -> LayerNorm2d -> GELU -> ConvT(2x2,
 * stride 2) -> GELU, and each mask's logits are the dot product of the upscaled features with that
 * mask token's hypernetwork vector. Every input pixel owns a 4x4 block of output pixels that depends
 * on that pixel alone, so a few pixels at a time go through the whole chain while their intermediate
 * values stay in registers and L1; only the mask logits are written. Run through PyTorch as separate
 * operations, the same chain streams about 10 MB of intermediates through the caches per decode.
 *
 * Products: bfloat16 operands, float32 accumulation (vdpbf16ps). The first convolution's output, the
 * layer norm, both GELUs and the hypernetwork products stay in float32; only the second convolution's
 * input is rounded to bfloat16 (its operands must be). Loaded by segany/modeling/native.py, which
 * packs the weights as described below and checks the CPU and the shapes before calling.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define C1 64  /* first convolution's output channels per sub-pixel (transformer dim / 4) */
#define C2 32  /* second convolution's output channels per sub-pixel (transformer dim / 8) */
#define TILE 4 /* input pixels per tile */

int segany_native_abi(void) { return 1; }

/* x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)), erf as an odd rational function of degree 13/8 on
 * [-4, 4] (outside, erf rounds to +-1 in float32). The coefficients are those of the float erf in
 * Eigen (and TensorFlow); max abs error of this GELU against float64 about 1.1e-6 (PyTorch's own
 * float32 GELU: 1.3e-6). The division is a reciprocal estimate refined by one Newton step. */
static inline __m512 gelu_ps(__m512 x) {
  __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-4.0f)), _mm512_set1_ps(4.0f));
  __m512 z2 = _mm512_mul_ps(z, z);
  __m512 p = _mm512_set1_ps(-2.72614225801306e-10f);
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(-1.60960333262415e-02f));
  p = _mm512_mul_ps(p, z);
  __m512 q = _mm512_set1_ps(-1.45660718464996e-05f);
  q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(-1.42647390514189e-02f));
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
  __m512 erf = _mm512_mul_ps(p, r);
  __m512 half_x = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(half_x, erf, half_x);
}

/* For tests: y = gelu(x) over n floats (n a multiple of 16). */
void segany_gelu_f32(const float *x, float *y, long n) {
  for (long i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, gelu_ps(_mm512_loadu_ps(x + i)));
}

/* Two bfloat16 values (one k pair of a row) broadcast to all 16 lanes. */
static inline __m512bh broadcast_pair(const uint16_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

/* acc[i][0..3] += rows[i][0..2K) . w (packed [K][64][2]) for TILE rows. */
static inline void product_64(__m512 acc[TILE][4], const uint16_t *const rows[TILE], const uint16_t *w, int k_pairs) {
  for (int kp = 0; kp < k_pairs; kp++) {
    const uint16_t *wk = w + (long)kp * 128;
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk);
    __m512bh w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
    __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64);
    __m512bh w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
    for (int i = 0; i < TILE; i++) {
      __m512bh b = broadcast_pair(rows[i] + 2 * kp);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], b, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], b, w1);
      acc[i][2] = _mm512_dpbf16_ps(acc[i][2], b, w2);
      acc[i][3] = _mm512_dpbf16_ps(acc[i][3], b, w3);
    }
  }
}

/* Mask logits for the top-left rows_in x cols_in pixels of one image side.
 *
 * x:      (H*W, C) bfloat16, one row per pixel (row stride C); C even.
 * w1p:    first convolution, [4 sub-pixels (dy1, dx1)][C/2 k pairs][C1 channels][2] bfloat16.
 * b1:     [C1] its bias; gain, beta: [C1] the layer norm's affine; eps its epsilon.
 * w2p:    second convolution, [C1/2 k pairs][C2 * 4 outputs][2] bfloat16, outputs ordered
 *         (channel, dy2, dx2) so that the 4 sub-pixels of 4 channels share one 16-lane register.
 * b2x:    [C2 * 4] its bias in that order; hyperx: [T][C2 * 4] each mask's hypernetwork vector,
 *         every value repeated for the 4 sub-pixels.
 * out:    (T, 4H, 4W) float32; the pixels outside the region are not written.
 */
void segany_upscale_logits_bf16(const uint16_t *x, int H, int W, int C, int rows_in, int cols_in,
                                const uint16_t *w1p, const float *b1, const float *gain, const float *beta,
                                float eps, const uint16_t *w2p, const float *b2x, const float *hyperx, int T,
                                float *out, int num_threads) {
  const long pixels = (long)rows_in * cols_in;
  const long tiles = (pixels + TILE - 1) / TILE;
  const int k_pairs = C / 2;
  const long out_w = 4L * W, plane = 16L * H * W;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (long tile = 0; tile < tiles; tile++) {
    float y1[TILE][4 * C1] __attribute__((aligned(64)));
    uint16_t h1[TILE * 4][C1] __attribute__((aligned(64))); /* rows (pixel, sub-pixel) */
    const uint16_t *rows[TILE];
    int valid[TILE];
    long pixel_row[TILE], pixel_col[TILE];
    for (int i = 0; i < TILE; i++) {
      long q = tile * TILE + i;
      valid[i] = q < pixels;
      if (q >= pixels) q = pixels - 1; /* a short last tile repeats its last pixel, not written */
      pixel_row[i] = q / cols_in;
      pixel_col[i] = q % cols_in;
      rows[i] = x + (pixel_row[i] * W + pixel_col[i]) * C;
    }
    /* First convolution, one sub-pixel's C1 outputs (4 registers) at a time for the tile's pixels. */
    for (int s1 = 0; s1 < 4; s1++) {
      __m512 acc[TILE][4];
      for (int i = 0; i < TILE; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_loadu_ps(b1 + 16 * j);
      product_64(acc, rows, w1p + (long)s1 * k_pairs * C1 * 2, k_pairs); /* (C1 = 64: one call per sub-pixel) */
      for (int i = 0; i < TILE; i++)
        for (int j = 0; j < 4; j++) _mm512_store_ps(&y1[i][s1 * C1 + 16 * j], acc[i][j]);
    }
    /* Layer norm over each sub-pixel's C1 channels, then GELU, rounded to bfloat16. */
    for (int i = 0; i < TILE; i++) {
      for (int s1 = 0; s1 < 4; s1++) {
        const float *v = &y1[i][s1 * C1];
        __m512 v0 = _mm512_load_ps(v), v1 = _mm512_load_ps(v + 16);
        __m512 v2 = _mm512_load_ps(v + 32), v3 = _mm512_load_ps(v + 48);
        float mean = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(v0, v1), _mm512_add_ps(v2, v3))) * (1.0f / C1);
        __m512 m = _mm512_set1_ps(mean);
        v0 = _mm512_sub_ps(v0, m);
        v1 = _mm512_sub_ps(v1, m);
        v2 = _mm512_sub_ps(v2, m);
        v3 = _mm512_sub_ps(v3, m);
        __m512 sq = _mm512_fmadd_ps(v0, v0, _mm512_fmadd_ps(v1, v1, _mm512_fmadd_ps(v2, v2, _mm512_mul_ps(v3, v3))));
        __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) * (1.0f / C1) + eps));
        __m512 g0 = gelu_ps(_mm512_fmadd_ps(_mm512_mul_ps(v0, r), _mm512_loadu_ps(gain), _mm512_loadu_ps(beta)));
        __m512 g1 = gelu_ps(_mm512_fmadd_ps(_mm512_mul_ps(v1, r), _mm512_loadu_ps(gain + 16), _mm512_loadu_ps(beta + 16)));
        __m512 g2 = gelu_ps(_mm512_fmadd_ps(_mm512_mul_ps(v2, r), _mm512_loadu_ps(gain + 32), _mm512_loadu_ps(beta + 32)));
        __m512 g3 = gelu_ps(_mm512_fmadd_ps(_mm512_mul_ps(v3, r), _mm512_loadu_ps(gain + 48), _mm512_loadu_ps(beta + 48)));
        _mm512_store_si512(&h1[i * 4 + s1][0], (__m512i)_mm512_cvtne2ps_pbh(g1, g0));
        _mm512_store_si512(&h1[i * 4 + s1][32], (__m512i)_mm512_cvtne2ps_pbh(g3, g2));
      }
    }
    /* Second convolution (two rows at a time), GELU, and each mask's dot product: register j holds
     * channels 4j..4j+3 x sub-pixels (dy2, dx2), so the products summed over registers and then over
     * the register's four 128-bit quarters give the four sub-pixels' logits. */
    for (int row = 0; row < TILE * 4; row += 2) {
      __m512 acc[2][8];
      for (int a = 0; a < 2; a++)
        for (int j = 0; j < 8; j++) acc[a][j] = _mm512_loadu_ps(b2x + 16 * j);
      for (int kp = 0; kp < C1 / 2; kp++) {
        __m512bh first = broadcast_pair(&h1[row][2 * kp]);
        __m512bh second = broadcast_pair(&h1[row + 1][2 * kp]);
        const uint16_t *w = w2p + kp * (C2 * 4 * 2);
        for (int j = 0; j < 8; j++) {
          __m512bh wj = (__m512bh)_mm512_loadu_si512(w + 32 * j);
          acc[0][j] = _mm512_dpbf16_ps(acc[0][j], first, wj);
          acc[1][j] = _mm512_dpbf16_ps(acc[1][j], second, wj);
        }
      }
      for (int a = 0; a < 2; a++) {
        int r = row + a, i = r / 4, s1 = r % 4;
        if (!valid[i]) continue;
        for (int j = 0; j < 8; j++) acc[a][j] = gelu_ps(acc[a][j]);
        long y = 4 * pixel_row[i] + 2 * (s1 >> 1), xcol = 4 * pixel_col[i] + 2 * (s1 & 1);
        for (int t = 0; t < T; t++) {
          const float *h = hyperx + (long)t * C2 * 4;
          __m512 s = _mm512_mul_ps(acc[a][0], _mm512_loadu_ps(h));
          for (int j = 1; j < 8; j++) s = _mm512_fmadd_ps(acc[a][j], _mm512_loadu_ps(h + 16 * j), s);
          __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
          __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
          float *o = out + t * plane + y * out_w + xcol; /* (dy2, dx2) = (0,0) (0,1) | (1,0) (1,1) */
          _mm_storel_pi((__m64 *)o, s4);
          _mm_storeh_pi((__m64 *)(o + out_w), s4);
        }
      }
    }
  }
}

/* ------------------------------------------------------------------------------------------------
 * The image side's update in a two-way block: every pixel attends to the prompt's few tokens, the
 * attention output is added to the pixel and the sum layer-normed:
 *
 *   logits[p, j] = a1[j] . x[p] + a2[j] . u[p]          j = (token, head), 8 heads
 *   out[p]       = LN(x[p] + sum_j softmax_over_tokens(logits[p])_j v[j])
 *
 * x (n, C) is the image side (also the residual); u (n, K2) each pixel's kept projection (the PE's,
 * with the projection's bias, or the first block's whole query projection, then a1 is absent); a1
 * the token keys folded into the query projection (token . (W x)), a2 the same keys per head on
 * u's head slices, zero elsewhere (block-diagonal); v the tokens' values through the output
 * projection (its bias / 8 on every head's rows). PyTorch runs this as six passes over the (n, C)
 * image side; here a few pixels at a time go through all of it. out may be x itself. */

#define HEADS 8
#define MAX_TOKENS 32

#include "simd_exp.h"

static inline __m512 load_bf16(const uint16_t *p) { /* 16 bfloat16 -> float32 */
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as PyTorch's conversion */
  uint32_t b;
  memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40); /* NaN stays NaN */
  b += 0x7fffu + ((b >> 16) & 1u);
  return (uint16_t)(b >> 16);
}

/* The prompt's operands in the products' layouts (bfloat16 pairs), rows j = token * 8 + head, zero
 * rows up to J = a multiple of 64:
 *   a1p [J/64][C/2][64][2]  a1[j] = keys[h, t] . wq[h's rows]   (the tokens folded into W_q)
 *   a2p [J/64][K2/2][64][2] a2[j] = keys[h, t] on head h's slice of K2, zeros elsewhere
 *   vp  [J/2][C][2]         v[j] = values[h, t]. */
static void pack_prompt(const float *keys, const float *wq, const float *values, int tokens, int C, int K2, int J,
                        uint16_t *a1p, uint16_t *a2p, uint16_t *vp) {
  const int d = K2 / HEADS;
  memset(a2p, 0, sizeof(uint16_t) * (size_t)J * K2);
  memset(vp, 0, sizeof(uint16_t) * (size_t)J * C);
  if (a1p) memset(a1p, 0, sizeof(uint16_t) * (size_t)J * C);
  float row[1024] __attribute__((aligned(64)));
  for (int t = 0; t < tokens; t++) {
    for (int h = 0; h < HEADS; h++) {
      const int j = t * HEADS + h, jb = j / 64, jj = j % 64;
      const float *k = keys + ((long)h * tokens + t) * d;
      for (int e = 0; e < d; e++) a2p[(((long)jb * (K2 / 2) + (h * d + e) / 2) * 64 + jj) * 2 + (e & 1)] = to_bf16(k[e]);
      if (a1p) {
        for (int c0 = 0; c0 < C; c0 += 16) {
          __m512 acc = _mm512_setzero_ps();
          for (int e = 0; e < d; e++) acc = _mm512_fmadd_ps(_mm512_set1_ps(k[e]), _mm512_loadu_ps(wq + (long)(h * d + e) * C + c0), acc);
          _mm512_store_ps(row + c0, acc);
        }
        for (int c = 0; c < C; c++) a1p[(((long)jb * (C / 2) + c / 2) * 64 + jj) * 2 + (c & 1)] = to_bf16(row[c]);
      }
      const float *v = values + ((long)h * tokens + t) * C;
      for (int c = 0; c < C; c++) vp[((long)(j / 2) * C + c) * 2 + (j & 1)] = to_bf16(v[c]);
    }
  }
}

/* keys: (8, tokens, K2/8) float32, the tokens' keys per head (scaled); wq: (K2, C) float32, the query
 * projection's weight (NULL: u is the whole projection, no image part); values: (8, tokens, C) float32.
 * C a multiple of 64 up to 1024, K2 even, tokens <= 32. */
void segany_image_to_tokens_bf16(const uint16_t *x, long n, int C, const uint16_t *u, int K2, const float *keys,
                                 const float *wq, const float *values, int tokens, const float *gain,
                                 const float *beta, float eps, uint16_t *out, int num_threads) {
  const int used = tokens * HEADS, J = 64 * ((used + 63) / 64);
  const long tiles = (n + TILE - 1) / TILE;
  uint16_t *a2p = aligned_alloc(64, sizeof(uint16_t) * ((size_t)J * K2 + 32));
  uint16_t *vp = aligned_alloc(64, sizeof(uint16_t) * ((size_t)J * C + 32));
  uint16_t *a1p = wq ? aligned_alloc(64, sizeof(uint16_t) * ((size_t)J * C + 32)) : NULL;
  if (!a2p || !vp || (wq && !a1p)) {
    free(a2p); free(vp); free(a1p);
    return;
  }
  pack_prompt(keys, wq, values, tokens, C, K2, J, a1p, a2p, vp);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (long tile = 0; tile < tiles; tile++) {
    float logits[TILE][64 * ((MAX_TOKENS * HEADS + 63) / 64)] __attribute__((aligned(64)));
    uint16_t probs[TILE][64 * ((MAX_TOKENS * HEADS + 63) / 64)] __attribute__((aligned(64)));
    float y[TILE][1024] __attribute__((aligned(64)));
    const uint16_t *xs[TILE], *us[TILE];
    long pix[TILE];
    for (int i = 0; i < TILE; i++) {
      long q = tile * TILE + i;
      pix[i] = q < n ? q : -1;
      if (q >= n) q = n - 1;
      xs[i] = x + q * C;
      us[i] = u + q * K2;
    }
    /* Logits, 64 (token, head) rows at a time. */
    for (int jb = 0; jb < J / 64; jb++) {
      __m512 acc[TILE][4];
      for (int i = 0; i < TILE; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
      if (a1p) product_64(acc, xs, a1p + (long)jb * C * 64, C / 2);
      product_64(acc, us, a2p + (long)jb * K2 * 64, K2 / 2);
      for (int i = 0; i < TILE; i++)
        for (int j = 0; j < 4; j++) _mm512_store_ps(&logits[i][jb * 64 + 16 * j], acc[i][j]);
    }
    /* Softmax over the tokens, per head: each token's 8 heads are 8 consecutive values. */
    for (int i = 0; i < TILE; i++) {
      __m256 m = _mm256_loadu_ps(&logits[i][0]);
      for (int t = 1; t < tokens; t++) m = _mm256_max_ps(m, _mm256_loadu_ps(&logits[i][t * HEADS]));
      __m512 m2 = _mm512_insertf32x8(_mm512_castps256_ps512(m), m, 1);
      __m512 sum2 = _mm512_setzero_ps();
      for (int t = 0; t < tokens; t += 2) { /* two tokens per register; a missing second one masked */
        __mmask16 live = t + 1 < tokens ? 0xFFFF : 0x00FF;
        __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(_mm512_load_ps(&logits[i][t * HEADS]), m2)));
        _mm512_store_ps(&logits[i][t * HEADS], e);
        sum2 = _mm512_add_ps(sum2, e);
      }
      __m256 sum = _mm256_add_ps(_mm512_castps512_ps256(sum2), _mm512_extractf32x8_ps(sum2, 1));
      __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
      __m512 inv2 = _mm512_insertf32x8(_mm512_castps256_ps512(inv), inv, 1);
      for (int j = 0; j < J; j += 32) { /* (rows past the tokens hold zeros: zero rows of a1, a2) */
        __m512 lo = _mm512_mul_ps(_mm512_load_ps(&logits[i][j]), inv2);
        __m512 hi = _mm512_mul_ps(_mm512_load_ps(&logits[i][j + 16]), inv2);
        _mm512_store_si512(&probs[i][j], (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
    /* x + probs . v, 64 channels at a time. */
    const int j_pairs = used / 2;
    for (int c0 = 0; c0 < C; c0 += 64) {
      __m512 acc[TILE][4];
      for (int i = 0; i < TILE; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = load_bf16(xs[i] + c0 + 16 * j);
      for (int jp = 0; jp < j_pairs; jp++) {
        const uint16_t *vk = vp + (long)jp * C * 2 + 2 * c0;
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(vk);
        __m512bh v1 = (__m512bh)_mm512_loadu_si512(vk + 32);
        __m512bh v2 = (__m512bh)_mm512_loadu_si512(vk + 64);
        __m512bh v3 = (__m512bh)_mm512_loadu_si512(vk + 96);
        for (int i = 0; i < TILE; i++) {
          __m512bh b = broadcast_pair(&probs[i][2 * jp]);
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], b, v0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], b, v1);
          acc[i][2] = _mm512_dpbf16_ps(acc[i][2], b, v2);
          acc[i][3] = _mm512_dpbf16_ps(acc[i][3], b, v3);
        }
      }
      for (int i = 0; i < TILE; i++)
        for (int j = 0; j < 4; j++) _mm512_store_ps(&y[i][c0 + 16 * j], acc[i][j]);
    }
    /* Layer norm over the C channels, written as bfloat16. */
    for (int i = 0; i < TILE; i++) {
      if (pix[i] < 0) continue;
      __m512 s = _mm512_setzero_ps();
      for (int c = 0; c < C; c += 16) s = _mm512_add_ps(s, _mm512_load_ps(&y[i][c]));
      __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / C);
      __m512 sq = _mm512_setzero_ps();
      for (int c = 0; c < C; c += 16) {
        __m512 d = _mm512_sub_ps(_mm512_load_ps(&y[i][c]), mean);
        sq = _mm512_fmadd_ps(d, d, sq);
      }
      __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / C + eps));
      uint16_t *o = out + pix[i] * C;
      for (int c = 0; c < C; c += 32) {
        __m512 lo = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(&y[i][c]), mean), r),
                                    _mm512_loadu_ps(gain + c), _mm512_loadu_ps(beta + c));
        __m512 hi = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(&y[i][c + 16]), mean), r),
                                    _mm512_loadu_ps(gain + c + 16), _mm512_loadu_ps(beta + c + 16));
        _mm512_storeu_si512(o + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  }
  free(a1p);
  free(a2p);
  free(vp);
}

/* ------------------------------------------------------------------------------------------------
 * Mask logits resized to the image: SAM's two bilinear steps (the low-res logits up to the model's
 * input frame, the padding cropped, then to the image size) as their composite. Each step is
 * separable and each output sample of the second step reads two samples of the first, which read
 * two neighbouring low-res samples each: per axis, every output is a weighted sum of three
 * consecutive low-res samples (the weights computed by the caller, segany.predict.transforms). The
 * full-size intermediate frame of the two-step resize is never formed.
 *
 * low:      (M, LH, LW) float32 logits.
 * rows:     [out_h][3] low-res row of each tap; row_w [out_h][3] their weights.
 * col_base: [blocks] for each 16 output columns the first low-res column they read;
 *           col_off [3][blocks * 16] each tap's column relative to its block's base (0..15),
 *           col_w [3][blocks * 16] the weights (zero past out_w).
 * out:      (M, out_h, out_w) float32, or bytes 0/1 (logit > threshold) with as_bool. */
void segany_resize_masks(const float *low, int M, int LH, int LW, const int *rows, const float *row_w,
                         const int *col_base, const int *col_off, const float *col_w, int out_h, int out_w,
                         float threshold, int as_bool, void *out, int num_threads) {
  const int blocks = (out_w + 15) / 16;
  const long lines = (long)M * out_h;
  (void)LH;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (long line = 0; line < lines; line++) {
    const int m = (int)(line / out_h), y = (int)(line % out_h);
    float v[1024 + 32] __attribute__((aligned(64))); /* this output row, resampled vertically */
    const float *mask = low + (long)m * LH * LW;
    const float *r0 = mask + (long)rows[3 * y] * LW, *r1 = mask + (long)rows[3 * y + 1] * LW, *r2 = mask + (long)rows[3 * y + 2] * LW;
    const __m512 w0 = _mm512_set1_ps(row_w[3 * y]), w1 = _mm512_set1_ps(row_w[3 * y + 1]), w2 = _mm512_set1_ps(row_w[3 * y + 2]);
    int c = 0;
    for (; c + 16 <= LW; c += 16)
      _mm512_store_ps(v + c, _mm512_fmadd_ps(w2, _mm512_loadu_ps(r2 + c), _mm512_fmadd_ps(w1, _mm512_loadu_ps(r1 + c), _mm512_mul_ps(w0, _mm512_loadu_ps(r0 + c)))));
    for (; c < LW; c++) v[c] = row_w[3 * y] * r0[c] + row_w[3 * y + 1] * r1[c] + row_w[3 * y + 2] * r2[c];
    for (; c < LW + 32; c++) v[c] = 0.0f;
    for (int b = 0; b < blocks; b++) {
      const int x0 = 16 * b;
      const __m512 window = _mm512_loadu_ps(v + col_base[b]);
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(col_w + x0), _mm512_permutexvar_ps(_mm512_loadu_si512(col_off + x0), window));
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(col_w + (long)blocks * 16 + x0),
                            _mm512_permutexvar_ps(_mm512_loadu_si512(col_off + (long)blocks * 16 + x0), window), acc);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(col_w + 2L * blocks * 16 + x0),
                            _mm512_permutexvar_ps(_mm512_loadu_si512(col_off + 2L * blocks * 16 + x0), window), acc);
      const int left = out_w - x0;
      const __mmask16 keep = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
      if (as_bool) {
        __mmask16 above = _mm512_cmp_ps_mask(acc, _mm512_set1_ps(threshold), _CMP_GT_OQ);
        _mm_mask_storeu_epi8((uint8_t *)out + line * out_w + x0, keep, _mm_maskz_mov_epi8(above, _mm_set1_epi8(1)));
      } else {
        _mm512_mask_storeu_ps((float *)out + line * out_w + x0, keep, acc);
      }
    }
  }
}
