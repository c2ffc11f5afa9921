"""tenantsafe.recording.files: which shared recording files are trusted, and their locks."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from tenantsafe.recording import Recording, RecordingStore
from tenantsafe.recording.files import SharedFiles, _own_directory

RECORDED = Recording("state-1", "", "CREATE TABLE t (id int)", "digest-1")


def test_a_missing_directory_is_made_ours(tmp_path):
    directory = tmp_path / "recordings"

    assert _own_directory(directory)
    assert directory.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o722, 0o702])
def test_a_directory_others_may_write_in_is_not_trusted(tmp_path, mode):
    directory = tmp_path / "recordings"
    directory.mkdir()
    directory.chmod(mode)

    assert not _own_directory(directory)


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o711])
def test_a_directory_only_we_may_write_in_is_trusted(tmp_path, mode):
    directory = tmp_path / "recordings"
    directory.mkdir()
    directory.chmod(mode)

    assert _own_directory(directory)


def test_a_link_or_a_file_is_not_a_directory_of_ours(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("")

    assert not _own_directory(tmp_path / "link")
    assert not _own_directory(tmp_path / "file")


def test_each_state_and_tenant_type_has_a_file_of_its_own(tmp_path):
    files = SharedFiles(tmp_path)

    paths = {files.path(s, t) for s in ("state-1", "state-2") for t in ("", "type2")}

    assert len(paths) == 4
    assert all(path.parent == tmp_path and path.suffix == ".json" for path in paths)


def test_the_default_directory_is_the_users_own_in_the_temporary_directory(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    assert SharedFiles().directory == tmp_path / f"tenantsafe-recordings-{os.getuid()}"


def is_locked(path: Path) -> bool:
    with path.with_suffix(".lock").open("a") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def test_the_first_to_find_no_file_records_and_the_next_reads_its_recording(tmp_path):
    first, second = SharedFiles(tmp_path), SharedFiles(tmp_path)
    path = first.path(RECORDED.state, RECORDED.tenant_type)

    # No file: the first is to record it, and holds the file's lock meanwhile.
    assert first.read(RECORDED.state, RECORDED.tenant_type) is None
    assert is_locked(path)
    # Asked again (another look of the same store), it does not wait for itself.
    assert first.read(RECORDED.state, RECORDED.tenant_type) is None

    first.write(RECORDED)

    assert not is_locked(path)
    assert second.read(RECORDED.state, RECORDED.tenant_type) == RECORDED
    assert not is_locked(path)
    # Another state or tenant type is not this recording.
    assert second.read(RECORDED.state, "type2") is None
    second.release()


def test_a_refused_recording_is_not_shared_but_lets_the_others_go_on(tmp_path):
    files = SharedFiles(tmp_path)
    path = files.path(RECORDED.state, RECORDED.tenant_type)
    assert files.read(RECORDED.state, RECORDED.tenant_type) is None

    files.write(Recording(RECORDED.state, "", "", "", "it names the tenant"))

    assert not path.exists()
    assert not is_locked(path)


def test_closing_the_store_releases_the_locks_it_took(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with RecordingStore("default", share_files=True) as store:
        assert store.files is not None
        assert store.files.read("state-1", "") is None
        path = store.files.path("state-1", "")
        assert is_locked(path)

    assert not is_locked(path)
    assert RecordingStore("default").files is None


def test_a_file_of_another_state_or_unreadable_is_not_used(tmp_path):
    files = SharedFiles(tmp_path)
    path = files.path(RECORDED.state, "")
    files.directory.mkdir(mode=0o700, exist_ok=True)
    path.write_text(
        json.dumps({"state": "other", "tenant_type": "", "sql": "x", "fingerprint": "y"})
    )

    assert files.read(RECORDED.state, "") is None
    files.release()
    path.write_text("{not json")
    assert files.read(RECORDED.state, "") is None
    files.release()


def test_a_file_in_a_directory_others_may_write_in_is_never_read_nor_written(tmp_path):
    files = SharedFiles(tmp_path / "shared")
    files.directory.mkdir(mode=0o700)
    path = files.path(RECORDED.state, "")
    path.write_text(
        json.dumps(
            {"state": RECORDED.state, "tenant_type": "", "sql": "SELECT 1", "fingerprint": "p"}
        )
    )
    files.directory.chmod(0o777)

    assert files.read(RECORDED.state, "") is None
    files.write(RECORDED)

    assert json.loads(path.read_text())["sql"] == "SELECT 1"
    assert not path.with_suffix(".lock").exists()
