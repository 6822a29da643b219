/* The processor's float32 arithmetic ceiling, against which the matmul peaks of benchmarks.run
 * (a 4096² product in each library) can be read: every thread runs 12 independent chains of
 * 256-bit fused multiply-adds (enough to cover the FMA latency of AVX2 cores), nothing else.
 * AVX-512 cores can do twice this; the program does not use AVX-512.
 *
 *     gcc -O2 -mavx2 -mfma -fopenmp benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * Also prints the clock a dependent chain of integer adds (one a cycle) runs at.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define CHAIN(i) a##i = _mm256_fmadd_ps(a##i, scale, shift)

int main(void) {
    const long steps = 100000000L;  /* per thread; 12 FMAs of 8 lanes each */
    double best = 0.0;
    for (int repeat = 0; repeat < 3; repeat++) {
        double start = seconds();
        float sink = 0.0f;
#pragma omp parallel reduction(+ : sink)
        {
            __m256 scale = _mm256_set1_ps(0.999999f), shift = _mm256_set1_ps(1e-7f);
            __m256 a0 = _mm256_set1_ps(0.f), a1 = _mm256_set1_ps(1.f), a2 = _mm256_set1_ps(2.f),
                   a3 = _mm256_set1_ps(3.f), a4 = _mm256_set1_ps(4.f), a5 = _mm256_set1_ps(5.f),
                   a6 = _mm256_set1_ps(6.f), a7 = _mm256_set1_ps(7.f), a8 = _mm256_set1_ps(8.f),
                   a9 = _mm256_set1_ps(9.f), a10 = _mm256_set1_ps(10.f), a11 = _mm256_set1_ps(11.f);
            for (long k = 0; k < steps; k++) {
                CHAIN(0); CHAIN(1); CHAIN(2); CHAIN(3); CHAIN(4); CHAIN(5);
                CHAIN(6); CHAIN(7); CHAIN(8); CHAIN(9); CHAIN(10); CHAIN(11);
            }
            __m256 total = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                           _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
            total = _mm256_add_ps(total, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
            sink += _mm256_cvtss_f32(total);  /* keeps the chains alive */
        }
        double flops = 2.0 * 8 * 12 * steps * omp_get_max_threads();
        double rate = flops / (seconds() - start);
        if (rate > best) best = rate;
        if (sink == 1234.5f) puts("");
    }
    const long adds = 2000000000L;
    long counter = 0;
    double start = seconds();
    for (long i = 0; i < adds; i++) __asm__ volatile("add $1, %0" : "+r"(counter));
    double clock = adds / (seconds() - start);
    printf("float32 FMA peak %.1f GFLOP/s on %d threads; clock about %.2f GHz\n", best / 1e9,
           omp_get_max_threads(), clock / 1e9);
    return counter == adds ? 0 : 1;
}
