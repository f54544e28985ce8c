"""Fused RNN cells (forward, forward+backward, W x given), float32 and float64.

The cases are statescan bench's ``rnn`` family (statescan/_bench/rnn_cases.py)."""
FAMILY = "rnn"


def test_rnn(run_case, case):
    run_case(case)
