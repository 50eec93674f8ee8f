/* grapefx's CPU noise kernel: out (+)= std * z, z ~ N(0, 1), in one pass over the gradient.
 *
 * Bits: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11), the counter-based generator of cuRAND
 * and JAX; checked against Random123's known-answer vectors in tests/test_native_noise.py.
 * Block b of a draw has counter (b_lo, b_hi, stream_lo, stream_hi) and key (seed_lo, seed_hi), so
 * every element is a pure function of (seed, stream, index): no generator state to carry, and
 * checkpoints hold two integers.
 * Normals: Box–Muller on each block's words (x0, x1, x2, x3), four terms per block:
 *   term 0 = r cos(2π v1), term 1 = r sin(2π v1),  r = sqrt(-2 ln u0)
 *   term 2 = s cos(2π v3), term 3 = s sin(2π v3),  s = sqrt(-2 ln u2)
 * with u = (x + 1/2) / 2^32 for the radius (in (0, 1): no log of 0, tails to 6.7 σ) and v = x / 2^32
 * for the angle. Elements come in groups of 64 from 16 consecutive blocks: element 64 g + 16 k + l
 * is term k of block 16 g + l (so the stores are contiguous and vectorize).
 * tests/philox_reference.py is the same definition in torch ops.
 *
 * Built at first use with -O3 -march=native -ffast-math (grapefx/privacy/native_noise.py): the
 * Box–Muller loops then call glibc's vector math (libmvec), the Philox rounds use AVX2 when present.
 * torch's own CPU normal_ (mt19937 + Box–Muller, then a separate add) costs ~4x more per element.
 */
#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define BLOCKS 16 /* Philox blocks per batch: two AVX2 registers of 32-bit lanes */

/* One Philox4x32-10 block, in place (the known-answer tests call this). */
void grapefx_philox4x32_10(uint32_t ctr[4], const uint32_t key[2]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = (uint32_t)p1;
    c2 = n2;
    c3 = (uint32_t)p0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  ctr[0] = c0;
  ctr[1] = c1;
  ctr[2] = c2;
  ctr[3] = c3;
}

#ifdef __AVX2__
/* 8 lanes of 32x32 -> 64-bit products, split into high and low words. */
static inline void mulhilo8(__m256i m, __m256i c, __m256i *hi, __m256i *lo) {
  __m256i even = _mm256_mul_epu32(c, m);                       /* lanes 0, 2, 4, 6 */
  __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m); /* lanes 1, 3, 5, 7 */
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

static void philox8(const uint32_t *lo, const uint32_t *hi, uint64_t stream, uint64_t seed, uint32_t *x[4]) {
  __m256i c0 = _mm256_loadu_si256((const __m256i *)lo), c1 = _mm256_loadu_si256((const __m256i *)hi);
  __m256i c2 = _mm256_set1_epi32((int)(uint32_t)stream), c3 = _mm256_set1_epi32((int)(uint32_t)(stream >> 32));
  __m256i k0 = _mm256_set1_epi32((int)(uint32_t)seed), k1 = _mm256_set1_epi32((int)(uint32_t)(seed >> 32));
  const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
  const __m256i w0 = _mm256_set1_epi32((int)PHILOX_W0), w1 = _mm256_set1_epi32((int)PHILOX_W1);
  for (int r = 0; r < 10; r++) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, c0, &hi0, &lo0);
    mulhilo8(m1, c2, &hi1, &lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
    c3 = lo0;
    k0 = _mm256_add_epi32(k0, w0);
    k1 = _mm256_add_epi32(k1, w1);
  }
  _mm256_storeu_si256((__m256i *)x[0], c0);
  _mm256_storeu_si256((__m256i *)x[1], c1);
  _mm256_storeu_si256((__m256i *)x[2], c2);
  _mm256_storeu_si256((__m256i *)x[3], c3);
}
#endif

/* Words x[j][l] of blocks first .. first + BLOCKS - 1 of a draw. */
static void philox_batch(uint64_t first, uint64_t stream, uint64_t seed, uint32_t x[4][BLOCKS]) {
  uint32_t lo[BLOCKS], hi[BLOCKS];
  for (int l = 0; l < BLOCKS; l++) {
    lo[l] = (uint32_t)(first + l);
    hi[l] = (uint32_t)((first + l) >> 32);
  }
#ifdef __AVX2__
  for (int h = 0; h < BLOCKS; h += 8) {
    uint32_t *rows[4] = {x[0] + h, x[1] + h, x[2] + h, x[3] + h};
    philox8(lo + h, hi + h, stream, seed, rows);
  }
#else
  const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
  for (int l = 0; l < BLOCKS; l++) {
    uint32_t c[4] = {lo[l], hi[l], (uint32_t)stream, (uint32_t)(stream >> 32)};
    grapefx_philox4x32_10(c, key);
    for (int j = 0; j < 4; j++) x[j][l] = c[j];
  }
#endif
}

/* sin t is computed as cos(t - pi/2), all four terms in one loop over cos: with separate sin and cos
 * calls on the same angle GCC fuses them into a scalar sincos; one cos loop vectorizes (libmvec). */
#define DEFINE_NORMAL(NAME, T, LOG, SQRT, COS)                                                    \
  void NAME(T *out, int64_t n, uint64_t seed, uint64_t stream, T std, int accumulate) {           \
    uint32_t x[4][BLOCKS];                                                                         \
    T radius[4 * BLOCKS], angle[4 * BLOCKS], z[4 * BLOCKS];                                        \
    const T scale = (T)2.3283064365386963e-10; /* 2^-32 */                                         \
    const T two_pi = (T)6.283185307179586, half_pi = (T)1.5707963267948966;                        \
    for (int64_t first = 0; 4 * first < n; first += BLOCKS) {                                      \
      philox_batch((uint64_t)first, stream, seed, x);                                              \
      for (int l = 0; l < BLOCKS; l++) {                                                           \
        T r0 = SQRT((T)-2 * LOG(((T)x[0][l] + (T)0.5) * scale));                                   \
        T r2 = SQRT((T)-2 * LOG(((T)x[2][l] + (T)0.5) * scale));                                   \
        T t1 = two_pi * ((T)x[1][l] * scale), t3 = two_pi * ((T)x[3][l] * scale);                  \
        radius[l] = r0, angle[l] = t1;                                                             \
        radius[BLOCKS + l] = r0, angle[BLOCKS + l] = t1 - half_pi;                                 \
        radius[2 * BLOCKS + l] = r2, angle[2 * BLOCKS + l] = t3;                                   \
        radius[3 * BLOCKS + l] = r2, angle[3 * BLOCKS + l] = t3 - half_pi;                         \
      }                                                                                            \
      for (int k = 0; k < 4 * BLOCKS; k++) z[k] = radius[k] * COS(angle[k]);                       \
      int64_t base = 4 * first, m = n - base < 4 * BLOCKS ? n - base : 4 * BLOCKS;                \
      if (accumulate)                                                                              \
        for (int64_t i = 0; i < m; i++) out[base + i] += std * z[i];                               \
      else                                                                                         \
        for (int64_t i = 0; i < m; i++) out[base + i] = std * z[i];                                \
    }                                                                                              \
  }

DEFINE_NORMAL(grapefx_normal_f32, float, logf, sqrtf, cosf)
DEFINE_NORMAL(grapefx_normal_f64, double, log, sqrt, cos)
