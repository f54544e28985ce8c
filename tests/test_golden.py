"""Every public function still gives the bits it gave when this machine's file in
tests/data/golden/ was recorded (see tests/_golden.py): refactors must not change results."""
import numpy as np
import pytest

import statescan as ss
from _golden import compute, keys_agree, machine, recording_for, recordings


def test_outputs_bit_identical_to_recording():
    known = recordings()
    path = recording_for(machine(), known)
    if path is None:
        pytest.skip(f"no recording for {machine()} (recorded: {sorted(known)}): other ISA "
                    "features, numpy or BLAS kernels give other last bits; "
                    "`python tests/_golden.py` records one")
    recorded = np.load(path)
    now = compute()
    keys = set(recorded.files) - {"__machine__"}
    assert keys_agree(str(recorded["__machine__"]), machine(), keys, now), (
        f"recorded keys missing now: {sorted(keys - set(now))[:5]}, "
        f"new keys: {sorted(set(now) - keys)[:5]}")
    changed = [k for k in sorted(keys)
               if not np.array_equal(now[k], recorded[k], equal_nan=True)
               or now[k].dtype != recorded[k].dtype]
    assert not changed, f"{len(changed)} outputs changed, e.g. {changed[:5]}"


def test_recording_for_prefers_the_file_naming_this_blas():
    old, new = "native avx512f numpy 2", "native avx512f numpy 2 blas Haswell"
    known = {old: "old.npz", new: "new.npz"}
    assert recording_for(new, known) == "new.npz"
    assert recording_for("native avx512f numpy 2 blas SkylakeX", known) == "old.npz"
    assert recording_for("native avx2 numpy 2 blas Zen", known) is None


def test_only_an_older_recording_may_hold_a_subset_of_the_keys():
    now = {"a", "b", "c"}
    exact, older = "native avx512f numpy 2 blas Haswell", "native avx512f numpy 2"
    assert keys_agree(exact, exact, now, now)
    assert not keys_agree(exact, exact, {"a", "b"}, now)        # this machine: every key
    assert keys_agree(older, exact, {"a", "b"}, now)            # older file: a subset
    assert not keys_agree(older, exact, {"a", "d"}, now)        # ... of today's keys only
