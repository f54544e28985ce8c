"""Chunked linear attention (with decay), Mamba-2's SSD, softmax attention.

The cases are statescan bench's ``attention`` family (statescan/_bench/attention_cases.py)."""
FAMILY = "attention"


def test_attention(run_case, case):
    run_case(case)
