"""Parallel-in-time: the matrix scan and the cells' newton / quasi-newton / jacobi solvers.

The cases are statescan bench's ``parallel`` family (statescan/_bench/parallel_cases.py)."""
FAMILY = "parallel"


def test_parallel(run_case, case):
    run_case(case)
