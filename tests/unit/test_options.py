"""tenantsafe.options and the settings it reads: what a migrate_schemas_safe run is asked to do."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from tenantsafe import conf
from tenantsafe.options import RunOptions, duration_ms

DURATIONS = [
    ("5s", 5_000),
    ("500ms", 500),
    ("2min", 120_000),
    ("2m", 120_000),
    ("1.5s", 1_500),
    (" 3 s ", 3_000),
    ("7", 7_000),  # seconds, as the command's help says
    ("0", 0),
    ("0ms", 0),
    (5, 5_000),
    (0.25, 250),
    (0, 0),
]


@pytest.mark.parametrize(("text", "ms"), DURATIONS)
def test_duration(text, ms):
    assert duration_ms(text) == ms


@pytest.mark.parametrize("text", ["5h", "-1s", "fast", "", "5 seconds", "1e3ms"])
def test_duration_refuses_what_it_cannot_read(text):
    with pytest.raises(
        ValueError, match="is not a duration: write it as 500ms, 5s or 2min"
    ) as info:
        duration_ms(text)
    assert str(info.value).startswith(f"{text!r} ")
    assert "(0 turns it off)" in str(info.value)


def options(**given: Any) -> RunOptions:
    """RunOptions.from_command as the command builds it, with the settings' defaults."""
    return RunOptions.from_command(
        {"database": "default", **given},
        lock_timeout=conf.lock_timeout(),
        lock_retries=conf.lock_retries(),
        replay=conf.replay_migrations(),
    )


def test_the_lock_timeout_is_5s_and_3_retries_by_default():
    opts = options()
    assert (opts.lock_timeout_ms, opts.lock_retries) == (5_000, 3)


@override_settings(TENANTSAFE_LOCK_TIMEOUT="750ms", TENANTSAFE_LOCK_RETRIES=0)
def test_the_settings_set_the_lock_timeout_and_the_options_override_them():
    assert (options().lock_timeout_ms, options().lock_retries) == (750, 0)
    given = options(lock_timeout="2min", lock_retries=5)
    assert (given.lock_timeout_ms, given.lock_retries) == (120_000, 5)
    assert options(lock_timeout="0").lock_timeout_ms == 0


@pytest.mark.parametrize(
    ("given", "skips"),
    [
        ({}, True),
        ({"no_skip": True}, False),
        ({"run_syncdb": True}, False),
        ({"prune": True}, False),
        ({"fake": True}, True),
        ({"check_unapplied": True}, True),
    ],
    ids=["default", "--no-skip", "--run-syncdb", "--prune", "--fake", "--check"],
)
def test_options_that_write_with_an_empty_plan_turn_the_skip_off(given, skips):
    assert options(**given).skip_current is skips


def test_the_migrate_options_reach_migrate_with_its_checks_done_once():
    opts = options(fake_initial=True, verbosity=2)
    assert opts.migrate == {
        "database": "default",
        "fake_initial": True,
        "verbosity": 2,
        "skip_checks": True,
    }
    assert opts.verbosity == 2


@pytest.mark.parametrize(
    ("given", "max_failures"),
    [({}, None), ({"max_failures": 3}, 3), ({"fail_fast": True}, 1)],
    ids=["default", "--max-failures 3", "--fail-fast"],
)
def test_failures_that_stop_a_run(given, max_failures):
    assert options(**given).max_failures == max_failures


def test_replay_is_on_unless_turned_off():
    assert options().replay is True
    assert options(no_replay=True).replay is False
    with override_settings(TENANTSAFE_REPLAY_MIGRATIONS=False):
        assert options().replay is False
