"""Argument checking shared by every public function.  Errors name the argument and the
expected shape, so a user can fix the call without reading the source.

The main entry point is :func:`arrays`: a declarative shape spec per function, e.g.::

    arrs, dims = _validate.arrays(
        {"W": "G*H I", "x": "B T I", "b": "G*H?"},     # binding order: W fixes I before x
        {"W": W, "x": x, "b": b}, dims={"G": 4, "H": 32})

checks every argument's rank and sizes, converts Python scalars and lists to the arrays'
dtype, and returns C-contiguous arrays of one float dtype (copied only when needed).

The fast paths of small calls first ask :func:`match` (with a :func:`plan` made once per
function) whether the arguments are already valid as they are; only a call it declines pays
for :func:`arrays` and gets its error messages.
"""
import math
import operator

import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


# ---- the small-call fast paths' check ---------------------------------------------------------

_OPTIONAL, _WRITEABLE, _EMPTY, _ZEROS, _ANY = 1, 2, 4, 8, 255


def plan(spec):
    """The plan :func:`match` checks arguments against, and the names of its dimensions.

    Parameters
    ----------
    spec : dict name -> shape string
        In argument order; dimensions are names separated by spaces (``"B T NH P"``), or
        ``_`` for an axis of any size.  A name ending in ``?`` is optional (None matches);
        one ending in ``!`` must be writeable (an output).  A name ending in ``+`` (or
        ``+0``) is made when None -- an empty (or zero) C-contiguous array of its sizes and
        the call's dtype -- and returned after the sizes (a call's outputs and absent
        states: made in C, without the Python calls of np.empty).

    Returns
    -------
    (plan bytes, tuple of dimension names in order of first appearance)
    """
    slots = {}
    parts = [0, len(spec)]
    for name, shape in spec.items():
        axes = shape.split()
        flags = ((_OPTIONAL if "?" in name else 0) | (_WRITEABLE if "!" in name else 0)
                 | (_EMPTY if name.endswith("+") else 0) | (_ZEROS if name.endswith("+0") else 0))
        if flags & (_EMPTY | _ZEROS) and "_" in axes:
            raise ValueError(f"{name}: an array to make needs every size named")
        parts += [flags, len(axes)]
        parts += [_ANY if axis == "_" else slots.setdefault(axis, len(slots)) for axis in axes]
    parts[0] = len(slots)
    return bytes(parts), tuple(slots)


def _match_python(plan, *arrays):
    """The sizes of `plan`'s dimensions (a tuple in the order :func:`plan` names them) when
    `arrays` (one per entry of the plan's spec, in order) are already valid: each None where
    optional, else an ndarray (not a subclass) of float32 or float64 -- the first one's dtype
    for all, native byte order -- C-contiguous, writeable where marked, of the spec's rank,
    no axis of size 0 (the fast paths' callers leave such calls to the general path), every
    named dimension of one size (-1 for a dimension named only by arguments that are
    None).  The tuple goes on with the arrays of the entries to make when None (``+``,
    ``+0``), in order: the argument, or the array made.  None otherwise (also when an array
    to make has a size named only by absent arguments, or no argument is an array), so that
    the call takes the general validation and its errors.

    :data:`match` is the compiled twin of this function (``ext/_argcheck.pyx``: the same
    answers, in about a tenth of the time), or this function when that is not built."""
    decoded = _DECODED.get(plan)
    if decoded is None:
        decoded = _DECODED[plan] = _decoded(plan)
    nslots, entries = decoded
    if len(entries) != len(arrays):
        raise ValueError(f"the plan takes {len(entries)} arrays, got {len(arrays)}")
    sizes = [-1] * nslots
    dtype = None
    for (optional, writeable, _, ndim, slots), a in zip(entries, arrays):
        if a is None:
            if optional:
                continue
            return None
        if type(a) is not np.ndarray:
            return None
        if dtype is None:
            dtype = a.dtype
            if dtype not in FLOATS:
                return None
        elif a.dtype != dtype:
            return None
        shape = a.shape
        if (len(shape) != ndim or not a.flags.c_contiguous
                or (writeable and not a.flags.writeable)):
            return None
        if 0 in shape:
            return None
        for k, size in zip(slots, shape):
            if k == _ANY:
                continue
            if sizes[k] < 0:
                sizes[k] = size
            elif sizes[k] != size:
                return None
    made = []
    for (_, _, make, _, slots), a in zip(entries, arrays):
        if make is None:
            continue
        if a is None:
            if dtype is None or any(sizes[k] < 0 for k in slots):
                return None
            a = make(tuple(sizes[k] for k in slots), dtype)
        made.append(a)
    return tuple(sizes) + tuple(made)


