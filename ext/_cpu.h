/* The ISA extensions this translation unit was compiled for, and those the running CPU has,
 * named alike so that statescan._dispatch can compare them.  x86: the names
 * __builtin_cpu_supports takes; arm64: the names of /proc/cpuinfo's "Features" line (the
 * runtime side of arm64 is read from there, in Python).
 *
 * The list holds what a compiler may emit for plain float/integer C code under
 * -march=native / -mcpu=native.  Extensions outside it (f16c, lzcnt, movbe on x86) come with
 * every CPU that has avx2, so checking avx2 covers them.  setup.py preprocesses this file with
 * the native flag to write statescan/_ext/native/_features.py: keep one string per line. */
#ifndef STATESCAN_CPU_H
#define STATESCAN_CPU_H

static const char *const statescan_compiled_isa[] = {
#if defined(__SSE2__)
    "sse2",
#endif
#if defined(__SSE3__)
    "sse3",
#endif
#if defined(__SSSE3__)
    "ssse3",
#endif
#if defined(__SSE4_1__)
    "sse4.1",
#endif
#if defined(__SSE4_2__)
    "sse4.2",
#endif
#if defined(__POPCNT__)
    "popcnt",
#endif
#if defined(__AVX__)
    "avx",
#endif
#if defined(__AVX2__)
    "avx2",
#endif
#if defined(__FMA__)
    "fma",
#endif
#if defined(__BMI__)
    "bmi",
#endif
#if defined(__BMI2__)
    "bmi2",
#endif
#if defined(__AVX512F__)
    "avx512f",
#endif
#if defined(__AVX512CD__)
    "avx512cd",
#endif
#if defined(__AVX512VL__)
    "avx512vl",
#endif
#if defined(__AVX512BW__)
    "avx512bw",
#endif
#if defined(__AVX512DQ__)
    "avx512dq",
#endif
#if defined(__AVX512IFMA__)
    "avx512ifma",
#endif
#if defined(__AVX512VBMI__)
    "avx512vbmi",
#endif
#if defined(__AVX512VBMI2__)
    "avx512vbmi2",
#endif
#if defined(__AVX512VNNI__)
    "avx512vnni",
#endif
#if defined(__AVX512BITALG__)
    "avx512bitalg",
#endif
#if defined(__AVX512VPOPCNTDQ__)
    "avx512vpopcntdq",
#endif
#if defined(__AVX512BF16__)
    "avx512bf16",
#endif
#if defined(__GFNI__)
    "gfni",
#endif
#if defined(__VPCLMULQDQ__)
    "vpclmulqdq",
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
    "asimd",
#endif
#if defined(__ARM_FEATURE_QRDMX)
    "asimdrdm",
#endif
#if defined(__ARM_FEATURE_DOTPROD)
    "asimddp",
#endif
#if defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
    "asimdhp",
#endif
#if defined(__ARM_FEATURE_ATOMICS)
    "atomics",
#endif
#if defined(__ARM_FEATURE_MATMUL_INT8)
    "i8mm",
#endif
#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
    "bf16",
#endif
#if defined(__ARM_FEATURE_SVE)
    "sve",
#endif
#if defined(__ARM_FEATURE_SVE2)
    "sve2",
#endif
    0
};

/* Fills `out` (room for 64) with the compiled-for extensions; returns how many. */
static int statescan_compiled_features(const char **out) {
    int n = 0;
    while (statescan_compiled_isa[n]) {
        out[n] = statescan_compiled_isa[n];
        n++;
    }
    return n;
}

/* Fills `out` (room for 64) with the extensions of the running CPU (and enabled by the OS)
 * from the list above; returns how many, or -1 when this compiler/architecture cannot ask. */
static int statescan_runtime_features(const char **out) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    int n = 0;
    __builtin_cpu_init();
#define STATESCAN_HAS(name) if (__builtin_cpu_supports(name)) out[n++] = name;
    STATESCAN_HAS("sse2") STATESCAN_HAS("sse3") STATESCAN_HAS("ssse3") STATESCAN_HAS("sse4.1")
    STATESCAN_HAS("sse4.2") STATESCAN_HAS("popcnt") STATESCAN_HAS("avx") STATESCAN_HAS("avx2")
    STATESCAN_HAS("fma") STATESCAN_HAS("bmi") STATESCAN_HAS("bmi2") STATESCAN_HAS("avx512f")
    STATESCAN_HAS("avx512cd") STATESCAN_HAS("avx512vl") STATESCAN_HAS("avx512bw")
    STATESCAN_HAS("avx512dq") STATESCAN_HAS("avx512ifma") STATESCAN_HAS("avx512vbmi")
    STATESCAN_HAS("avx512vbmi2") STATESCAN_HAS("avx512vnni") STATESCAN_HAS("avx512bitalg")
    STATESCAN_HAS("avx512vpopcntdq") STATESCAN_HAS("avx512bf16") STATESCAN_HAS("gfni")
    STATESCAN_HAS("vpclmulqdq")
#undef STATESCAN_HAS
    return n;
#else
    (void)out;
    return -1;
#endif
}

static int statescan_openmp(void) {
#if defined(_OPENMP)
    return _OPENMP;
#else
    return 0;
#endif
}

#endif
