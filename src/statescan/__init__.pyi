# Type hints of statescan's public API (PEP 561; the package ships py.typed).  The runtime
# signatures are checked against these by tests/test_docs.py, so the two cannot drift.
from contextlib import AbstractContextManager
from typing import Any, Callable, Literal, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

from . import nn as nn

__version__: str
__all__: list[str]

Array = np.ndarray
State = Any                 # an array, or a tuple of arrays (LSTM: (h, c); sLSTM: (h, c, n, m))
Solver = Literal["sequential", "newton", "quasi-newton", "jacobi"]

def lstm(x: ArrayLike, W: Optional[ArrayLike], R: ArrayLike, b: Optional[ArrayLike] = None,
         b_r: Optional[ArrayLike] = None, *, heads: int = 1, state: State = None,
         lengths: Optional[ArrayLike] = None, reverse: bool = False,
         reset: Optional[ArrayLike] = None, solver: Solver = "sequential",
         tol: Optional[float] = None, max_iter: Optional[int] = None,
         guess: Optional[ArrayLike] = None) -> Tuple[Any, ...]: ...
def gru(x: ArrayLike, W: Optional[ArrayLike], R: ArrayLike, b: Optional[ArrayLike] = None,
        b_r: Optional[ArrayLike] = None, *, heads: int = 1, state: State = None,
        lengths: Optional[ArrayLike] = None, reverse: bool = False,
        reset: Optional[ArrayLike] = None, solver: Solver = "sequential",
        tol: Optional[float] = None, max_iter: Optional[int] = None,
        guess: Optional[ArrayLike] = None) -> Tuple[Any, ...]: ...
def elman(x: ArrayLike, W: Optional[ArrayLike], R: ArrayLike, b: Optional[ArrayLike] = None,
          b_r: Optional[ArrayLike] = None, *, heads: int = 1, state: State = None,
          lengths: Optional[ArrayLike] = None, reverse: bool = False,
          reset: Optional[ArrayLike] = None, solver: Solver = "sequential",
          tol: Optional[float] = None, max_iter: Optional[int] = None,
          guess: Optional[ArrayLike] = None) -> Tuple[Any, ...]: ...
def slstm(x: ArrayLike, W: Optional[ArrayLike], R: ArrayLike, b: Optional[ArrayLike] = None,
          b_r: Optional[ArrayLike] = None, *, heads: int = 1, state: State = None,
          lengths: Optional[ArrayLike] = None, reverse: bool = False,
          reset: Optional[ArrayLike] = None, solver: Solver = "sequential",
          tol: Optional[float] = None, max_iter: Optional[int] = None,
          guess: Optional[ArrayLike] = None) -> Tuple[Any, ...]: ...
def stream(fn: Callable[..., Any], W: Optional[ArrayLike], R: ArrayLike,
           b: Optional[ArrayLike] = None, b_r: Optional[ArrayLike] = None, *,
           heads: int = 1) -> Callable[..., Tuple[Array, State]]: ...

def linear_scan(a: ArrayLike, b: ArrayLike, state: Optional[ArrayLike] = None, *,
                lengths: Optional[ArrayLike] = None, reverse: bool = False,
                reset: Optional[ArrayLike] = None, **deprecated: Any) -> Array: ...
def selective_scan(x: ArrayLike, dt: ArrayLike, A: ArrayLike, B: ArrayLike, C: ArrayLike,
                   D: Optional[ArrayLike] = None, *, z: Optional[ArrayLike] = None,
                   dt_bias: Optional[ArrayLike] = None, dt_softplus: bool = False,
                   state: Optional[ArrayLike] = None, lengths: Optional[ArrayLike] = None,
                   reverse: bool = False, reset: Optional[ArrayLike] = None,
                   out_state: Optional[Array] = None) -> Tuple[Array, Array]: ...
def causal_conv1d(x: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike] = None, *,
                  activation: Optional[Literal["silu"]] = None,
                  state: Optional[ArrayLike] = None, lengths: Optional[ArrayLike] = None,
                  reset: Optional[ArrayLike] = None,
                  out_state: Optional[Array] = None) -> Tuple[Array, Array]: ...
def linear_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *,
                     decay: Optional[ArrayLike] = None, chunk: Optional[int] = None,
                     state: Optional[ArrayLike] = None, lengths: Optional[ArrayLike] = None,
                     reverse: bool = False, reset: Optional[ArrayLike] = None,
                     out_state: Optional[Array] = None) -> Tuple[Array, Array]: ...
def ssd(x: ArrayLike, dt: ArrayLike, A: ArrayLike, B: ArrayLike, C: ArrayLike, *,
        D: Optional[ArrayLike] = None, z: Optional[ArrayLike] = None,
        dt_bias: Optional[ArrayLike] = None, dt_softplus: bool = False,
        chunk: Optional[int] = None, state: Optional[ArrayLike] = None,
        lengths: Optional[ArrayLike] = None, reverse: bool = False,
        reset: Optional[ArrayLike] = None,
        out_state: Optional[Array] = None) -> Tuple[Array, Array]: ...
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = True,
              chunk: Optional[int] = None, scale: Optional[float] = None) -> Array: ...

def matrix_scan(A: ArrayLike, b: ArrayLike, state: Optional[ArrayLike] = None,
                **deprecated: Any) -> Array: ...
def solve_recurrence(f: Callable[..., Any], state: Optional[ArrayLike] = None,
                     xs: Any = None, jac: Optional[Callable[..., Any]] = None,
                     solver: Literal["newton", "quasi-newton", "jacobi"] = "newton",
                     tol: Optional[float] = None, max_iter: Optional[int] = None,
                     guess: Optional[ArrayLike] = None, *, method: Optional[str] = None,
                     s0: Optional[ArrayLike] = None) -> Tuple[Any, ...]: ...

def run_sequences(fn: Callable[..., Any], sequences: Sequence[Any], *args: Any,
                  batch_size: int = 64, min_chunk: int = 8,
                  **kwargs: Any) -> list[Tuple[Any, State]]: ...
def vjp(fn: Callable[..., Any], *args: Any,
        **kwargs: Any) -> Tuple[Any, Callable[[Any], Tuple[Any, ...]]]: ...

def set_num_threads(n: Optional[int]) -> None: ...
def get_num_threads() -> int: ...
def threads(n: Optional[int]) -> AbstractContextManager[None]: ...
def set_backend(name: Literal["compiled", "python"]) -> None: ...
def backend() -> Literal["compiled", "python"]: ...
def build_info() -> dict[str, Any]: ...
def set_cache_limit(nbytes: int) -> int: ...
def tune(kernels: Union[str, Sequence[str], None] = None,
         shapes: Union[Sequence[dict[str, int]], dict[str, Sequence[dict[str, int]]], None] = None,
         dtype: Literal["float32", "float64"] = "float32", repeat: int = 7, cache: bool = True,
         verbose: bool = False) -> dict[str, Any]: ...
