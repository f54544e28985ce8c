"""Backend selection (compiled kernels or numpy references) and thread count.

``STATESCAN_BACKEND=python`` forces the numpy references at import;
:func:`set_backend` switches at run time; :func:`backend` tells which is active.
``OMP_NUM_THREADS`` or :func:`set_num_threads` set the threads the kernels use.
"""
import importlib
import os
import warnings

_state = {"backend": None, "threads": None, "ext_error": None}


def _load_extension():
    """Import every compiled module once; remember why it failed, if it did."""
    import pkgutil
    from . import _ext
    try:
        names = [m.name for m in pkgutil.iter_modules(_ext.__path__)]
        if "rnn" not in names:
            raise ImportError("statescan._ext.rnn was not built")
        return {name: importlib.import_module(f"statescan._ext.{name}") for name in names}
    except ImportError as exc:  # not built, or built for another Python / CPU
        _state["ext_error"] = exc
        return None


_EXT = _load_extension()


def ext_module(name):
    """The compiled module ``statescan._ext.<name>``."""
    try:
        return _EXT[name]
    except (KeyError, TypeError):
        raise ImportError(f"statescan._ext.{name} is not built; reinstall statescan") from None


def compiled_available():
    """True when the Cython extension was built and imports."""
    return _EXT is not None


def set_backend(name):
    """Select ``"compiled"`` (Cython kernels) or ``"python"`` (numpy references)."""
    if name not in ("compiled", "python"):
        raise ValueError(f"backend must be 'compiled' or 'python', got {name!r}")
    if name == "compiled" and _EXT is None:
        raise ImportError(
            "statescan's compiled extension is not available "
            f"({_state['ext_error']}); reinstall from source with a C compiler, "
            "or use set_backend('python')"
        )
    _state["backend"] = name


def backend():
    """The active backend: ``"compiled"`` or ``"python"``."""
    return _state["backend"]


def use_compiled():
    return _state["backend"] == "compiled"


def set_num_threads(n):
    """Set the number of threads the compiled kernels use (results do not depend on it)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _state["threads"] = n


def get_num_threads():
    """Threads the compiled kernels use: set_num_threads, else OMP_NUM_THREADS, else all cores."""
    if _state["threads"] is not None:
        return _state["threads"]
    env = os.environ.get("OMP_NUM_THREADS", "")
    try:
        return max(1, int(env.split(",")[0]))
    except ValueError:
        return os.cpu_count() or 1


def _initial_backend():
    requested = os.environ.get("STATESCAN_BACKEND", "").strip().lower()
    if requested == "python":
        return "python"
    if requested not in ("", "compiled"):
        warnings.warn(f"STATESCAN_BACKEND={requested!r} is not 'compiled' or 'python'; ignored",
                      RuntimeWarning, stacklevel=3)
    if _EXT is None:
        warnings.warn(
            f"statescan: compiled kernels unavailable ({_state['ext_error']}); "
            "using the numpy reference implementations (slow)",
            RuntimeWarning, stacklevel=3)
        return "python"
    return "compiled"


_state["backend"] = _initial_backend()
