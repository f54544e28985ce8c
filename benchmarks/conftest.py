"""pytest-benchmark suites: ``python -m pytest benchmarks/ --benchmark-only``.

Not collected by the main test run (``testpaths = tests``).  The cases are those of
``statescan bench`` (``statescan/_bench/<family>_cases.py``, the quick grid; ``--full-grid``
for the full one), timing the statescan runner only; ``statescan bench`` adds the peers.
Everything runs on one thread (statescan and numpy's BLAS) so numbers compare across runs.
"""
import importlib

import pytest

import statescan
from statescan._bench import machine
from statescan._bench.core import STATESCAN, Runner


def pytest_addoption(parser):
    parser.addoption("--full-grid", action="store_true",
                     help="benchmark statescan bench's full grid instead of the quick one")


def family_cases(family):
    """The cases of `family` in both grids: (quick, full), each a list of pytest params."""
    module = importlib.import_module(f"statescan._bench.{family}_cases")
    return {quick: [pytest.param(c, id=c.id.partition("/")[2]) for c in module.cases(quick)]
            for quick in (True, False)}


def pytest_generate_tests(metafunc):
    """Parametrize `case` of test_bench_<family>.py with that family's cases."""
    if "case" in metafunc.fixturenames:
        family = metafunc.module.FAMILY
        full = metafunc.config.getoption("--full-grid")
        metafunc.parametrize("case", family_cases(family)[not full])


@pytest.fixture
def run_case(benchmark):
    """run_case(case): time the case's statescan runner (inputs built outside the timing)."""
    def run(case):
        runner = case.make()[STATESCAN]
        fn = runner.fn if isinstance(runner, Runner) else runner
        benchmark.group = f"{case.family}/{case.name}"
        benchmark.extra_info["steps"] = case.steps
        benchmark.extra_info["flops"] = case.flops
        return benchmark(fn)
    return run


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    statescan.set_num_threads(1)
    machine.set_blas_threads(1)
