"""A *stream*: the transaction the guard holds open for server-side cursors through a pooler.

Through a transaction pooler a server-side cursor cannot outlive its transaction, so the guard
declares it in a pinned transaction of its own and keeps that open while the cursor is read
(``strategies``; ``cursor`` reads and ends it). This module keeps the stream's books: which
cursors read in it, which of them were closed from a thread that may not touch the
connection, and whether it ended.

Who may do what (the contract):

* The connection's *owner*, the thread that uses it (Django's connections are per thread),
  makes every driver call: FETCH, CLOSE, COMMIT. It ends the stream at the connection's next
  use, or when the request ends (``request_finished`` closes or checks the connection).
* Any other thread makes none. Under ASGI, Django closes the cursor of an ``async for`` left
  early from the event loop's thread when the async generator is collected, while the request's
  thread owns the connection and may be waiting, inside the driver's connection lock, for a
  pooled server connection that only other requests' streams can give back. A driver call
  there would block the event loop, and so every request: a deadlock. Such a close only hands
  the driver cursor over (:meth:`Stream.abandon`); the owner closes it at its next use.
* The books are changed under the stream's lock, and nothing waits on the database while
  holding it: the owner takes what it must close (:meth:`Stream.end`, :meth:`Stream.settle`)
  and closes it after letting go.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any


def owns(connection: Any) -> bool:
    """Whether this thread is the one Django's ``connection`` belongs to."""
    return bool(getattr(connection, "_thread_ident", None) == threading.get_ident())


class Stream:
    """One stream's transaction: its path, its cursors (by name) and how it isolates."""

    def __init__(self, path: tuple[str, ...], *, read_committed: bool) -> None:
        self.path = path
        # Under READ COMMITTED every statement takes a snapshot of its own, also inside a
        # transaction: a read may join the stream's without seeing anything else.
        self.read_committed = read_committed
        self._lock = threading.Lock()
        self._cursors: dict[str, weakref.ref[Any]] = {}
        # Driver cursors closed by another thread, for the owner to close.
        self._abandoned: list[Any] = []
        self._ended = False

    def add(self, name: str, wrapper: Any) -> None:
        with self._lock:
            self._cursors[name] = weakref.ref(wrapper)

    def release(self, name: str) -> bool:
        """The owner closed cursor ``name``; whether no open cursor is left in the stream."""
        with self._lock:
            self._cursors.pop(name, None)
            return not self._ended and not self._live()

    def abandon(self, name: str, driver_cursor: Any) -> bool:
        """Another thread closed cursor ``name``: keep its driver cursor for the owner to
        close. False if the owner has ended the stream (and closes the cursor itself)."""
        with self._lock:
            if self._ended or self._cursors.pop(name, None) is None:
                return False
            self._abandoned.append(driver_cursor)
            return True

    def settle(self) -> tuple[list[Any], bool]:
        """The owner's: the abandoned driver cursors to close now, and whether any cursor is
        still open (else the stream is done)."""
        with self._lock:
            abandoned, self._abandoned = self._abandoned, []
            return abandoned, self._live()

    def end(self) -> tuple[list[tuple[str, Any]], list[Any]]:
        """The owner's: mark the stream ended; its cursors (name, wrapper or None if
        collected) and the abandoned driver cursors, all to be closed."""
        with self._lock:
            self._ended = True
            cursors = [(name, ref()) for name, ref in self._cursors.items()]
            abandoned = self._abandoned
            self._cursors, self._abandoned = {}, []
            return cursors, abandoned

    def _live(self) -> bool:
        # A collected cursor was never closed; end() closes it by name.
        return any(ref() is not None for ref in self._cursors.values())
