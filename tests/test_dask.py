"""Scale-out on Dask: a real LocalCluster with two worker processes; every result equals the
serial one bit for bit.  Deselect with ``-m "not dask"``."""
import logging
import sys

import numpy as np
import pytest

import statescan as ss
from statescan import nn

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")
cloudpickle = pytest.importorskip("cloudpickle")

pytestmark = pytest.mark.dask

# The workers cannot import this file (tests/ is not a package on their path): ship the
# functions below by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

B, T, I, H = 24, 30, 8, 16


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        client.run(ss.set_num_threads, 1)       # one kernel thread per worker process
        yield client


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((4 * H, I)) * 0.3).astype(np.float32)
    R = (rng.standard_normal((4 * H, H)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(4 * H) * 0.1).astype(np.float32)
    return W, R, b


def _sequences(n=40, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(t), I)).astype(np.float32)
            for t in rng.integers(0, 3 * T, n)]


def _ship(client, obj):
    """One future for `obj` held by every worker (a bare tuple would be scattered per item).

    hash=False gives every scatter its own key: re-scattering an object whose key the
    cluster already holds (the same weights in the next test) could hang with broadcast."""
    [future] = client.scatter([obj], broadcast=True, hash=False, timeout=120)
    return future


def _lstm_block(x, weights):
    W, R, b = weights
    return ss.lstm(x, W, R, b)[0]


def _layer_block(x, layer):
    return layer(x)[0]


def _score_partition(sequences, fn, weights):
    return ss.run_sequences(fn, list(sequences), *weights, batch_size=8)


def _threads_here(_):
    return ss.get_num_threads()


def test_each_worker_got_the_weights_once_and_one_thread(client, weights):
    future = _ship(client, weights)
    assert len(client.who_has([future])[future.key]) == 2
    assert set(client.run(ss.get_num_threads).values()) == {1}
    counts = client.gather(client.map(_threads_here, range(4), pure=False))
    assert counts == [1, 1, 1, 1]


def test_kernel_over_a_dask_array_equals_serial(client, weights):
    x = np.random.default_rng(2).standard_normal((B, T, I)).astype(np.float32)
    expected = ss.lstm(x, *weights)[0]
    future = _ship(client, weights)
    xd = da.from_array(x, chunks=(B // 4, T, I))
    yd = xd.map_blocks(_lstm_block, future, chunks=(xd.chunks[0], (T,), (H,)),
                       dtype=np.float32)
    y = yd.compute()
    assert y.dtype == np.float32 and np.array_equal(y, expected)


def test_layer_over_a_dask_array_equals_serial(client):
    layer = nn.GRU(I, H, num_layers=2, bidirectional=True, seed=3)
    x = np.random.default_rng(4).standard_normal((B, T, I)).astype(np.float32)
    expected = layer(x)[0]
    future = client.scatter(layer, broadcast=True, hash=False, timeout=120)       # layers pickle
    xd = da.from_array(x, chunks=(B // 3, T, I))
    y = xd.map_blocks(_layer_block, future, chunks=(xd.chunks[0], (T,), (2 * H,)),
                      dtype=np.float32).compute()
    assert np.array_equal(y, expected)


def test_run_sequences_over_a_dask_bag_equals_serial(client, weights):
    sequences = _sequences()
    expected = ss.run_sequences(ss.lstm, sequences, *weights, batch_size=8)
    future = _ship(client, weights)
    bag = db.from_sequence(sequences, npartitions=4)
    got = bag.map_partitions(_score_partition, ss.lstm, future).compute()
    assert len(got) == len(expected)
    for (y, (h, c)), (y0, (h0, c0)) in zip(got, expected):
        assert np.array_equal(y, y0) and np.array_equal(h, h0) and np.array_equal(c, c0)


def test_layer_run_sequences_over_a_dask_bag_equals_serial(client):
    layer = nn.LSTM(I, H, num_layers=2, seed=5)
    sequences = _sequences(seed=6)
    expected = ss.run_sequences(layer, sequences, batch_size=8)
    future = client.scatter(layer, broadcast=True, hash=False, timeout=120)
    got = db.from_sequence(sequences, npartitions=3).map_partitions(
        _score_partition, future, ()).compute()
    for (y, (h, c)), (y0, (h0, c0)) in zip(got, expected, strict=True):
        assert np.array_equal(y, y0) and np.array_equal(h, h0) and np.array_equal(c, c0)
