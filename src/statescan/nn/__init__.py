"""Models built on statescan's kernels: PyTorch-compatible recurrent stacks and Mamba blocks.

Arrays in, arrays out (numpy, batch-first); no deep-learning framework at run time.
"""
from .rnn import LSTM, GRU, RNN, SLSTM, LayerStream
from .mamba import Mamba, Mamba2, MambaCache
from .lm import MambaLM
