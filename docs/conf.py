"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html``."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import django

# The version from its one source, without importing the package (which needs Django).
_INIT = Path(__file__).resolve().parent.parent / "tenantsafe" / "__init__.py"
_match = re.search(r'^__version__ = "([^"]+)"', _INIT.read_text(), re.MULTILINE)
assert _match is not None
release = version = _match.group(1)

project = "tenantsafe"
author = "the tenantsafe authors"
copyright = "2026, the tenantsafe authors"

# autodoc imports the public modules (docs/api.rst), which need configured Django settings.
sys.path.insert(0, str(_INIT.parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
django.setup()

extensions = ["myst_parser", "sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
# Section links such as [what to expect](runtime-guard.md#what-to-expect) are checked at
# build time: a broken one is a warning, and the build runs with warnings as errors.
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"tenantsafe {release}"
