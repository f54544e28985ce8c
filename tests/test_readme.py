"""The README's main example runs as written (so the documentation cannot drift from the API)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cell_example_runs():
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed package)")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)   # noqa: S102 - our own docs
    assert namespace["dx"].shape == namespace["x"].shape
