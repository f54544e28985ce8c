"""How many threads the compiled kernels use.

Which count a kernel call gets, first match wins:

1. ``with statescan.threads(n):`` (or ``threadpoolctl.threadpool_limits(n)``) in the calling
   Python thread: a context variable, so other threads and asyncio tasks keep their count;
2. :func:`set_num_threads` ``(n)``: the whole process;
3. ``OMP_NUM_THREADS``, read at import and again by ``set_num_threads(None)`` (like an
   OpenMP runtime, which reads it once);
4. the CPUs this process may run on.

Results never depend on the count (work is split over rows, heads or columns, never inside a
reduction).  :func:`get_num_threads` is on the path of every kernel call, so it is a context
variable look-up and a global read.

When threadpoolctl is installed, statescan registers a controller with it (user API
``"openmp"``: the kernels' threads are OpenMP threads; internal API ``"statescan"``), so
``threadpool_info()`` lists statescan and ``threadpool_limits(n)`` limits it, in the calling
thread as ``omp_set_num_threads`` does.  threadpoolctl is not needed at run time.
"""
import contextlib
import contextvars
import importlib.util
import operator
import os
import sys
from typing import Iterator, Optional

# This thread's / task's count; None: the process count.
_override = contextvars.ContextVar("statescan_num_threads", default=None)


def _count(name: str, n: object) -> int:
    """`n` as an int >= 1: any integer (numpy's too), but not a bool or a float like 2.7."""
    if isinstance(n, bool):
        raise TypeError(f"{name} must be an integer >= 1 or None, got a bool ({n})")
    try:
        value = operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= 1 or None, got "
                        f"{type(n).__name__} ({n!r})") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _default_threads() -> int:
    """OMP_NUM_THREADS (its first entry, for nested lists like "4,2"), else the CPUs this
    process may run on (a container's or taskset's limit, not the machine's core count)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:
        pass
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):     # not Linux
        return os.cpu_count() or 1


_process_threads = _default_threads()


def set_num_threads(n: Optional[int]) -> None:
    """Set the number of threads the compiled kernels use, for the whole process.

    Parameters
    ----------
    n : int >= 1 or None
        None restores the default: ``OMP_NUM_THREADS`` (read again now), else the CPUs this
        process may run on.

    Raises
    ------
    TypeError
        `n` is not an integer (2.7, True, "2").
    ValueError
        `n` < 1.

    Notes
    -----
    A count set for the calling thread with :func:`threads` (or threadpoolctl) takes
    precedence inside its block.  Results do not depend on the count.
    """
    global _process_threads
    _process_threads = _default_threads() if n is None else _count("n", n)


def get_num_threads() -> int:
    """The number of threads a kernel called from this thread uses now.

    Returns
    -------
    int
        The count of the innermost :func:`threads` block of the calling thread, else the
        process setting (:func:`set_num_threads`, ``OMP_NUM_THREADS``, the available CPUs).
    """
    n = _override.get()
    return _process_threads if n is None else n


@contextlib.contextmanager
def threads(n: Optional[int]) -> Iterator[None]:
    """Run a block with `n` kernel threads in the calling Python thread only.

    Other threads (a server's other requests, Dask's other tasks) keep their count; blocks
    nest; the previous count returns on exit, also on an exception.  Usable as a decorator.

    Parameters
    ----------
    n : int >= 1 or None
        None: the process setting (:func:`set_num_threads`) inside the block.

    Examples
    --------
    >>> import statescan as ss
    >>> with ss.threads(1):
    ...     ss.get_num_threads()
    1
    """
    token = _override.set(None if n is None else _count("n", n))
    try:
        yield
    finally:
        _override.reset(token)


# ---- threadpoolctl ---------------------------------------------------------------------------

def _controller_class(threadpoolctl):
    """A threadpoolctl controller for the compiled kernels.

    threadpoolctl finds libraries by the file names of the loaded shared objects: statescan's
    is the portable ``statescan._ext._cpu`` module (always loaded with the kernels).  Its
    Cython module symbol names the full module path, so neither the native copy
    (``statescan._ext.native._cpu``) nor another package's ``_cpu`` module matches.
    """
    class StatescanController(threadpoolctl.LibController):
        user_api = "openmp"
        internal_api = "statescan"
        filename_prefixes = ("_cpu.",)
        check_symbols = ("__pyx_module_is_main_statescan___ext___cpu",)

        def get_num_threads(self):
            return get_num_threads()

        def set_num_threads(self, num_threads):
            # The calling thread's count, as omp_set_num_threads.  A count equal to the
            # process count is no override: threadpool_limits restores the count it found on
            # exit, and the thread then follows later set_num_threads calls again.
            n = _count("num_threads", num_threads)
            _override.set(None if n == _process_threads else n)

        def get_version(self):
            package = sys.modules.get("statescan")
            return getattr(package, "__version__", None)

    return StatescanController


def _register_with_threadpoolctl():
    """Register the controller when threadpoolctl is installed and has the extension point
    (3.5+); the compiled kernels must exist for it to find them."""
    if importlib.util.find_spec("threadpoolctl") is None:
        return None
    import threadpoolctl
    if not hasattr(threadpoolctl, "register") or not hasattr(threadpoolctl, "LibController"):
        return None
    controller = _controller_class(threadpoolctl)
    threadpoolctl.register(controller)
    return controller


_CONTROLLER = _register_with_threadpoolctl()
