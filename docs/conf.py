"""Sphinx configuration of statescan's documentation (built by .ci/run with -W)."""
import os
import sys

try:                     # the installed package (CI builds the docs after `pip install .`)
    import statescan
except ImportError:      # a source checkout that was not installed: the package is in src/
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))
    import statescan

project = "statescan"
author = "statescan developers"
copyright = "statescan developers"
release = version = statescan.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.mathjax", "numpydoc"]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {"description": "CPU runtime for recurrent sequence models",
                      "fixed_sidebar": True}

autodoc_typehints = "none"          # numpydoc's Parameters sections give the types and shapes
autodoc_default_options = {"members": True}
autosummary_generate = False        # the API pages list their functions explicitly
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
default_role = "code"
