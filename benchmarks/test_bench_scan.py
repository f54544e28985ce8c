"""Linear recurrences: diagonal linear scan and Mamba-1's selective scan.

The cases are statescan bench's ``scan`` family (statescan/_bench/scan_cases.py)."""
FAMILY = "scan"


def test_scan(run_case, case):
    run_case(case)
