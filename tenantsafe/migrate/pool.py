"""A fork pool whose workers get their work when they are made, never pickled.

django-tenants' multiprocessing executor uses ``multiprocessing.Pool``, which pickles each
task's function and arguments. A run's :class:`~tenantsafe.stopping.Stop` (shared memory) does
not pickle, nor would a path that carries a recording or migration state; with a Pool they
would have to wait for the workers in a module global. Here each worker is a forked
``multiprocessing.Process`` given the work as its argument (fork copies it; nothing is
pickled but the tenants going in and the results coming back). The parent hands out chunks of
``TENANT_MULTIPROCESSING_CHUNKS`` tenants over one pipe per worker, so it always knows what a
worker holds: a worker that dies fails its chunk's tenants instead of hanging the run, and one
that served ``TENANT_MULTIPROCESSING_MAX_TASKS_PER_CHILD`` chunks is replaced, as a Pool does.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from django.conf import settings
from django.db import connections

from tenantsafe import stopping
from tenantsafe.results import FAILED, TenantRef, TenantResult

# One tenant's work in a worker: (its index in the run, the tenant) -> its result.
Work = Callable[[int, TenantRef], TenantResult]
Chunk = list[tuple[int, TenantRef]]


def processes(wanted: int | None = None) -> int:
    """How many workers: ``wanted``, else django-tenants' setting (read at call time)."""
    if wanted is not None:
        return wanted
    return int(getattr(settings, "TENANT_MULTIPROCESSING_MAX_PROCESSES", 2))


def run_forked(
    work: Work, tenants: Sequence[TenantRef], alias: str, *, wanted: int | None = None
) -> list[TenantResult]:
    """``work`` for every tenant on forked workers; the results in the tenants' order.

    ``alias`` is the connection the workers use: closed here first, since the forked workers
    would share it, and closed in each worker when it ends.
    """
    chunk = int(getattr(settings, "TENANT_MULTIPROCESSING_CHUNKS", 2))
    max_chunks = getattr(settings, "TENANT_MULTIPROCESSING_MAX_TASKS_PER_CHILD", None)
    items = list(enumerate(tenants))
    todo: deque[Chunk] = deque(items[i : i + chunk] for i in range(0, len(items), chunk))
    results: dict[int, TenantResult] = {}
    connections[alias].close()
    workers = [_Worker(work, alias) for _ in range(min(max(processes(wanted), 1), len(todo)))]
    try:
        for worker in workers:
            worker.give(todo)
        while any(worker.held for worker in workers):
            ready = wait([worker.pipe for worker in workers if worker.held])
            for worker in [w for w in workers if w.pipe in ready]:
                results.update(worker.take())
                if worker.dead or worker.served == max_chunks:
                    worker.stop()
                    workers.remove(worker)
                    if todo:
                        workers.append(_Worker(work, alias))
                        workers[-1].give(todo)
                else:
                    worker.give(todo)
    finally:
        for worker in workers:
            worker.stop()
    return [results[i] for i in range(len(items))]


class _Worker:
    def __init__(self, work: Work, alias: str) -> None:
        context = multiprocessing.get_context("fork")
        self.pipe, theirs = context.Pipe()
        # The workers inherit the ignore: only the parent decides to stop (see stopping).
        with stopping.signals_ignored():
            self.process: Any = context.Process(
                target=_serve, args=(work, theirs, alias), daemon=True
            )
            self.process.start()
        theirs.close()
        self.held: Chunk = []
        self.served = 0
        self.dead = False

    def give(self, todo: deque[Chunk]) -> None:
        if todo and not self.held and not self.dead:
            self.held = todo.popleft()
            self.pipe.send(self.held)

    def take(self) -> dict[int, TenantResult]:
        """The results of the chunk it held (failures, when it died before sending them)."""
        held, self.held = self.held, []
        try:
            results: list[TenantResult] = self.pipe.recv()
        except EOFError:
            self.dead = True
            self.process.join()
            error = (
                f"the worker process migrating it exited (status {self.process.exitcode}) "
                "before reporting; run again to complete it"
            )
            return {idx: TenantResult(tenant.schema, FAILED, error) for idx, tenant in held}
        self.served += 1
        return {idx: result for (idx, _), result in zip(held, results, strict=True)}

    def stop(self) -> None:
        """No more chunks; it ends after the one it holds (whose results are dropped)."""
        with contextlib.suppress(OSError):
            self.pipe.send(None)
        while self.process.is_alive():
            if self.pipe.poll(0.2):
                try:
                    self.pipe.recv()
                except EOFError:
                    break
        self.process.join()
        self.pipe.close()


def _serve(work: Work, pipe: Connection, alias: str) -> None:
    """A worker: chunks in, their results out, until the parent sends None."""
    try:
        for chunk in iter(pipe.recv, None):
            pipe.send([work(idx, tenant) for idx, tenant in chunk])
    except EOFError:
        pass  # the parent went away
    finally:
        # Its own connection (the parent's was closed before the fork); any other it
        # inherited is the parent's, and closing it here would end the parent's session.
        connections[alias].close()
