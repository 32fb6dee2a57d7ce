"""Compiler chatter, captured: PoCL's clang writes "1 warning generated." straight to file
descriptor 2 while a program builds, past Python's sys.stderr. While any build runs, fd 2 points at
one temporary file shared by every concurrent build (a descriptor is process state, so builds on
several threads cannot each have their own); each build keeps what was written between its start
and its end, so a successful build prints nothing, and the text is kept for --verbose and shown
with a failed build. With builds running in parallel, one build's text may hold another's."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import IO, Iterator


class _SharedRedirect:
    """Fd 2 pointed at a temporary file while at least one capture is open."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open_captures = 0
        self.saved_fd = -1
        self.sink: IO[bytes] | None = None

    def enter(self) -> tuple[IO[bytes], int]:
        with self.lock:
            if self.open_captures == 0:
                sys.stderr.flush()
                self.saved_fd = os.dup(2)
                self.sink = tempfile.TemporaryFile()
                os.dup2(self.sink.fileno(), 2)
            self.open_captures += 1
            assert self.sink is not None
            return self.sink, os.fstat(self.sink.fileno()).st_size

    def leave(self, sink: IO[bytes], start: int) -> str:
        with self.lock:
            end = os.fstat(sink.fileno()).st_size
            text = os.pread(sink.fileno(), end - start, start).decode("utf-8", errors="replace")
            self.open_captures -= 1
            if self.open_captures == 0:
                os.dup2(self.saved_fd, 2)
                os.close(self.saved_fd)
                sink.close()
                self.sink = None
            return text


_redirect = _SharedRedirect()


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Within the block, whatever is written to fd 2 goes to a list's only item (set on exit)."""
    captured: list[str] = []
    sink, start = _redirect.enter()
    try:
        yield captured
    finally:
        captured.append(_redirect.leave(sink, start))
