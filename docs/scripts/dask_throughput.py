"""Sequences per second of ss.run_sequences on a dask bag: 1 worker vs 2 worker processes.

    python docs/scripts/dask_throughput.py [n_sequences] [hidden]

Each worker is one process with one Dask thread and one statescan thread; the weights are
shipped to every worker once (a picklable nn.LSTM layer) and the sequences are on the workers
before the timing starts; every result is checked against the serial run bit for bit.
"""
import logging
import os
import sys
import time

import numpy as np
from dask import bag as db
from distributed import Client, LocalCluster, wait

import statescan as ss
from statescan import nn


REPEATS = 3          # the best of three timed runs: other processes on the machine add noise


def score(sequences, layer):
    """One partition: continuous batching over its sequences, the final hidden states."""
    return [h[-1] for _, (h, _) in ss.run_sequences(layer, list(sequences), batch_size=32)]


def main(n=2000, hidden=128, inputs=64, partitions=16):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(100), 0.6, n).astype(int), 1, 1000)
    sequences = [rng.standard_normal((t, inputs)).astype(np.float32) for t in lengths]
    layer = nn.LSTM(inputs, hidden, num_layers=2, seed=0)
    ss.set_num_threads(1)
    seconds = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        serial = score(sequences, layer)
        seconds.append(time.perf_counter() - t0)
    rates = {"serial (this process, 1 thread)": n / min(seconds)}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            client.run(ss.set_num_threads, 1)
            [weights] = client.scatter([layer], broadcast=True)
            # the sequences live on the workers before the clock starts (as when each worker
            # reads its own files): the timing is the scoring, not the transfer from here
            bag = db.from_sequence(sequences, npartitions=partitions).persist()
            wait(bag)
            bag.map_partitions(score, weights).compute()          # warm-up: imports, caches
            seconds = []
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                got = bag.map_partitions(score, weights).compute()
                seconds.append(time.perf_counter() - t0)
            rates[f"{workers} worker(s)"] = n / min(seconds)
            assert all(np.array_equal(a, b) for a, b in zip(got, serial, strict=True))
    print(f"{n} sequences, lengths median {int(np.median(lengths))} max {lengths.max()}, "
          f"2-layer LSTM H={hidden}, float32; {os.cpu_count()} logical CPUs, load average "
          f"{os.getloadavg()[0]:.1f} (other processes competing for the cores)")
    for name, rate in rates.items():
        print(f"  {name:34s} {rate:8.1f} sequences/s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
