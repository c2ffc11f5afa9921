"""Why a run stops starting tenants: a signal, too many failures, an unreachable database.

The state lives in shared memory made before any executor worker is forked, so a worker
sees a stop the parent asked for (and the parent one a worker asked for) before its next
tenant.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

NONE = 0
SIGINT = 1
SIGTERM = 2
MAX_FAILURES = 3
UNREACHABLE = 4

_STATUS = {SIGINT: 130, SIGTERM: 143}


class Stop:
    def __init__(self, max_failures: int | None) -> None:
        self.max_failures = max_failures
        self._reason = multiprocessing.Value("i", NONE)
        self._failures = multiprocessing.Value("i", 0)
        self._detail: Any = multiprocessing.Array("c", 500)

    @property
    def reason(self) -> int:
        return int(self._reason.value)

    def requested(self) -> bool:
        return self.reason != NONE

    def request(self, reason: int, detail: str = "") -> None:
        with self._reason.get_lock():
            if self._reason.value == NONE:
                self._reason.value = reason
                self._detail.value = detail.encode()[:499]

    def failed(self) -> None:
        with self._failures.get_lock():
            self._failures.value += 1
            count = self._failures.value
        if self.max_failures is not None and count >= self.max_failures:
            self.request(MAX_FAILURES)

    def describe(self, alias: str) -> str:
        reason = self.reason
        if reason == SIGINT:
            return "interrupted by SIGINT"
        if reason == SIGTERM:
            return "interrupted by SIGTERM"
        if reason == MAX_FAILURES:
            return f"{self._failures.value} tenant(s) failed, --max-failures {self.max_failures}"
        if reason == UNREACHABLE:
            return f'database "{alias}" unreachable: {self._detail.value.decode(errors="replace")}'
        return ""

    @property
    def exit_status(self) -> int:
        return _STATUS.get(self.reason, 0)


@contextlib.contextmanager
def on_signals(stop: Stop) -> Iterator[None]:
    """SIGINT/SIGTERM: start no new tenant; a second one interrupts the tenant in flight."""
    if threading.current_thread() is not threading.main_thread():
        yield  # call_command from a thread: signals stay the caller's
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.requested() and stop.reason in (SIGINT, SIGTERM):
            raise KeyboardInterrupt
        stop.request(SIGINT if signum == signal.SIGINT else SIGTERM)

    previous: dict[int, Any] = {
        signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """For forking workers: they inherit the ignore, and only the parent decides to stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
