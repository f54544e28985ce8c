"""The GEMM micro-kernel of ext/_microkernel.pxd alone, in GFLOP/s and as a fraction of the
core's FMA peak, on the LSTM's shapes (issue 12's measurement).

    python tools/microkernel_bench.py [--ext DIR] [--portable] [--reps N] [SHAPE ...]
    python tools/microkernel_bench.py --march skylake-avx512 --build-only   # compiles only

SHAPE is proj:H:N[:KC] (x[N, H] @ W^T[H, 4H] in jobs of 64 rows, as `project` runs it; KC > 0:
in slices of KC rows of each panel, matmul_store_kblocked) or rec:H:B (out[B, 4H] += h[B, H] @
R^T, one call of matmul_acc: a recurrent step).  The default: the projection at H = 256 and
1024 for a few hundred rows, the recurrent step for B = 1, 4, 16, 64.

The kernel's C (the verbatim block of the .pxd, from --ext: default this tree's ext/, or an
old copy for an A/B) is compiled into a small C program with setup.py's optimisation flags
(-march=native; --march ARCH, e.g. an AVX-512 target to check that its path compiles on a
machine without it; --portable: the baseline ISA) and run on the calling thread's CPUs (pin
it: taskset -c 1 python tools/...).  Each shape's time is the best of --reps calls (wall
clock: a call is short, so the best one ran without being preempted), and the peak is the
best of an FMA loop on registers (12 independent chains of the kernel's vector type)
measured between the calls: the ratio stays meaningful while the VM's clock drifts.  numpy's
sgemm (one thread) on the same product for reference.  Packed matrices come from
ss_panel_alloc as in the library (huge pages where available).
"""
import argparse
import ast
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # before numpy loads its BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = ["proj:256:192", "proj:256:704:128", "proj:1024:192:128",
                  "rec:256:1", "rec:256:4", "rec:256:16", "rec:256:64",
                  "rec:1024:1", "rec:1024:4", "rec:1024:16", "rec:1024:64"]

MAIN_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float* filled(size_t n, int huge) {
    float* p = huge ? ss_panel_alloc(n * sizeof(float)) : malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = (float)rand() / RAND_MAX - 0.5f;
    return p;
}

/* 12 independent multiply-add chains on registers: the core's FMA rate */
static volatile float sink;
static double peak(void) {
    double best = 0;
    for (int trial = 0; trial < 20; trial++) {
        ss_vf acc[12], b = (ss_vf){0} + 1.0000001f, c = (ss_vf){0} + 1e-7f;
        for (int i = 0; i < 12; i++) acc[i] = (ss_vf){0} + (float)i;
        double t = now();
        for (long n = 0; n < 100000; n++)
            for (int i = 0; i < 12; i++) acc[i] = acc[i] * b + c;
        t = now() - t;
        float s = 0;
        for (int i = 0; i < 12; i++) s += ((float*)&acc[i])[0];
        sink = s;
        double rate = 100000.0 * 12 * 2 * (SS_VBYTES / sizeof(float)) / t / 1e9;
        if (rate > best) best = rate;
    }
    return best;
}

/* out[N, M] = x[N, K] @ W^T as rnn.pyx's project_job: 64-row jobs, kc > 0: panel slices */
static void project(const float* x, const float* wp, float* out, Py_ssize_t N, Py_ssize_t K,
                    Py_ssize_t M, Py_ssize_t kc) {
    Py_ssize_t nt = M / SS_NT;
    for (Py_ssize_t r0 = 0; r0 < N; r0 += 64) {
        Py_ssize_t nr = N - r0 < 64 ? N - r0 : 64;
        if (kc <= 0) {
            ss_matmul_store_f(x + r0 * K, K, wp, K, nt, NULL, out + r0 * M, M, nr);
            continue;
        }
        for (Py_ssize_t t = 0; t < nt; t++)
            for (Py_ssize_t k0 = 0; k0 < K; k0 += kc) {
                Py_ssize_t n = K - k0 < kc ? K - k0 : kc;
                int mode = k0 == 0 ? (n == K ? SS_STORE : SS_FIRST)
                                   : (k0 + n == K ? SS_LAST : SS_MID);
                ss_matmul_part_f(x + r0 * K + k0, K, wp + (t * K + k0) * SS_NT, n, NULL,
                                 out + r0 * M + t * SS_NT, M, nr, mode);
            }
    }
}

