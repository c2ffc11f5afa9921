"""A stream's books (tenantsafe/guard/streams.py): which cursors still read in it, which the
owner must close for another thread, and that nothing is handed over once the owner ended it.
Pure: the driver cursors here are stand-ins the books only hold, never call."""

from __future__ import annotations

import gc
import threading

from tenantsafe.guard.streams import Stream, owns


class Wrapper:
    """Stands for a guarded cursor wrapper (the books hold it weakly)."""


def stream_with(*names: str) -> tuple[Stream, dict[str, Wrapper]]:
    stream = Stream(("alpha", "public"), read_committed=True)
    wrappers = {name: Wrapper() for name in names}
    for name, wrapper in wrappers.items():
        stream.add(name, wrapper)
    return stream, wrappers


def test_the_last_cursor_released_ends_the_stream():
    stream, _ = stream_with("a", "b")
    assert stream.release("a") is False
    assert stream.release("b") is True


def test_a_cursor_closed_by_another_thread_is_handed_to_the_owner_once():
    stream, _ = stream_with("a", "b")
    driver_cursor = object()
    assert stream.abandon("a", driver_cursor) is True
    # A second close of the same cursor hands nothing over again.
    assert stream.abandon("a", driver_cursor) is False
    assert stream.settle() == ([driver_cursor], True)
    # Settled: the owner closed it; nothing is left to close.
    assert stream.settle() == ([], True)


def test_the_stream_is_done_once_every_cursor_was_handed_over():
    stream, _ = stream_with("a")
    driver_cursor = object()
    stream.abandon("a", driver_cursor)
    assert stream.settle() == ([driver_cursor], False)


def test_a_collected_cursor_is_not_live_and_is_closed_by_name_at_the_end():
    stream, wrappers = stream_with("a", "b")
    del wrappers["a"]
    gc.collect()
    assert stream.settle() == ([], True)
    del wrappers["b"]
    gc.collect()
    assert stream.settle() == ([], False)
    cursors, abandoned = stream.end()
    assert sorted(name for name, _ in cursors) == ["a", "b"]
    assert all(wrapper is None for _, wrapper in cursors)
    assert abandoned == []


def test_end_gives_the_owner_everything_once_and_nothing_is_handed_over_after():
    stream, wrappers = stream_with("a", "b")
    driver_cursor = object()
    stream.abandon("a", driver_cursor)
    cursors, abandoned = stream.end()
    assert cursors == [("b", wrappers["b"])]
    assert abandoned == [driver_cursor]
    # The owner ended it (and closes "b" itself): another thread's close hands nothing over,
    # and a release no longer ends anything.
    assert stream.abandon("b", object()) is False
    assert stream.release("b") is False
    assert stream.end() == ([], [])


def test_every_cursor_is_closed_exactly_once_when_threads_race_the_owner():
    """Closers on other threads hand cursors over while the owner settles and then ends the
    stream: each cursor reaches the owner exactly once, by settle(), end() or by name."""
    names = [f"c{n}" for n in range(400)]
    stream, _alive = stream_with(*names)  # held: every cursor is open until closed
    driver_cursors = {name: object() for name in names}
    handed: dict[str, bool] = {}
    start = threading.Barrier(5)

    def closer(part: list[str]) -> None:
        start.wait()
        for name in part:
            handed[name] = stream.abandon(name, driver_cursors[name])

    threads = [threading.Thread(target=closer, args=(names[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    start.wait()
    closed = []
    for _ in range(50):
        closed += stream.settle()[0]
    cursors, abandoned = stream.end()
    for thread in threads:
        thread.join()
    closed += abandoned
    by_name = {id(cursor): name for name, cursor in driver_cursors.items()}
    closed_names = [by_name[id(cursor)] for cursor in closed] + [name for name, _ in cursors]
    assert sorted(closed_names) == sorted(names)
    # What was handed over is exactly what the owner closed as handed over.
    assert sorted(by_name[id(cursor)] for cursor in closed) == sorted(
        name for name, ok in handed.items() if ok
    )


def test_owns_is_the_thread_the_connection_was_made_in():
    class Connection:
        _thread_ident = threading.get_ident()

    assert owns(Connection())
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(owns(Connection())))
    thread.start()
    thread.join()
    assert seen == [False]
