"""Backend selection (compiled kernels or numpy references) and thread count.

``STATESCAN_BACKEND=python`` forces the numpy references at import;
:func:`set_backend` switches at run time; :func:`backend` tells which is active.
The thread count the kernels get comes from :mod:`statescan._threads` (:func:`get_num_threads`).

The kernels are built twice (setup.py): ``statescan._ext.<name>`` for any CPU of the
architecture and ``statescan._ext.native.<name>`` for the installing machine's SIMD.  At import
the native set is used when this CPU has every ISA extension it was compiled for, else the
portable one; ``STATESCAN_VARIANT=native|portable`` forces one.  :func:`build_info` says which.
"""
import importlib
import importlib.machinery
import os
import warnings

import numpy as np

from . import _blas, _caches
from ._threads import get_num_threads, set_num_threads   # noqa: F401 - kernels call them here

_state = {"backend": None, "ext_error": None, "build": None}
_VARIANTS = ("native", "portable")


def _module_names(directory):
    """Names of the compiled modules in `directory` (no Python files, no subpackages)."""
    try:
        files = os.listdir(directory)
    except OSError:
        return set()
    names = set()
    for f in files:
        suffix = next((s for s in importlib.machinery.EXTENSION_SUFFIXES if f.endswith(s)), None)
        if suffix:   # the most specific suffix comes first: rnn.cpython-311-...so -> rnn
            names.add(f[:-len(suffix)])
    return names


def _import_all(package, names):
    return {name: importlib.import_module(f"{package}.{name}") for name in names}


def _requested_variant():
    requested = os.environ.get("STATESCAN_VARIANT", "").strip().lower()
    if requested and requested not in _VARIANTS:
        warnings.warn(f"STATESCAN_VARIANT={requested!r} is not 'native' or 'portable'; ignored",
                      RuntimeWarning, stacklevel=4)
        return ""
    return requested


def _native_features():
    """The ISA extensions setup.py recorded for the native set, None if it built none."""
    try:
        from ._ext.native import _features
    except ImportError:
        return None
    return tuple(_features.FEATURES)


def _cpu_features(cpu_module):
    """This CPU's ISA extensions, named as in ext/_cpu.h; None when they cannot be found.
    x86 asks the CPU (through the portable _cpu module); elsewhere Linux's /proc/cpuinfo."""
    if cpu_module is not None:
        found = cpu_module.runtime_features()
        if found is not None:
            return found
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "Features":   # arm64; x86 spells its flags differently
                    return tuple(value.split())
    except OSError:
        pass
    return None


def _choose_variant(requested, native_features, cpu_features, native_names):
    """("native" | "portable", reason).  Raises ImportError when `requested` is "native" and
    this CPU or this build cannot run it."""
    if requested == "portable":
        return "portable", "STATESCAN_VARIANT=portable"
    if native_features is None or not native_names:
        problem = "no native build (STATESCAN_PORTABLE=1, or no -march/-mcpu=native)"
    elif cpu_features is None:
        problem = "this CPU's ISA extensions cannot be detected"
    else:
        missing = sorted(set(native_features) - set(cpu_features))
        problem = f"this CPU lacks {', '.join(missing)}" if missing else None
    if problem is None:
        return "native", ("STATESCAN_VARIANT=native" if requested else
                          "this CPU has every ISA extension the native build uses")
    if requested == "native":
        raise ImportError(f"STATESCAN_VARIANT=native, but {problem}")
    return "portable", problem


def _load_extension():
    """Import the compiled modules of the variant this CPU runs; remember why none, if none."""
    from . import _ext
    try:
        portable_names = _module_names(_ext.__path__[0])
        if "rnn" not in portable_names:
            raise ImportError("statescan._ext.rnn was not built")
        modules = _import_all("statescan._ext", portable_names)
    except ImportError as exc:  # not built, or built for another Python / CPU
        _state["ext_error"] = exc
        return None
    requested = _requested_variant()
    native_names = _module_names(os.path.join(_ext.__path__[0], "native"))
    native_features = _native_features()
    cpu = modules.get("_cpu")
    cpu_features = _cpu_features(cpu)
    variant, reason = _choose_variant(requested, native_features, cpu_features, native_names)
    sources = dict.fromkeys(modules, "portable")
    if variant == "native":
        # A development build may have rebuilt only some families since native existed.
        absent = sorted(portable_names - native_names)
        if absent and requested == "native":
            raise ImportError("STATESCAN_VARIANT=native, but statescan._ext.native lacks "
                              + ", ".join(absent))
        try:
            modules.update(_import_all("statescan._ext.native", native_names))
        except ImportError as exc:
            if requested == "native":
                raise
            variant, reason = "portable", f"the native build does not import ({exc})"
        else:
            sources.update(dict.fromkeys(native_names, "native"))
            if absent:
                variant = "mixed"
                reason = f"{reason}; portable for {', '.join(absent)} (no native build)"
    _configure_for_machine(modules)
    _state["build"] = {
        "variant": variant,
        "features": native_features if variant != "portable" else
        (cpu.compiled_features() if cpu is not None else None),
        "cpu_features": cpu_features,
        "openmp": bool(cpu.openmp()) if cpu is not None else None,
        "modules": sources,
        "reason": reason,
    }
    return modules


