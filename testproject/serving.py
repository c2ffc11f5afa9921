"""Serving the test project for the integration tests and the benchmarks: uvicorn (and other
servers) in process groups of their own, and a small HTTP client for their answers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testproject.cluster import free_port
from testproject.dbtools import ROOT


class Group:
    """A process started in a session of its own, stopped with everything it started."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, grace: float = 10) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        # Workers the process started may outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_until(self, ready: Callable[[], Any], what: str, timeout: float = 60) -> None:
        """Until ``ready()`` answers something true without raising; RuntimeError if the
        process exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not ready within {timeout:.0f}s:\n{self.output()}")
            time.sleep(0.1)


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]


def get(base: tuple[str, int], path: str, host: str, timeout: float = 10) -> Response:
    """GET ``path`` with ``Host: host``; raises TimeoutError when no answer comes in time."""
    conn = http.client.HTTPConnection(*base, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"text": raw.decode(errors="replace")[-2000:]}
    return Response(response.status, body)


@contextlib.contextmanager
def uvicorn(
    env: dict[str, str], *, workers: int = 1, app: str = "testproject.asgi:application"
) -> Iterator[tuple[tuple[str, int], Group]]:
    """uvicorn serving ``app``: ((host, port), its process group)."""
    base = ("127.0.0.1", free_port())
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        base[0],
        "--port",
        str(base[1]),
        "--workers",
        str(workers),
        "--no-access-log",
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        "5",
    ]
    workdir = Path(tempfile.mkdtemp(prefix="tenantsafe-uvicorn-"))
    server = Group(args, env, workdir / "uvicorn.log")
    try:
        # Any answer from Django (the public schema has no pages: 404) means it is serving.
        server.wait_until(lambda: get(base, "/", "localhost", 2).status, "uvicorn")
        yield base, server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
