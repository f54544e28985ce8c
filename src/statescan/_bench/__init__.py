"""Benchmark machinery behind ``statescan bench`` (see :mod:`statescan._bench.core` for the
interface a family module implements)."""
import importlib

from .core import FAMILIES


def load_cases(families=FAMILIES, quick=False):
    """(cases, {family: reason}) for each family module that imports; a family whose module
    is missing or broken is reported, not fatal."""
    cases, unavailable = [], {}
    for family in families:
        try:
            module = importlib.import_module(f"statescan._bench.{family}_cases")
            cases.extend(module.cases(quick))
        except Exception as exc:
            unavailable[family] = f"{type(exc).__name__}: {exc}"
    return cases, unavailable
