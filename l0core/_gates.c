/* Fused CPU kernels for l0core's hard-concrete gates: each is one pass over its tensors where
 * eager torch makes 6 to 19 (see l0core/native.py, which builds this file on first use and keeps
 * the eager implementations in l0core.functional as the reference and the fallback).
 *
 * All tensors are contiguous float32. Every element is computed on its own, so the results do
 * not depend on the number of threads. */
#include <math.h>
#include <stdint.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL

/* splitmix64's output function (Steele, Lea & Flood 2014) for one state. */
static inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* The gate of element i (flat index) with logit la: the uniform noise of l0core.functional's
 * uniform_noise (the 32-bit half i & 1 of splitmix64's output for key + (i / 2 + 1) * golden, as
 * u = 1/2 + k * scale), then z = clamp(sigmoid((logit(u) + la) / beta) * span + a, 0, 1). */
static inline float gate(int64_t i, float la, uint64_t key, float scale, float inv_beta, float a,
                         float span) {
    uint64_t r = splitmix64(key + (uint64_t)((i >> 1) + 1) * GOLDEN);
    int32_t k = (int32_t)(uint32_t)(r >> ((i & 1) * 32));
    float u = 0.5f + (float)k * scale;
    float x = (logf(u / (1.0f - u)) + la) * inv_beta;
    float v = span / (1.0f + expf(-x)) + a;
    return fminf(fmaxf(v, 0.0f), 1.0f);
}

/* Gates z (rows x cols) from logits la (cols), one row after another (per-sample gates share
 * la across rows); the noise continues across rows like one flat draw of rows * cols. With p
 * (not NULL, rows 1), also p = P(z != 0) = sigmoid(la - shift) for the L0 penalty, in the same
 * pass over la. */
void l0_draw(const float *restrict la, float *restrict z, float *restrict p, int64_t rows,
             int64_t cols, uint64_t key, float scale, float inv_beta, float a, float span,
             float shift, int nthreads) {
    if (rows == 1 && p != 0) {
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
        for (int64_t j = 0; j < cols; j++) {
            z[j] = gate(j, la[j], key, scale, inv_beta, a, span);
            p[j] = 1.0f / (1.0f + expf(shift - la[j]));
        }
        return;
    }
    if (rows == 1) {
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
        for (int64_t j = 0; j < cols; j++)
            z[j] = gate(j, la[j], key, scale, inv_beta, a, span);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *zr = z + r * cols;
        int64_t base = r * cols;
#pragma omp simd
        for (int64_t j = 0; j < cols; j++)
            zr[j] = gate(base + j, la[j], key, scale, inv_beta, a, span);
    }
}

/* dz/dlog_alpha from z alone: (z - a)(b - z) c with c = 1 / ((b - a) beta) where 0 < z < 1, and
 * 0 where the clamp holds z at 0 or 1. */
static inline float dgate(float z, float a, float b, float c) {
    return (z > 0.0f && z < 1.0f) ? (z - a) * (b - z) * c : 0.0f;
}

/* grad *= dz/dlog_alpha, in place (n elements). */
void l0_gate_grad(float *restrict grad, const float *restrict z, int64_t n, float a, float b,
                  float c, int nthreads) {
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++)
        grad[i] *= dgate(z[i], a, b, c);
}

/* The two gradients of one masked weight w * z from g = dL/d(w * z), in one pass:
 * gla = g * w * dz/dlog_alpha and (unless gw is NULL) gw = g * z. */
void l0_masked_grads(const float *restrict g, const float *restrict w, const float *restrict z,
                     float *restrict gla, float *restrict gw, int64_t n, float a, float b,
                     float c, int nthreads) {
    if (gw == 0) {
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i++)
            gla[i] = g[i] * w[i] * dgate(z[i], a, b, c);
        return;
    }
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        gla[i] = g[i] * w[i] * dgate(z[i], a, b, c);
        gw[i] = g[i] * z[i];
    }
}
