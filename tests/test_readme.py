"""Every Python example of the README runs on its own, as written (so the documentation cannot
drift from the API)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = (re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
          if README.exists() else [])


def test_readme_has_python_examples():
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed package)")
    assert BLOCKS, "README.md has no python example"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_block_runs_on_its_own(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}       # a fresh namespace: no block leans on another
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"),   # noqa: S102
         namespace)


def test_readme_cell_example_computes_gradients():
    if not BLOCKS:
        pytest.skip("README.md is not next to the tests (installed package)")
    namespace = {}
    exec(compile(BLOCKS[0], "README.md", "exec"), namespace)   # noqa: S102 - our own docs
    assert namespace["dx"].shape == namespace["x"].shape
