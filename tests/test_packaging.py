"""The package metadata agrees with what the matrix tests and what the docs promise."""

from __future__ import annotations

import ast
import re
import tomllib

import tenantsafe
from tests.dbtools import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _matrix() -> list[tuple[str, str]]:
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "MATRIX":
            return list(ast.literal_eval(node.value))
    raise AssertionError("noxfile.py defines no MATRIX")


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[\[<>=;! ]", req, maxsplit=1)[0].lower() for req in requirements]


def test_one_version_source():
    assert "version" not in PROJECT
    assert "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "tenantsafe.__version__"
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+", tenantsafe.__version__)


def test_classifiers_and_requires_python_follow_the_matrix():
    matrix = _matrix()
    classifiers = set(PROJECT["classifiers"])
    for python, django in matrix:
        assert f"Programming Language :: Python :: {python}" in classifiers
        assert f"Framework :: Django :: {django}" in classifiers
    oldest = min(matrix, key=lambda pair: tuple(map(int, pair[0].split("."))))[0]
    assert PROJECT["requires-python"] == f">={oldest}"
    assert PROJECT["license"] == "MIT"
    assert not [c for c in classifiers if c.startswith("License ::")]


def test_drivers_are_extras_and_the_test_extra_brings_one():
    assert not {"psycopg", "psycopg2", "psycopg2-binary"} & set(_names(PROJECT["dependencies"]))
    extras = PROJECT["optional-dependencies"]
    assert extras["psycopg"] == ["psycopg[binary]>=3.1"]
    assert extras["psycopg2"] == ["psycopg2-binary>=2.9"]
    assert "tenantsafe[psycopg]" in extras["test"]
