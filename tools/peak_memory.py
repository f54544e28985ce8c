"""Peak memory of an LSTM call, in units of its output size (issue 13's measurement).

    python tools/peak_memory.py {fwd,vjp} {float32,float64} [--B 16 --T 2048 --H 512]

Runs one ``ss.lstm`` forward, or ``ss.vjp(ss.lstm, ...)`` and its pullback, in this fresh
process and prints the peak RSS increase over the RSS just before the call (Linux: the
high-water mark is reset through /proc/self/clear_refs) divided by the size of y.  The
kernel memory cache is turned off so freed blocks do not count.
"""
import argparse
import time

import numpy as np

import statescan as ss
from statescan import _memory


def _status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("fwd", "vjp"))
    p.add_argument("dtype", choices=("float32", "float64"))
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=512)
    a = p.parse_args()
    dt, B, T, H = np.dtype(a.dtype), a.B, a.T, a.H
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, H), dtype=dt)
    W = rng.standard_normal((4 * H, H), dtype=dt) * 0.05
    R = rng.standard_normal((4 * H, H), dtype=dt) * 0.05
    b = np.zeros(4 * H, dt)
    dy = rng.standard_normal((B, T, H), dtype=dt)
    _memory.set_cache_limit(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                  # reset the RSS high-water mark
    base = _status_mb("VmRSS:")
    t0 = time.perf_counter()
    if a.mode == "fwd":
        ss.lstm(x, W, R, b)
    else:
        _, pullback = ss.vjp(ss.lstm, x, W, R, b)
        pullback((dy, None))
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM:") - base
    out_mb = dy.nbytes / 2**20
    print(f"lstm {a.mode} {dt} B={B} T={T} H={H}: output {out_mb:.1f} MB, peak increase "
          f"{peak:.1f} MB = {peak / out_mb:.2f}x the output ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