def _configure_for_machine(modules):
    """The compiled modules' settings that follow from this machine, for those that have them:
    the projection's L1 slices and the gradients' panel chunks from the L1d size (rnn:
    _set_l1d_bytes), and ssd's block products on statescan's micro-kernel unless scipy's
    OpenBLAS runs AVX-512 kernels of its own (ext/_uk_gemm.pxd).  Intel Xeon (Sapphire
    Rapids class), 1 thread, OpenBLAS SkylakeX, N=128 T=512: ssd prefill through OpenBLAS
    1.16-1.23x faster at 48 heads of 64 and 1.16-1.36x at 128 heads of 80 (its small-matrix
    kernels do not pack; the micro-kernel packs each block's operand and pads P = 80 to 96
    columns); its fwd+vjp 5-8% slower.  linear_attention keeps the micro-kernel: on the same
    machine 1.04-1.12x faster than OpenBLAS there, vjp included."""
    micro_kernel = not _blas.avx512_kernels()
    l1d = _caches.cache_sizes()["l1d"]
    for module in modules.values():
        if hasattr(module, "_use_microkernel_gemm"):
            module._use_microkernel_gemm(micro_kernel)
        if hasattr(module, "_set_l1d_bytes"):
            module._set_l1d_bytes(l1d)


_EXT = _load_extension()


def ext_module(name):
    """The compiled module ``<name>`` of the active variant (see :func:`build_info`)."""
    try:
        return _EXT[name]
    except (KeyError, TypeError):
        raise ImportError(f"statescan._ext.{name} is not built; reinstall statescan") from None


def compiled_available():
    """True when the Cython extension was built and imports."""
    return _EXT is not None


def build_info():
    """Which build of the compiled kernels is in use, and why.

    Returns
    -------
    dict with keys
        ``variant``: ``"native"`` (compiled for the installing machine), ``"portable"`` (the
        architecture's baseline), ``"mixed"`` (a partial development build: native where
        built) or ``None`` (no compiled kernels; the numpy references run);
        ``features``: ISA extensions the active kernels were compiled for (tuple);
        ``cpu_features``: those this CPU has (tuple, or None when undetectable);
        ``openmp``: whether the kernels were built with OpenMP (multi-threaded);
        ``modules``: ``{module: variant}``; ``reason``: why this variant;
        ``backend``: the active backend (:func:`backend`).
    """
    if _EXT is None:
        info = {"variant": None, "features": (), "cpu_features": None, "openmp": None,
                "modules": {}, "reason": f"compiled kernels unavailable ({_state['ext_error']})"}
    else:
        info = dict(_state["build"], modules=dict(_state["build"]["modules"]))
    return dict(info, backend=_state["backend"])


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


# A parallel region costs a few microseconds on an idle machine and far more when the cores
# are busy; work below this many multiply-adds per extra thread runs on the calling thread.
MIN_WORK_PER_THREAD = 1 << 16


def threads_for(work):
    """Threads worth using for a call of about `work` multiply-adds (None: all allowed).
    The kernels give the same bits for any thread count, so this only changes the speed."""
    n = get_num_threads()
    if n == 1 or work is None:
        return n
    useful = work // MIN_WORK_PER_THREAD         # (an int: every caller counts in ints)
    return n if useful >= n else useful or 1


_ZEROS = {}         # (shape, dtype) -> a small read-only zero array to share


def zeros_input(shape, dtype):
    """Zeros the fast paths of small calls pass as a kernel input (an absent state or bias;
    never returned, never written: read-only): shared when small."""
    zeros = _ZEROS.get((shape, dtype))
    if zeros is None:
        zeros = np.zeros(shape, dtype)
        if zeros.size <= 4096:
            if len(_ZEROS) >= 64:          # many shapes: keep the cache small
                _ZEROS.clear()
            zeros.flags.writeable = False
            _ZEROS[shape, dtype] = zeros
    return zeros


def compiled(family, name):
    """The compiled kernel `name` of `family` when the compiled backend is active, else None:
    for the fast paths of small calls, which run it directly (and leave every other call,
    the python backend's included, to :func:`run`).  Prepares the BLAS libraries as
    :func:`run` does (the ssd, linear_attention and attention kernels call scipy's)."""
    if _state["backend"] != "compiled":
        return None
    _blas.prepare()
    return getattr(ext_module(family), name)


def run(family, name, *args, out=None, empty=False, work=None):
    """Run kernel `name` of `family` on validated arrays: the one dispatch rule.

    The numpy reference ``statescan._reference.<family>.<name>(*args)`` runs when the python
    backend is active or the call is `empty` (a zero-size axis: nothing for a compiled loop
    to do); its return value is returned.  Otherwise ``out()`` allocates the output arrays
    and the compiled ``statescan._ext.<family>.<name>(*args, *outputs, num_threads)`` fills
    them; the outputs are returned (one array, or a tuple).  `work` (about how many
    multiply-adds the call does) keeps small calls on the calling thread (:func:`threads_for`).
    """
    if empty or _state["backend"] != "compiled":
        return getattr(importlib.import_module(f"statescan._reference.{family}"), name)(*args)
    kernel = getattr(ext_module(family), name)
    _blas.prepare()
    outputs = out() if out is not None else ()
    if type(outputs) is tuple:
        kernel(*args, *outputs, threads_for(work))
    else:
        kernel(*args, outputs, threads_for(work))
    return outputs