_DECODED = {}   # plan -> (dimension count, per argument (optional, writeable, maker, rank, slots))


def _decoded(plan):
    """`plan`'s bytes as Python values, for :func:`_match_python`."""
    entries, pos = [], 2
    for _ in range(plan[1]):
        flags, ndim = plan[pos], plan[pos + 1]
        make = np.zeros if flags & _ZEROS else np.empty if flags & _EMPTY else None
        entries.append((bool(flags & (_OPTIONAL | _EMPTY | _ZEROS)), bool(flags & _WRITEABLE),
                        make, ndim, tuple(plan[pos + 2:pos + 2 + ndim])))
        pos += 2 + ndim
    return plan[0], tuple(entries)


try:
    from ._ext._argcheck import match
except ImportError:                 # not built
    match = _match_python


def _is_float_array(value):
    return isinstance(value, np.ndarray) and value.dtype in FLOATS


def float_array(name, a, dtype=None):
    """`a` as an ndarray of float32/float64 (no copy when it already is one).

    ndarrays must already be float32/float64; Python scalars, lists and tuples are converted
    to `dtype` (float64 when None).  Errors name the argument.
    """
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    if isinstance(a, np.ndarray) or hasattr(a, "__array__") and not isinstance(a, (list, tuple)):
        arr = np.asarray(a)
        if arr.dtype not in FLOATS:
            raise TypeError(f"{name} must be float32 or float64, got dtype {arr.dtype}")
        return arr
    if isinstance(a, (bool, np.bool_, str, bytes)) or a is Ellipsis:
        raise TypeError(f"{name} must be a float array, got {type(a).__name__}")
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError) as exc:   # ragged lists
        raise ValueError(f"{name} could not be read as an array: {exc}") from None
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr.astype(dtype or np.float64)


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


