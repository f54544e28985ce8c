"""The column split of the RNN forward (a team of threads per (row block, head) job, each
member owning some hidden units, one barrier per step): bit-identical to the row split and to
itself for any thread count, the same as the numpy reference within tolerance, with lengths,
reverse and resets, and chosen automatically for one sequence on several threads.

The compiled kernel is called directly with its `block` argument (-1 forces the column split,
0 is the automatic choice, > 0 rows per job): small shapes then exercise every path quickly."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import statescan as ss
from statescan import _dispatch
from statescan._reference import rnn as reference
from conftest import CELL_SIZES, CELLS, assert_all_close, assert_all_equal, using_threads

pytestmark = pytest.mark.skipif(not _dispatch.compiled_available(),
                                reason="compiled kernels not built")

DTYPES = (np.float32, np.float64)
# (B, H, heads): one row; B not a multiple of anything; H not a multiple of the 32-unit panel
# (the members' columns are gathered, and the last member's panel is partial); a head of 33
# units (one member gets one unit); several heads (with 2 threads: fewer threads than jobs)
SHAPES = [(1, 64, 1), (3, 100, 1), (2, 66, 2), (1, 33, 1), (1, 128, 4)]
SPLITS = [(-1, 1), (-1, 2), (-1, 3), (0, 2), (0, 3), (1, 3)]     # (block, threads)


def _problem(cell, B, T, H, heads, dtype, seed=0):
    G, S = CELL_SIZES[cell]
    D = H // heads
    rng = np.random.default_rng(seed)
    ax = rng.standard_normal((B, T, G * H)).astype(dtype)
    R = (rng.standard_normal((heads, G * D, D)) / np.sqrt(D)).astype(dtype)
    b_r = (0.5 * rng.standard_normal(G * H)).astype(dtype)
    state0 = (0.5 * rng.standard_normal((S, B, H))).astype(dtype)
    if cell == "slstm":
        state0[2] = 1 + rng.random((B, H))     # a normaliser reached after a step
    return ax, R, b_r, state0


def _forward(cell, ax, R, b_r, state0, block, threads, lengths=None, reverse=False,
             reset=None):
    """The compiled forward with every state saved: (seq, ar_seq, final state)."""
    B, T, _ = ax.shape
    seq = np.full((state0.shape[0], B, T, state0.shape[2]), np.nan, ax.dtype)
    ar_seq = np.full_like(ax, np.nan)
    state_out = np.full_like(state0, np.nan)
    _dispatch.ext_module("rnn").forward(cell, ax, R, b_r, state0, True, lengths, reverse,
                                        reset, block, seq, ar_seq, state_out, threads)
    return seq, ar_seq, state_out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-heads{}".format(*s))
@pytest.mark.parametrize("cell", CELLS)
def test_column_split_is_bit_identical_to_the_row_split(cell, shape, dtype):
    B, H, heads = shape
    args = _problem(cell, B, 9, H, heads, dtype)
    rows = _forward(cell, *args, block=0, threads=1)
    for block, threads in SPLITS:
        assert_all_equal(_forward(cell, *args, block=block, threads=threads), rows,
                         what=f"block={block} threads={threads}")
    expected = reference.forward(cell, *args, True)
    assert_all_close(rows, expected, dtype, tol=1e-4 if dtype == np.float32 else 1e-11,
                     what="reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_column_split_with_lengths_reverse_and_resets(cell, dtype):
    B, T, H = 5, 7, 100
    args = _problem(cell, B, T, H, 1, dtype, seed=1)
    lengths = np.array([7, 0, 3, 1, 5], np.int64)
    reset = np.random.default_rng(2).random((B, T)) < 0.3
    reset[:, 0] = [True, False, True, False, False]          # a reset before the first step
    for kw in (dict(lengths=lengths), dict(lengths=lengths, reverse=True), dict(reset=reset),
               dict(lengths=lengths, reverse=True, reset=reset)):
        rows = _forward(cell, *args, block=0, threads=1, **kw)
        for block, threads in ((-1, 1), (-1, 2), (-1, 3)):
            assert_all_equal(_forward(cell, *args, block=block, threads=threads, **kw), rows,
                             what=f"{sorted(kw)} block={block} threads={threads}")
        expected = reference.forward(cell, *args, True, kw.get("lengths"),
                                     kw.get("reverse", False), kw.get("reset"))
        assert_all_close(rows, expected, dtype, tol=1e-4 if dtype == np.float32 else 1e-11,
                         what=f"reference {sorted(kw)}")


def test_rows_per_job_override_gives_the_same_bits():
    args = _problem("lstm", 11, 5, 48, 1, np.float64)
    rows = _forward("lstm", *args, block=0, threads=1)
    for block in (1, 3, 8, 11, 50):
        assert_all_equal(_forward("lstm", *args, block=block, threads=2), rows,
                         what=f"block={block}")


@pytest.mark.parametrize("cell", CELLS)
def test_one_sequence_on_several_threads_through_the_public_api(cell):
    """B=1 with a hidden size large enough for the automatic rule to split the columns: the
    functions and a stream give the bits of one thread for 1, 2 and 3 threads."""
    G, S = CELL_SIZES[cell]
    H, I = 256, 8
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 6, I)).astype(np.float32)
    W = (rng.standard_normal((G * H, I)) / np.sqrt(I)).astype(np.float32)
    R = (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(np.float32)
    b = (0.1 * rng.standard_normal(G * H)).astype(np.float32)
    fn = getattr(ss, cell)
    outs = {}
    for n in (1, 2, 3):
        with using_threads(n):
            y, state = fn(x, W, R, b)
            s = ss.stream(fn, W, R, b)
            st = None
            steps = []
            for t in range(x.shape[1]):
                y_t, st = s(x[:, t:t + 1], st)
                steps.append(y_t)
            outs[n] = (y, np.concatenate(steps, axis=1))
    for n in (2, 3):
        assert_all_equal(outs[n], outs[1], what=f"{n} threads")
    assert_all_equal((outs[1][1],), (outs[1][0],), what="stream vs one call")


def test_teams_form_from_the_threads_openmp_gives(tmp_path):
    """OpenMP may give a region fewer threads than asked (OMP_THREAD_LIMIT, OMP_DYNAMIC): the
    teams are formed from the threads present, so nothing waits for a member that does not
    exist, and the bits stay those of one thread."""
    script = tmp_path / "limited.py"
    script.write_text(
        "import numpy as np\n"
        "from statescan import _dispatch\n"
        "import test_rnn_columns as t\n"
        "for cell in t.CELLS:\n"
        "    for B, H, heads in ((1, 96, 1), (2, 64, 2)):\n"
        "        args = t._problem(cell, B, 5, H, heads, np.float64)\n"
        "        rows = t._forward(cell, *args, block=0, threads=1)\n"
        "        for block, threads in ((-1, 3), (0, 3), (-1, 8)):\n"
        "            t.assert_all_equal(t._forward(cell, *args, block=block, threads=threads),\n"
        "                               rows, what=f'{cell} block={block}')\n"
        "print('ok')\n")
    tests_dir = str(pathlib.Path(__file__).parent)
    env = dict(os.environ, OMP_THREAD_LIMIT="2",
               PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tests_dir)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.fixture
def handover():
    """The compiled module's hand-over hook (rnn._force_handover), switched off afterwards."""
    force = _dispatch.ext_module("rnn")._force_handover
    yield force
    force()


