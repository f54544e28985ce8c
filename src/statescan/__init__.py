"""statescan: fast CPU kernels for computations that carry a state along a sequence.

Arrays in, arrays out (numpy), batch-first ``[B, T, ...]``, float32 or float64.
"""
from ._dispatch import backend, set_backend, set_num_threads, get_num_threads
from .autodiff import vjp
from .rnn import lstm, gru, elman, slstm

__version__ = "0.1.0"

__all__ = ["lstm", "gru", "elman", "slstm", "vjp",
           "backend", "set_backend", "set_num_threads", "get_num_threads"]