def positive_int(name, value):
    """`value` as a Python int >= 1; TypeError for non-integers (bool included)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def choice(name, value, choices):
    """`value` if it is one of `choices`; ValueError listing every valid choice."""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")
    return value


def boolean(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


# ---- declarative shapes ----------------------------------------------------------------------

class _Dim:
    """One entry of a shape spec: a name ("T"), an integer ("1") or a product ("G*H")."""
    __slots__ = ("text", "factors", "name", "const")

    def __init__(self, text):
        self.text = text
        self.factors = text.split("*")
        simple = len(self.factors) == 1
        self.const = int(text) if simple and text.isdigit() else None
        self.name = text if simple and self.const is None else None   # a plain dimension name

    def value(self, dims):
        """The size, or None when a factor is still unbound."""
        if self.const is not None:
            return self.const
        if self.name is not None:
            return dims.get(self.name)
        sizes = []
        for f in self.factors:
            if f.isdigit():
                sizes.append(int(f))
            elif f in dims:
                sizes.append(dims[f])
            else:
                return None
        return math.prod(sizes)

    def bind(self, size, dims):
        """Bind the one unbound factor from `size`; False when the size cannot match."""
        unbound = [f for f in self.factors if not f.isdigit() and f not in dims]
        if len(unbound) != 1:
            return False
        rest = math.prod(int(f) if f.isdigit() else dims[f] for f in self.factors
                         if f != unbound[0])
        if rest == 0:
            return size == 0
        if size % rest:
            return False
        dims[unbound[0]] = size // rest
        return True


_SPEC_CACHE = {}


def _compile(spec):
    """The parsed spec: (name, optional, dims, broadcast) per argument, cached."""
    key = tuple(spec.items())
    parsed = _SPEC_CACHE.get(key)
    if parsed is None:
        parsed = []
        for k, shape in key:
            optional = k.endswith("?")
            text = shape.strip()
            parsed.append((k[:-1] if optional else k, optional,
                           tuple(_Dim(t) for t in text.lstrip("~").split()),
                           text.startswith("~")))
        parsed = _SPEC_CACHE[key] = tuple(parsed)
    return parsed


def _describe(dims_spec, dims):
    names = "[" + ", ".join(d.text for d in dims_spec) + "]"
    values = [d.value(dims) for d in dims_spec]
    if all(v is None for v in values) or all(d.text.isdigit() for d in dims_spec):
        return names
    return names + " = [" + ", ".join("?" if v is None else str(v) for v in values) + "]"


def arrays(spec, values, dims=None, dtype=None):
    """Validate the array arguments of one call against a shape spec.

    Parameters
    ----------
    spec : dict name -> shape string
        Dimensions separated by spaces: a name (bound by the first argument, in spec order,
        that has it), an integer, or a product of those (``"G*H"``).  A leading ``~`` lets
        the argument broadcast to that shape (scalars, lists, lower rank).  A name ending in
        ``?`` is optional: None passes through as None.
    values : dict name -> value (keys without the ``?``)
    dims : dict, optional
        Sizes known beforehand (e.g. the gate count).
    dtype : numpy dtype, optional
        The dtype to use; default: that of the first float ndarray among the values.

    Returns
    -------
    (out, dims, dtype): ``out[name]`` a C-contiguous array of `dtype` (or None), `dims` the
    resolved sizes.  Raises TypeError for non-float arrays or mixed dtypes and ValueError
    for shapes, naming the argument and the expected shape.
    """
    items = _compile(spec)
    dims = dict(dims) if dims else {}
    first_name = None
    if dtype is None:
        for name, _, _, _ in items:
            v = values.get(name)
            if v is not None and hasattr(v, "dtype"):
                dtype = float_array(name, v).dtype
                first_name = name
                break
        dtype = np.dtype(dtype or np.float64)
    else:
        dtype = np.dtype(dtype)
    out = {}
    for name, optional, dim_spec, broadcast in items:
        v = values.get(name)
        if v is None:
            if optional:
                out[name] = None
                continue
            raise TypeError(f"{name} must be an array, got None")
        if type(v) is np.ndarray and v.dtype is dtype:      # the common case: nothing to do
            arr = v
        else:
            arr = float_array(name, v, dtype)
            if arr.dtype != dtype:
                other = f"{first_name} is {dtype}" if first_name else f"the call's dtype is {dtype}"
                raise TypeError(f"{name} is {arr.dtype} but {other}: "
                                "all arrays must share one dtype (float32 or float64)")
        if broadcast and arr.ndim < len(dim_spec):
            target = [d.value(dims) for d in dim_spec]
            if any(t is None for t in target):
                raise ValueError(f"{name}: cannot broadcast before the sizes "
                                 f"{_describe(dim_spec, dims)} are known")
            try:
                arr = np.broadcast_to(arr, target)
            except ValueError:
                raise ValueError(f"{name} must broadcast to shape {_describe(dim_spec, dims)}, "
                                 f"got {arr.shape}") from None
        shape = arr.shape
        if len(shape) != len(dim_spec):
            raise ValueError(f"{name} must have shape {_describe(dim_spec, dims)}, "
                             f"got {shape}")
        for d, size in zip(dim_spec, shape):
            if d.name is not None:                     # fast path: a plain dimension name
                want = dims.get(d.name)
                if want is None:
                    dims[d.name] = size
                    continue
            else:
                want = d.value(dims)
                if want is None:
                    if not d.bind(size, dims):
                        raise ValueError(f"{name} must have shape "
                                         f"{_describe(dim_spec, dims)}, got {shape} "
                                         f"({d.text} does not divide {size})")
                    continue
            if want != size:
                raise ValueError(f"{name} must have shape {_describe(dim_spec, dims)}, "
                                 f"got {shape}")
        out[name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
    return out, dims, dtype


# ---- variable lengths and resets ---------------------------------------------------------------

def lengths(value, B, T):
    """`lengths=` as an int64 array [B] with 0 <= lengths[b] <= T, or None."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) \
                and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        elif arr.dtype.kind == "f" and arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths must have shape [B] = [{B}], got {arr.shape}")
    if B and (arr.min() < 0 or arr.max() > T):
        raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got values in "
                         f"[{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=np.int64)


def reset(value, B, T):
    """`reset=` as a bool array [B, T] (C-contiguous, uint8 view-compatible), or None."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype != np.bool_:
        if arr.dtype.kind in "iu" and (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 1)):
            arr = arr.astype(np.bool_)
        else:
            raise TypeError(f"reset must be a bool array [B, T], got dtype {arr.dtype}")
    if arr.shape != (B, T):
        raise ValueError(f"reset must have shape [B, T] = [{B}, {T}], got {arr.shape}")
    return np.ascontiguousarray(arr)


def index(name, value):
    """`value` as a Python int (for sizes such as chunk); TypeError for non-integers."""
    try:
        return operator.index(value) if not isinstance(value, (bool, np.bool_)) else _bad(name, value)
    except TypeError:
        _bad(name, value)


def _bad(name, value):
    raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
