"""Reverse-mode gradients: ``vjp(fn, *args, **kw) -> (out, pullback)``.

Each differentiable public function registers a rule with :func:`defvjp`.  A rule runs the
forward pass saving what its backward needs and returns the same ``out`` the function returns,
plus a ``pullback(cotangent)`` giving one gradient per positional array argument (``None`` for
arguments passed as ``None``), followed by the gradient of ``state=`` when one was passed.
"""

_RULES = {}


def defvjp(fn, rule):
    """Register `rule(*args, **kw) -> (out, pullback)` as the vjp of `fn`."""
    _RULES[fn] = rule


def vjp(fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` and return ``(out, pullback)``.

    ``pullback(cotangent)`` takes a cotangent with the structure of ``out`` (any entry may be
    ``None``, meaning zero) and returns a tuple with the gradient of every positional argument.
    Gradients are exact (backpropagation through the kernels), and ``out`` is identical to
    what ``fn`` returns without vjp.
    """
    rule = getattr(fn, "_vjp", None)       # objects (statescan.nn layers) carry their rule
    try:
        rule = rule or _RULES[fn]
    except (KeyError, TypeError):
        names = ", ".join(sorted(f.__name__ for f in _RULES))
        raise TypeError(f"vjp: {getattr(fn, '__name__', fn)!r} is not differentiable "
                        f"by statescan; supported: {names}") from None
    return rule(*args, **kwargs)


def cotangent(value, structure, dtype):
    """A cotangent as contiguous arrays of `dtype`, with the structure of the output.

    `structure` is ``(name, shape)`` for an array output, or a list of structures for a tuple
    output (e.g. ``[("dy", y.shape), [("dh", s), ("dc", s)]]``).  ``None`` anywhere in `value`
    means zero for that part.  Errors name the part at fault.
    """
    import numpy as np
    from . import _validate
    if isinstance(structure, tuple):            # a leaf: (name, shape)
        name, shape = structure
        if value is None:
            return np.zeros(shape, dtype)
        arr = _validate.float_array(name, value, dtype)
        _validate.check_shape(name, arr, shape, str(list(shape)))
        return _validate.contiguous(arr, dtype)
    if value is None:
        return [cotangent(None, s, dtype) for s in structure]
    if not isinstance(value, (tuple, list)) or len(value) != len(structure):
        names = ", ".join(_leaf_names(s) for s in structure)
        got = (f"{len(value)} parts" if isinstance(value, (tuple, list))
               else type(value).__name__)
        raise TypeError(f"cotangent must be a tuple ({names}) matching the output, got {got}")
    return [cotangent(v, s, dtype) for v, s in zip(value, structure)]


def _leaf_names(structure):
    if isinstance(structure, tuple):
        return structure[0]
    return "(" + ", ".join(_leaf_names(s) for s in structure) + ")"
