"""Every public function still gives the bits it gave when this machine's file in
tests/data/golden/ was recorded (see tests/_golden.py): refactors must not change results."""
import numpy as np
import pytest

import statescan as ss
from _golden import compute, machine, recordings


def test_outputs_bit_identical_to_recording():
    known = recordings()
    if machine() not in known:
        pytest.skip(f"no recording for {machine()} (recorded: {sorted(known)}): other ISA "
                    "features or numpy give other last bits; `python tests/_golden.py` records one")
    recorded = np.load(known[machine()])
    now = compute()
    keys = set(recorded.files) - {"__machine__"}
    assert set(now) == keys
    changed = [k for k in sorted(keys)
               if not np.array_equal(now[k], recorded[k], equal_nan=True)
               or now[k].dtype != recorded[k].dtype]
    assert not changed, f"{len(changed)} outputs changed, e.g. {changed[:5]}"
