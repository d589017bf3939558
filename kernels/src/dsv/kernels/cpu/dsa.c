/* DeepSeek Sparse Attention on the CPU, one call per layer: the lightning indexer's head-weighted
 * sum, causal masking, top-k selection and sparse attention over the selected latent rows.
 *
 * Built and loaded by dsv/kernels/cpu/__init__.py (see there for shapes and the Python contract);
 * the torch reference it is tested against is the chain dsv.core.attention.indexer_scores ->
 * select_topk -> sparse_mla. fp32 throughout, one thread.
 *
 * Why it exists: at decode a small model's layer spends most of its time in the per-op overhead of
 * that chain (about 25 torch ops per layer for a few microseconds of arithmetic each); here the same
 * work is one pass per query row, with the scores kept in L1.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Order-preserving map of a float to an unsigned key: a > b  <=>  key(a) > key(b), and equal
 * floats get equal keys (-0.0 is +0.0's key, as torch compares them). */
static inline uint32_t order_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The indices of the n largest of score[0..T) into sel, in no particular order; among equal values
 * the lower indices win: the rule of every dsv backend (dsv.core.attention.select_topk_reference),
 * so which one ran does not change the selection. Radix select, 8 bits a pass from the top: each pass keeps only the keys in
 * the bin that holds the n-th largest, so the work is O(T) plus a few passes over a short list.
 * key and cand are scratch of T each. */
