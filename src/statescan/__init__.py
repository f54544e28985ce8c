"""statescan: fast CPU kernels for computations that carry a state along a sequence.

Arrays in, arrays out (numpy), batch-first ``[B, T, ...]``, float32 or float64.  Every stateful
function takes ``state=`` and returns the final state; ``lengths=`` handles padded batches.

Recurrent cells        lstm, gru, elman, slstm; stream (one step per call, weights packed once)
Linear recurrences     linear_scan, selective_scan (Mamba), ssd (Mamba-2), linear_attention
Convolution, attention causal_conv1d, attention (O(T) memory)
Parallel in time       matrix_scan, solve_recurrence; solver= in the cells
Many sequences         run_sequences (continuous batching)
Gradients              vjp
Threads and backends   set_num_threads, get_num_threads, threads, set_backend, backend,
                       build_info, set_cache_limit, tune (time and cache blocking parameters)
Layers and models      statescan.nn (LSTM, GRU, RNN, SLSTM, Mamba, Mamba2, MambaLM)
"""
from ._dispatch import backend, set_backend, set_num_threads, get_num_threads, build_info
from ._threads import threads
from ._memory import set_cache_limit
from .tune import tune
from .autodiff import vjp
from .rnn import lstm, gru, elman, slstm, stream
from .scan import linear_scan, selective_scan
from .linear_attention import linear_attention
from .ssd import ssd
from .attention import attention
from .conv import causal_conv1d
from .parallel import matrix_scan, solve_recurrence
from .batching import run_sequences

__version__ = "0.1.0"

__all__ = ["lstm", "gru", "elman", "slstm", "stream", "linear_scan", "selective_scan", "vjp",
           "linear_attention", "ssd", "attention", "matrix_scan", "solve_recurrence",
           "backend", "set_backend", "set_num_threads", "get_num_threads", "threads", "build_info",
           "set_cache_limit", "run_sequences", "causal_conv1d", "tune"]
