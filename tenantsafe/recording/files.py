"""The recording files that xdist workers of one test session share.

Each worker has a test database of its own, so a recording stored in one worker's
``tenantsafe_recording`` is not seen by the others; the file is. Only ``create_tenant`` uses a
store that shares files (``RecordingStore(alias, share_files=True)``): a production process has
one database and needs none. A worker that finds no file takes the file's lock and keeps it
until it has recorded (or gave up), so the others wait for its recording instead of migrating
too. The locks belong to the store's :class:`SharedFiles`; closing the store releases them.

What a file holds is run as SQL, so a file is read only from a directory that is the user's
own and that nobody else may write in.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import IO

from tenantsafe.recording.state import Recording

# How long a worker waits for another one's recording before it migrates itself.
WAIT = 600.0


def default_directory() -> Path:
    return Path(tempfile.gettempdir()) / f"tenantsafe-recordings-{os.getuid()}"


def _own_directory(path: Path) -> bool:
    """Create the directory if needed; True only if it is ours and nobody else may write in
    it (what it holds is run as SQL)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


class SharedFiles:
    """The files of a directory (by default one per user in the temporary directory), one per
    migration state and tenant type, and the locks this store holds on them."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else default_directory()
        self._locks: dict[Path, IO[str]] = {}

    def path(self, state: str, tenant_type: str) -> Path:
        name = hashlib.sha256(f"{state}\0{tenant_type}".encode()).hexdigest()[:32]
        return self.directory / f"{name}.json"

    def read(self, state: str, tenant_type: str) -> Recording | None:
        """The shared file's recording; without one, this store is to record it (it takes the
        file's lock, waiting while another process holds it) and None."""
        path = self.path(state, tenant_type)
        if path in self._locks or not _own_directory(self.directory):
            return None
        found = _read(path, state, tenant_type)
        if found is not None:
            return found
        handle = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 - kept while recording
        deadline = time.monotonic() + WAIT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    return None
                time.sleep(0.05)
        found = _read(path, state, tenant_type)
        if found is not None:
            handle.close()
            return found
        self._locks[path] = handle
        return None

    def write(self, recording: Recording) -> None:
        """Share ``recording`` unless it says why it cannot be replayed; release the file's
        lock either way (the other workers go on, and migrate when it was refused)."""
        path = self.path(recording.state, recording.tenant_type)
        try:
            if not recording.problem and _own_directory(self.directory):
                temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                temporary.write_text(
                    json.dumps(
                        {
                            "state": recording.state,
                            "tenant_type": recording.tenant_type,
                            "sql": recording.sql,
                            "fingerprint": recording.fingerprint,
                        }
                    )
                )
                # Atomic: a worker reads the whole recording or none.
                temporary.replace(path)
        finally:
            self._unlock(path)

    def remove(self, state: str, tenant_type: str) -> None:
        with contextlib.suppress(OSError):
            self.path(state, tenant_type).unlink()

    def release(self) -> None:
        """Release every lock this store still holds (it gave up recording)."""
        for path in list(self._locks):
            self._unlock(path)

    def _unlock(self, path: Path) -> None:
        handle = self._locks.pop(path, None)
        if handle is not None:
            handle.close()


def _read(path: Path, state: str, tenant_type: str) -> Recording | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("state") != state or data.get("tenant_type") != tenant_type:
        return None
    return Recording(state, tenant_type, str(data["sql"]), str(data["fingerprint"]))
