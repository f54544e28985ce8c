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
    try:
        rule = _RULES[fn]
    except (KeyError, TypeError):
        names = ", ".join(sorted(f.__name__ for f in _RULES))
        raise TypeError(f"vjp: {getattr(fn, '__name__', fn)!r} is not differentiable "
                        f"by statescan; supported: {names}") from None
    return rule(*args, **kwargs)
