"""Progress of a long ``migrate_schemas_safe`` run.

A bar on a terminal, a line every ``INTERVAL`` seconds otherwise, nothing under ``-v 0``. It
follows django-tenants' ``schema_pre_migration`` / ``schema_migrated`` signals, which
fire in forked executor workers too; the counts live in shared memory so every worker adds
to the same ones.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from django_tenants.signals import schema_migrated, schema_pre_migration

from tenantsafe.results import CURRENT, PENDING, TenantRef, TenantResult

INTERVAL = 10.0
_WIDTH = 30
_ERASE = "\r\x1b[K"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(
        self,
        total: int,
        *,
        stream: TextIO,
        tty: bool | None = None,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval = interval
        self.clock = clock
        self.began = clock()
        # Shared with forked workers: they start and finish tenants, this process reports.
        self._started = multiprocessing.Value("i", 0)
        self._finished = multiprocessing.Value("i", 0)
        self._last_line = multiprocessing.Value("d", self.began)
        self._bar_shown = False

    @property
    def started_count(self) -> int:
        return int(self._started.value)

    def started(self, schema: str) -> None:
        with self._started.get_lock():
            self._started.value += 1
        if self.tty:
            # The tenant's own output follows: take the bar off its line first.
            self._erase()
        else:
            self._maybe_line()

    def finished(self, schema: str) -> None:
        with self._finished.get_lock():
            self._finished.value += 1
        if self.tty:
            self._draw(schema)

    def close(self) -> None:
        if self.tty:
            self._erase()

    def _maybe_line(self) -> None:
        now = self.clock()
        with self._last_line.get_lock():
            if now - self._last_line.value < self.interval:
                return
            self._last_line.value = now
        started = self.started_count
        elapsed = now - self.began
        text = (
            f"migrate_schemas_safe: tenant {started} of {self.total} "
            f"({100 * started // max(self.total, 1)}%), {_duration(elapsed)} elapsed"
        )
        if 1 < started < self.total:
            # The tenant just started is not done: estimate from those before it.
            left = elapsed / (started - 1) * (self.total - started + 1)
            text += f", about {_duration(left)} left"
        self._write(text + "\n")

    def _draw(self, schema: str) -> None:
        done = int(self._finished.value)
        filled = _WIDTH * done // max(self.total, 1)
        elapsed = self.clock() - self.began
        self._write(
            f"{_ERASE}[{'#' * filled}{'-' * (_WIDTH - filled)}] {done}/{self.total} "
            f"{schema} {_duration(elapsed)}"
        )
        self._bar_shown = True

    def _erase(self) -> None:
        if self._bar_shown:
            self._write(_ERASE)
            self._bar_shown = False

    def _write(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.stream.write(text)
            self.stream.flush()


@contextlib.contextmanager
def reporting(
    *,
    stream: TextIO | None,
    verbosity: int,
    check: bool,
    todo: Sequence[TenantRef],
    answered: Sequence[TenantResult],
) -> Iterator[Progress | None]:
    """Report what the read answered, then the progress of the tenants left to migrate."""
    if verbosity < 1:
        yield None
        return
    # call_command(stdout=...) hands the command's stream in with the options.
    stream = stream if stream is not None else sys.stdout
    if answered:
        counts: dict[str, int] = {}
        for result in answered:
            counts[result.status] = counts.get(result.status, 0) + 1
        parts = [f"{count} {_LABELS.get(status, status)}" for status, count in counts.items()]
        parts.append(f"{len(todo)} to {'check' if check else 'migrate'}")
        stream.write(
            f"migrate_schemas_safe: read django_migrations of {len(todo) + len(answered)} "
            f"tenant(s): {', '.join(parts)}\n"
        )
    if not todo:
        yield None
        return
    progress = Progress(len(todo), stream=stream)

    def on_start(sender: Any, schema_name: str, **kwargs: Any) -> None:
        progress.started(schema_name)

    def on_done(sender: Any, schema_name: str, **kwargs: Any) -> None:
        progress.finished(schema_name)

    uid = f"tenantsafe.progress.{id(progress)}"
    schema_pre_migration.connect(on_start, weak=False, dispatch_uid=uid)
    schema_migrated.connect(on_done, weak=False, dispatch_uid=uid)
    try:
        yield progress
    finally:
        schema_pre_migration.disconnect(dispatch_uid=uid)
        schema_migrated.disconnect(dispatch_uid=uid)
        progress.close()


_LABELS = {CURRENT: "already current (skipped)", PENDING: "with unapplied migrations"}
