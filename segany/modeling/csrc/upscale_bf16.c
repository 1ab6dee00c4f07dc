/* SAM's mask upscaling and hypernetwork product in one pass, bfloat16 on AVX-512 BF16.
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
      const uint16_t *w = w1p + (long)s1 * k_pairs * C1 * 2;
      for (int kp = 0; kp < k_pairs; kp++) {
        const uint16_t *wk = w + (long)kp * C1 * 2;
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
