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

int segany_attention_abi(void) { return 1; }

static inline __m512 exp_ps(__m512 a) { /* exp(a) for a <= 0 (Cephes' expf, about 1 ulp) */
  a = _mm512_max_ps(a, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), a);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 load16(const void *base, long i, __mmask16 m, int bf16) {
  if (bf16) {
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, (const float *)base + i);
}

/* float32 -> bfloat16, round to nearest even (PyTorch's conversion; NaN stays NaN). */
static inline __m256i to_bf16(__m512 v) {
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, b, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

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
