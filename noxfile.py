"""The support matrix: ``nox`` runs every combination; ``nox -l`` lists them.

pyenv users make the interpreters visible first: ``pyenv shell 3.11.7 3.12.1 3.13.0``.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]

MATRIX = [("3.11", "5.2"), ("3.12", "6.0"), ("3.13", "6.1")]


@nox.session
@nox.parametrize(("python", "django"), MATRIX)
@nox.parametrize("driver", ["psycopg", "psycopg2"])
def tests(session: nox.Session, django: str, driver: str) -> None:
    session.install("-e", ".[test]", f"Django=={django}.*")
    if driver == "psycopg2":
        session.install("psycopg2-binary")
        # Django picks psycopg 3 whenever it is importable.
        session.run("pip", "uninstall", "-y", "psycopg", "psycopg-binary")
    session.run("python", "runtests.py", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