# (step, member): the barrier before the first step, one in the middle, the one after the
# last step (T = 7 below: nothing is left to run alone); member 0, another member, or (-1)
# whichever arrives last takes over
HANDOVERS = [(-1, 0), (-1, 1), (-1, -1), (0, 1), (3, 0), (3, 2), (3, -1), (5, 1), (6, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
def test_handover_to_one_member_gives_the_same_bits(cell, dtype, handover):
    """A busy machine makes a team hand its job to one member at a step's barrier (forced here
    through the test hook): that member runs every part's remaining steps, with lengths,
    reverse and resets, and the results stay the bits of one thread."""
    B, T = 5, 7
    lengths = np.array([7, 0, 3, 1, 5], np.int64)
    reset = np.random.default_rng(2).random((B, T)) < 0.3
    reset[:, 0] = [True, False, True, False, False]
    for H, heads in ((100, 1), (128, 2)):      # gathered panels, whole panels with two heads
        args = _problem(cell, B, T, H, heads, dtype, seed=3)
        for kw in ({}, dict(lengths=lengths, reverse=True, reset=reset), dict(reset=reset)):
            rows = _forward(cell, *args, block=0, threads=1, **kw)
            for step, member in HANDOVERS:
                handover(step, member)
                for threads in (2, 3, 4):
                    assert_all_equal(_forward(cell, *args, block=-1, threads=threads, **kw),
                                     rows, what=f"H={H} {sorted(kw)} handover at {step} to "
                                                f"{member}, {threads} threads")
                handover()


def test_handover_hook_reaches_every_team(handover):
    """The hook hands over every team's job, and the hook counts them: four heads (jobs) of
    two panels each on eight threads, teams of two.  (Without the hook the count is not
    checked: a busy machine may hand jobs over by itself.)"""
    args = _problem("gru", 1, 20, 256, 4, np.float64, seed=4)
    rows = _forward("gru", *args, block=0, threads=1)
    handover(4, 1)
    assert_all_equal(_forward("gru", *args, block=-1, threads=8), rows, what="handover")
    assert handover() == 4


def test_busy_calls_keep_the_next_calls_on_one_thread(handover):
    """Calls that found the machine busy make the automatic rule leave the column split for a
    while (10 ms, doubled per busy call up to 1 s: 640 ms after the seven forced here, far
    longer than the calls below take); the hook's reset brings the split back.  Same bits."""
    args = _problem("lstm", 1, 8, 256, 1, np.float32)
    rows = _forward("lstm", *args, block=0, threads=1)
    handover(2, -1, busy=True)
    for _ in range(7):          # block=-1 forces the split whatever the rule says
        assert_all_equal(_forward("lstm", *args, block=-1, threads=2), rows, what="busy")
    assert handover(2, 0) == 7
    assert_all_equal(_forward("lstm", *args, block=0, threads=2), rows, what="paused")
    assert handover(2, 0) == 0      # no team: the rule ran the sequence on one thread
    handover()
    handover(2, 0)
    assert_all_equal(_forward("lstm", *args, block=0, threads=2), rows, what="split again")
    assert handover() == 1
