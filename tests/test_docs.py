"""Every Python example of the documentation site (docs/**/*.rst) runs, and the API reference
lists every public name.

A page's ``.. code-block:: python`` blocks run in order in one namespace (a page reads as one
script), in a temporary directory.  A bare ``::`` literal block that is Python would be an
example nobody runs: it is an error (shell commands go in ``.. code-block:: bash``)."""
import ast
import importlib.util
import inspect
import pydoc
import re
import textwrap
from pathlib import Path

import pytest

import statescan
from statescan import nn

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts) if DOCS.exists() else []
# Installed in CI ([test]); a page that imports one of them is skipped only where it is missing.
OPTIONAL = ("torch", "transformers", "safetensors", "onnxruntime", "dask", "distributed",
            "threadpoolctl", "matplotlib")
_DIRECTIVE = re.compile(r"^(\s*)\.\. (code-block|code|sourcecode)::\s*(\S+)\s*$")


def _indented_block(lines, start, indent):
    """The lines after `start` indented deeper than `indent` (blank lines included), dedented;
    option lines (``:linenos:``) right after a directive are dropped."""
    body = []
    i = start
    while i < len(lines) and (not lines[i].strip() or
                              len(lines[i]) - len(lines[i].lstrip()) > indent):
        body.append(lines[i])
        i += 1
    while body and re.match(r"^\s*:\w[\w-]*:", body[0]):
        body.pop(0)
    return textwrap.dedent("\n".join(body)).strip("\n"), i


def blocks(text):
    """[(kind, first line number, code)]: kind is the code-block language, or "literal" for a
    ``::`` block."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        line = lines[i]
        match = _DIRECTIVE.match(line)
        if match:
            code, end = _indented_block(lines, i + 1, len(match.group(1)))
            found.append((match.group(3), i + 1, code))
            i = end
            continue
        if line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            indent = len(line) - len(line.lstrip())
            code, end = _indented_block(lines, i + 1, indent)
            found.append(("literal", i + 1, code))
            i = end
            continue
        i += 1
    return found


def _is_python(code):
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(not isinstance(node, ast.Expr) or isinstance(node.value, ast.Call)
               for node in tree.body)


def _page_id(page):
    return str(page.relative_to(DOCS))


def _marks(page):
    return [pytest.mark.dask] if "distributed" in page.read_text() else []


def test_the_docs_exist():
    assert (DOCS / "conf.py").exists() and (DOCS / "index.rst").exists(), DOCS


@pytest.mark.parametrize("page", [pytest.param(p, id=_page_id(p), marks=_marks(p))
                                  for p in PAGES])
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for kind, line, code in blocks(page.read_text()):
        if kind != "python":
            continue
        missing = [m for m in OPTIONAL if re.search(rf"^\s*(import|from) {m}\b", code, re.M)
                   and importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"{_page_id(page)}:{line} needs {', '.join(missing)} (not installed)")
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)   # noqa: S102 - our docs
        except Exception as exc:
            raise AssertionError(f"{_page_id(page)}, the example at line {line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc


@pytest.mark.parametrize("page", [pytest.param(p, id=_page_id(p)) for p in PAGES])
def test_no_python_example_is_left_unexecuted(page):
    bare = [line for kind, line, code in blocks(page.read_text())
            if kind == "literal" and _is_python(code)]
    assert not bare, (f"{_page_id(page)}: Python in '::' literal blocks at lines {bare}; use "
                      "'.. code-block:: python' (executed) or a shell language")


def test_block_parser():
    text = ("Intro::\n\n    x = 1\n\nText.\n\n.. code-block:: python\n   :linenos:\n\n"
            "    import numpy\n\n    y = 2\n\nAfter.\n\n.. code-block:: bash\n\n    pip install .\n")
    assert blocks(text) == [("literal", 1, "x = 1"), ("python", 7, "import numpy\n\ny = 2"),
                            ("bash", 16, "pip install .")]
    assert _is_python("x = f(1)") and not _is_python("pip install .")
    assert not _is_python("Some words")


def test_api_reference_lists_every_public_name():
    api = (DOCS / "api.rst").read_text()
    missing = [n for n in statescan.__all__ if f".. autofunction:: {n}\n" not in api]
    assert not missing, f"docs/api.rst does not document {missing}"
    nn_page = (DOCS / "nn.rst").read_text()
    classes = [n for n in dir(nn) if not n.startswith("_") and isinstance(getattr(nn, n), type)]
    missing = [n for n in classes if f".. autoclass:: {n}\n" not in nn_page]
    assert not missing, f"docs/nn.rst does not document {missing}"


def test_every_page_is_in_a_toctree():
    listed = set()
    for page in PAGES:
        for match in re.finditer(r"\.\. toctree::\n((?:[ \t]+.*\n|\n)+)", page.read_text()):
            base = page.parent.relative_to(DOCS)
            listed |= {str(base / entry.strip()) for entry in match.group(1).splitlines()
                       if entry.strip() and not entry.strip().startswith(":")}
    pages = {str(p.relative_to(DOCS).with_suffix("")) for p in PAGES} - {"index"}
    assert pages <= listed, pages - listed


def test_help_lists_the_functions():
    text = pydoc.plain(pydoc.render_doc(statescan))
    for name in statescan.__all__:
        assert re.search(rf"^    {name}\(", text, re.M), name


# ---- type hints (src/statescan/__init__.pyi) -------------------------------------------------

STUB = Path(statescan.__file__).with_name("__init__.pyi")


def _stub_functions():
    tree = ast.parse(STUB.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def _stub_parameters(node):
    """[(name, kind, default)] of a stub function, in inspect's terms."""
    args = node.args
    out = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults):
        out.append((arg.arg, "POSITIONAL_OR_KEYWORD",
                    inspect.Parameter.empty if default is None else ast.literal_eval(default)))
    if args.vararg:
        out.append((args.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY",
                    inspect.Parameter.empty if default is None else ast.literal_eval(default)))
    if args.kwarg:
        out.append((args.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
    return out


def test_type_stub_matches_the_runtime_signatures():
    stub = _stub_functions()
    assert set(stub) == set(statescan.__all__), set(stub) ^ set(statescan.__all__)
    for name in statescan.__all__:
        runtime = [(p.name, p.kind.name, p.default)
                   for p in inspect.signature(getattr(statescan, name)).parameters.values()]
        assert _stub_parameters(stub[name]) == runtime, name
        assert stub[name].returns is not None, f"{name}: no return type in the stub"
        annotated = [a for a in stub[name].args.args + stub[name].args.kwonlyargs
                     if a.annotation is None]
        assert not annotated, f"{name}: parameters without a type: {[a.arg for a in annotated]}"
