"""The support matrix: ``nox`` runs every combination; ``nox -l`` lists them.

pyenv users make the interpreters visible first: ``pyenv shell 3.11.7 3.12.1 3.13.0``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "docs"]

MATRIX = [("3.11", "5.2"), ("3.12", "6.0"), ("3.13", "6.1")]


@nox.session
@nox.parametrize(("python", "django"), MATRIX)
@nox.parametrize("driver", ["psycopg", "psycopg2"])
def tests(session: nox.Session, django: str, driver: str) -> None:
    session.install("-e", ".[test]", f"Django=={django}.*")
    if driver == "psycopg2":
        session.install("-e", ".[psycopg2]")
        # The test extra brings psycopg 3, and Django picks it whenever it is importable.
        session.run("pip", "uninstall", "-y", "psycopg", "psycopg-binary")
    session.run("python", "runtests.py", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The documentation, with warnings as errors (a broken reference fails)."""
    session.install("-e", ".[docs]")
    out = session.create_tmp()
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", f"{out}/html")


@nox.session(python="3.11")
def package(session: nox.Session) -> None:
    """Build the sdist and wheel into a temporary directory and check them with twine."""
    session.install("build", "twine")
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    session.run("twine", "check", "--strict", *map(str, sorted(dist.iterdir())))