int main(int argc, char** argv) {
    int reps = atoi(argv[1]);
    for (int s = 2; s < argc; s++) {
        char kind[8];
        long H, N, kc = 0;
        if (sscanf(argv[s], "%7[a-z]:%ld:%ld:%ld", kind, &H, &N, &kc) < 3) return 2;
        Py_ssize_t K = H, M = 4 * H, nt = M / SS_NT;
        float* W = filled((size_t)M * K, 0);
        float* wp = ss_panel_alloc((size_t)nt * K * SS_NT * sizeof(float));
        for (Py_ssize_t t = 0; t < nt; t++)
            ss_pack_t_f(W + t * SS_NT * K, K, K, SS_NT, wp + t * K * SS_NT);
        float* x = filled((size_t)N * K, 0);
        float* out = filled((size_t)N * M, 0);
        double best = 1e30, pk = 0;
        for (int rep = 0; rep < reps; rep++) {
            if (rep % 25 == 0) {
                double p = peak();
                if (p > pk) pk = p;
            }
            if (strcmp(kind, "rec") == 0)
                memset(out, 0, (size_t)N * M * sizeof(float));   /* stays finite */
            double t = now();
            if (strcmp(kind, "proj") == 0) project(x, wp, out, N, K, M, kc);
            else ss_matmul_acc_f(x, K, wp, K, nt, out, M, N);
            t = now() - t;
            if (t < best) best = t;
        }
        printf("%s %.3f %.3f\n", argv[s], 2.0 * N * K * M / best / 1e9, pk);
        fflush(stdout);
        ss_huge_free(wp);
        free(W); free(x); free(out);
    }
    return 0;
}
"""


def kernel_source(ext):
    """The C of _microkernel.pxd's verbatim block (a Python string literal in the .pxd)."""
    text = (Path(ext) / "_microkernel.pxd").read_text()
    start = text.index('"""')
    end = text.index('"""', start + 3) + 3
    return ast.literal_eval(text[start:end])


def build(ext, march, workdir):
    src = Path(workdir, "mk_bench.c")
    src.write_text("#include <stddef.h>\n#include <sys/types.h>\ntypedef ssize_t Py_ssize_t;\n"
                   + kernel_source(ext) + MAIN_C)
    exe = Path(workdir, "mk_bench")
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    if march:
        flags.append(f"-march={march}")
    subprocess.run([os.environ.get("CC", "gcc"), *flags, "-I", str(ext), str(src), "-o", str(exe)],
                   check=True)
    return exe


def numpy_rate(shape, reps):
    kind, H, N = shape.split(":")[:3]
    H, N = int(H), int(N)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((N, H)).astype(np.float32)
    wt = rng.standard_normal((H, 4 * H)).astype(np.float32)
    out = np.empty((N, 4 * H), np.float32)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.matmul(a, wt, out=out)
        best = min(best, time.perf_counter() - t)
    return 2.0 * N * H * 4 * H / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shapes", nargs="*", default=DEFAULT_SHAPES)
    p.add_argument("--ext", default=str(HERE / "ext"), help="directory of _microkernel.pxd")
    p.add_argument("--portable", action="store_true", help="without -march")
    p.add_argument("--march", default="native", help="the compiler's -march (default native)")
    p.add_argument("--build-only", action="store_true", help="compile, do not run")
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(args.ext, None if args.portable else args.march, tmp)
        if args.build_only:
            return 0
        print(f"{'shape':<20} {'GFLOP/s':>8} {'FMA peak':>9} {'%peak':>6} {'numpy':>7}")
        for shape in args.shapes:
            line = subprocess.run([str(exe), str(args.reps), shape], check=True,
                                  capture_output=True, text=True).stdout.split()
            rate, pk = float(line[1]), float(line[2])
            print(f"{shape:<20} {rate:8.1f} {pk:9.1f} {100 * rate / pk:5.0f}% "
                  f"{numpy_rate(shape, args.reps):7.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