static void select_top(const float *score, int64_t T, int64_t n, uint32_t *key, int32_t *cand, int32_t *sel) {
    if (n >= T) {
        for (int64_t t = 0; t < T; t++) sel[t] = (int32_t)t;
        return;
    }
    int64_t hist[256];
    int64_t m = 0, nc = T;  /* selected so far; candidates left (cand[0..nc), ascending indices) */
    for (int64_t t = 0; t < T; t++) {
        key[t] = order_key(score[t]);
        cand[t] = (int32_t)t;
    }
    for (int shift = 24; shift >= 0 && nc > 0; shift -= 8) {
        memset(hist, 0, sizeof hist);
        for (int64_t i = 0; i < nc; i++) hist[(key[cand[i]] >> shift) & 255u]++;
        const int64_t need = n - m;
        int64_t above = 0;
        int bin = 255;
        while (above + hist[bin] < need) above += hist[bin--];
        int64_t kept = 0;
        for (int64_t i = 0; i < nc; i++) {
            const int32_t c = cand[i];
            const uint32_t digit = (key[c] >> shift) & 255u;
            if (digit > (uint32_t)bin) sel[m++] = c;
            else if (digit == (uint32_t)bin) cand[kept++] = c;  /* kept <= i: in place */
        }
        nc = kept;
        if (m + nc == n) break;  /* the boundary bin is taken whole */
    }
    /* Whatever is left has one key (or fills n exactly): the lowest indices first. */
    for (int64_t i = 0; m < n; i++) sel[m++] = cand[i];
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* Processes queries s0 <= s < s1 of every row (the caller walks S in chunks, so that raw stays in
 * cache); every other argument covers all S queries.
 * raw   [B, s1 - s0, HI, T]  q_index . k_index for every index head and key (a torch bmm upstream)
 * w     [B, S, HI]     index head weights, scales folded in
 * q_off [B]            absolute position of each row's first query; key t is visible to query s
 *                      of row b iff t <= q_off[b] + s
 * q     [B, S, H, D]   absorbed queries (latent + rope dims)
 * kv    row b, key t at kv + b * kv_sb + t * kv_st, D contiguous floats; values are the first DV
 * out   [B, S, H, DV]  attention output;  lse [B, S, H] natural-log log-sum-exp
 * idx   [B, S, K]      selected keys (order unspecified), -1 past the visible count
 * With out == NULL only idx is written (the selection; q, kv and lse are not read).
 * Returns 0, or -1 when scratch memory could not be allocated. */
int dsv_dsa_sparse_attend_f32(const float *raw, const float *w, const int64_t *q_off, const float *q,
                              const float *kv, int64_t kv_sb, int64_t kv_st, int64_t B, int64_t S,
                              int64_t s0, int64_t s1, int64_t HI, int64_t T, int64_t H, int64_t D,
                              int64_t DV, int64_t K, float sm_scale, float *out, float *lse, int32_t *idx) {
    /* scratch: scores [T], radix keys [T], candidates [T], selection [K], logits [H, K] */
    float *score = (float *)malloc(sizeof(float) * (size_t)(T + H * K + 1));
    uint32_t *key = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(T + 1));
    int32_t *cand = (int32_t *)malloc(sizeof(int32_t) * (size_t)(T + K + 1));
    if (score == NULL || key == NULL || cand == NULL) {
        free(score);
        free(key);
        free(cand);
        return -1;
    }
    float *logit = score + T;
    int32_t *sel = cand + T;
    for (int64_t b = 0; b < B; b++) {
        const float *kv_b = kv + b * kv_sb;
        for (int64_t s = s0; s < s1; s++) {
            const int64_t row = b * S + s;
            int64_t visible = q_off[b] + s + 1;
            if (visible > T) visible = T;
            if (visible < 0) visible = 0;

            /* Indexer: score[t] = sum_h w[h] * relu(raw[h, t]) over the visible keys. */
            const float *raw_r = raw + (b * (s1 - s0) + (s - s0)) * HI * T;
            const float *w_r = w + row * HI;
            for (int64_t t = 0; t < visible; t++) score[t] = 0.0f;
            for (int64_t h = 0; h < HI; h++) {
                const float wh = w_r[h];
                const float *rh = raw_r + h * T;
                /* (a compare, not fmaxf: that is a libm call per element unless -ffast-math) */
#pragma omp simd
                for (int64_t t = 0; t < visible; t++) score[t] += wh * (rh[t] > 0.0f ? rh[t] : 0.0f);
            }

            /* Top-k of the visible keys. */
            const int64_t n = visible < K ? visible : K;
            select_top(score, visible, n, key, cand, sel);
            int32_t *idx_r = idx + row * K;
            for (int64_t j = 0; j < n; j++) idx_r[j] = sel[j];
            for (int64_t j = n; j < K; j++) idx_r[j] = -1;

            if (out == NULL) continue; /* selection only */

            /* Sparse attention, every head over the same n latent rows. Rows outer, heads inner:
             * each gathered row is read once for all heads (heads outer re-read the whole selection
             * per head, several times the traffic once it leaves L1). */
            const float *q_r = q + row * H * D;
            float *out_r = out + row * H * DV;
            float *lse_r = lse + row * H;
            for (int64_t j = 0; j < n; j++) {
                const float *v = kv_b + (int64_t)sel[j] * kv_st;
                for (int64_t h = 0; h < H; h++) logit[h * K + j] = dot(q_r + h * D, v, D) * sm_scale;
            }
            for (int64_t h = 0; h < H; h++) {
                float *l_h = logit + h * K;
                float m = -INFINITY, total = 0.0f;
                for (int64_t j = 0; j < n; j++) m = l_h[j] > m ? l_h[j] : m;
                for (int64_t j = 0; j < n; j++) total += (l_h[j] = expf(l_h[j] - m));
                const float inv = 1.0f / total;
                for (int64_t j = 0; j < n; j++) l_h[j] *= inv; /* now the probabilities */
                lse_r[h] = n > 0 ? m + logf(total) : -INFINITY;
            }
            for (int64_t i = 0; i < H * DV; i++) out_r[i] = 0.0f;
            for (int64_t j = 0; j < n; j++) {
                const float *v = kv_b + (int64_t)sel[j] * kv_st;
                for (int64_t h = 0; h < H; h++) {
                    const float p = logit[h * K + j];
                    float *out_h = out_r + h * DV;
#pragma omp simd
                    for (int64_t d = 0; d < DV; d++) out_h[d] += p * v[d];
                }
            }
        }
    }
    free(score);
    free(key);
    free(cand);
    return 0;
}
