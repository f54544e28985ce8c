"""Argument checking shared by every public function.  Errors name the argument and the
expected shape, so a user can fix the call without reading the source."""
import numpy as np

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(name, a):
    """`a` as an ndarray of float32/float64 (no copy when it already is one)."""
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    arr = np.asarray(a)
    if arr.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got dtype {arr.dtype}")
    return arr


def common_dtype(**arrays):
    """The one float dtype shared by all non-None `arrays`; TypeError when they are mixed."""
    first = None
    for name, arr in arrays.items():
        if arr is None:
            continue
        if first is None:
            first = (name, arr.dtype)
        elif arr.dtype != first[1]:
            raise TypeError(
                f"{name} is {arr.dtype} but {first[0]} is {first[1]}: "
                "all arrays must share one dtype (float32 or float64)")
    return first[1]


def check_shape(name, arr, expected, desc):
    """Raise ValueError unless arr.shape matches `expected` (None entries match any size)."""
    ok = arr.ndim == len(expected) and all(
        e is None or e == s for e, s in zip(expected, arr.shape))
    if not ok:
        raise ValueError(f"{name} must have shape {desc}, got {arr.shape}")


def contiguous(arr, dtype):
    """C-contiguous array of `dtype`; copies only when needed."""
    return np.ascontiguousarray(arr, dtype=dtype)


def positive_int(name, value, minimum=1):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
