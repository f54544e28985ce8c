"""Every public function still gives the bits it gave when tests/data/golden.npz was recorded
(see tests/_golden.py): refactors must not change results."""
import numpy as np
import pytest

import statescan as ss
from _golden import PATH, compute, machine


def test_outputs_bit_identical_to_recording():
    recorded = np.load(PATH)
    if str(recorded["__machine__"]) != machine():
        pytest.skip(f"recorded on {recorded['__machine__']}, this is {machine()}: "
                    "other ISA features or numpy give other last bits")
    now = compute()
    keys = set(recorded.files) - {"__machine__"}
    assert set(now) == keys
    changed = [k for k in sorted(keys)
               if not np.array_equal(now[k], recorded[k], equal_nan=True)
               or now[k].dtype != recorded[k].dtype]
    assert not changed, f"{len(changed)} outputs changed, e.g. {changed[:5]}"
