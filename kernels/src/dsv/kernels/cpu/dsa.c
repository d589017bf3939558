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

/* Linear bins of the first selection pass (see select_top). */
#define SELECT_BINS 256

/* Order-preserving map of a float to an unsigned key: a > b  <=>  key(a) > key(b), and equal
 * floats get equal keys (-0.0 is +0.0's key, as torch compares them). */
static inline uint32_t order_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Radix select on a subset: the `need` largest of score[cand[0..nc)] (cand ascending) into sel;
 * among equal values the lower indices win. 8 bits a pass from the top: each pass keeps only the
 * keys in the bin that holds the need-th largest. cand is overwritten; key is scratch indexed by
 * the key position. */
static void radix_select(const float *score, int32_t *cand, int64_t nc, int64_t need, uint32_t *key, int32_t *sel) {
    int64_t hist[256];
    int64_t m = 0;
    for (int64_t i = 0; i < nc; i++) key[cand[i]] = order_key(score[cand[i]]);
    for (int shift = 24; shift >= 0 && nc > 0; shift -= 8) {
        memset(hist, 0, sizeof hist);
        for (int64_t i = 0; i < nc; i++) hist[(key[cand[i]] >> shift) & 255u]++;
        const int64_t left = need - m;
        int64_t above = 0;
        int bin = 255;
        while (above + hist[bin] < left) above += hist[bin--];
        int64_t kept = 0;
        for (int64_t i = 0; i < nc; i++) {
            const int32_t c = cand[i];
            const uint32_t digit = (key[c] >> shift) & 255u;
            if (digit > (uint32_t)bin) sel[m++] = c;
            else if (digit == (uint32_t)bin) cand[kept++] = c;  /* kept <= i: in place */
        }
        nc = kept;
        if (m + nc == need) break;  /* the boundary bin is taken whole */
    }
    /* Whatever is left has one key (or fills need exactly): the lowest indices first. */
    for (int64_t i = 0; m < need; i++) sel[m++] = cand[i];
}

/* The indices of the n largest of score[0..T) into sel, in no particular order; among equal values
 * the lower indices win: the rule of every dsv backend (dsv.core.attention.select_topk_reference),
 * so which one ran does not change the selection.
 *
 * One pass for the range, one that bins every score linearly between its minimum and maximum
 * (a monotone map, so a higher bin holds only larger scores) and counts the bins, one that takes
 * every key above the bin holding the n-th largest and lists that bin's keys; the boundary bin,
 * a handful of keys when the scores are spread, is settled by radix_select. Scores with a NaN or
 * an infinity, or no spread at all, go to radix_select whole (its order puts NaN above +inf, as
 * torch.topk does). key and cand are scratch of T each. */
static void select_top(const float *score, int64_t T, int64_t n, uint32_t *key, int32_t *cand, int32_t *sel) {
    if (n >= T) {
        for (int64_t t = 0; t < T; t++) sel[t] = (int32_t)t;
        return;
    }
    float lo = score[0], hi = score[0];
    int odd = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : odd)
    for (int64_t t = 0; t < T; t++) {
        const float v = score[t];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        odd |= (v != v) | (v - v != 0.0f); /* NaN or infinity */
    }
    const float scale = (float)(SELECT_BINS - 1) / (hi - lo);
    if (!odd && hi == lo) { /* all equal: the lowest indices */
        for (int64_t t = 0; t < n; t++) sel[t] = (int32_t)t;
        return;
    }
    if (odd || !(scale < INFINITY)) {
        for (int64_t t = 0; t < T; t++) cand[t] = (int32_t)t;
        radix_select(score, cand, T, n, key, sel);
        return;
    }
    int32_t hist[SELECT_BINS];
    memset(hist, 0, sizeof hist);
#pragma omp simd
    for (int64_t t = 0; t < T; t++) {
        const int32_t b = (int32_t)((score[t] - lo) * scale); /* >= 0: score[t] >= lo */
        key[t] = (uint32_t)(b < SELECT_BINS - 1 ? b : SELECT_BINS - 1);
    }
    for (int64_t t = 0; t < T; t++) hist[key[t]]++;
    int64_t above = 0;
    uint32_t bin = SELECT_BINS - 1;
    while (above + hist[bin] < n) above += hist[bin--];
    int64_t m = 0, nc = 0;
    for (int64_t t = 0; t < T; t++) {
        if (key[t] > bin) sel[m++] = (int32_t)t;
        else if (key[t] == bin) cand[nc++] = (int32_t)t;
    }
    if (m + nc == n) {
        for (int64_t i = 0; i < nc; i++) sel[m++] = cand[i];
    } else {
        radix_select(score, cand, nc, n - m, key, sel + m);
    }
}

/* e^x for x <= 0 (softmax numerators, x = logit - max), in a form the compiler vectorises:
 * x = k ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes' expf coefficients,
 * within 2 ulp of expf) and 2^k put into the exponent bits. Below -87.3 it returns 2^-126 times
 * the polynomial instead of a denormal or 0: a weight below 1e-37 next to the maximum's 1. */
static inline float exp_nonpositive(float x) {
    x = x < -87.3f ? -87.3f : x; /* (not max: a NaN stays a NaN) */
    const float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* Processes queries s0 <= s < s1 of every row (the caller walks S in chunks, so that raw stays in
 * cache); every other argument covers all S queries.
 * raw   [B, s1 - s0, HI, TR]  q_index . k_index for every index head and key t < TR (a torch bmm
 *                      upstream); TR covers every key these queries see
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
                              int64_t s0, int64_t s1, int64_t HI, int64_t T, int64_t TR, int64_t H, int64_t D,
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
            const float *raw_r = raw + (b * (s1 - s0) + (s - s0)) * HI * TR;
            const float *w_r = w + row * HI;
            for (int64_t t = 0; t < visible; t++) score[t] = 0.0f;
            for (int64_t h = 0; h < HI; h++) {
                const float wh = w_r[h];
                const float *rh = raw_r + h * TR;
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
             * per head, several times the traffic once it leaves L1). Copying the picked rows
             * transposed, so the logits need no horizontal sums, was slower at 4 heads x 40 dims. */
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
#pragma omp simd reduction(max : m)
                for (int64_t j = 0; j < n; j++) m = l_h[j] > m ? l_h[j] : m;
#pragma omp simd reduction(+ : total)
                for (int64_t j = 0; j < n; j++) {
                    const float e = exp_nonpositive(l_h[j] - m);
                    l_h[j] = e;
                    total += e;
                }
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
