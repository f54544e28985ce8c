"""Written by setup.py: the ISA extensions the native kernels were compiled for."""
FLAGS = ('-march=native',)
FEATURES = ('sse2', 'sse3', 'ssse3', 'sse4.1', 'sse4.2', 'popcnt', 'avx', 'avx2', 'fma', 'bmi', 'bmi2', 'avx512f', 'avx512cd', 'avx512vl', 'avx512bw', 'avx512dq', 'avx512ifma', 'avx512vbmi', 'avx512vbmi2', 'avx512vnni', 'avx512bitalg', 'avx512vpopcntdq', 'avx512bf16', 'gfni', 'vpclmulqdq')
