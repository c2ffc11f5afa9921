"""The suite's one test of "is this CI?": under CI a missing pgbouncer fails instead of skipping."""

from __future__ import annotations

import pytest

from tests.dbtools import skip_unless_local, under_ci


@pytest.mark.parametrize(
    ("value", "ci"),
    [
        (None, False),
        ("", False),
        ("0", False),
        ("false", False),
        ("False", False),
        (" FALSE ", False),
        ("true", True),
        ("1", True),
        ("yes", True),
        ("True", True),
        ("woodpecker", True),
    ],
)
def test_any_non_empty_ci_but_0_or_false_is_ci(monkeypatch, value, ci):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert under_ci() is ci


def test_a_missing_server_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "0")
    with pytest.raises(pytest.skip.Exception, match=r"^pgbouncer is not installed$"):
        skip_unless_local("pgbouncer is not installed")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="pgbouncer is not installed, under CI=1: "):
        skip_unless_local("pgbouncer is not installed")
