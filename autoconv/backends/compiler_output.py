"""Compiler chatter, captured: PoCL's clang writes "1 warning generated." straight to file
descriptor 2 while a program builds, past Python's sys.stderr. A build runs with fd 2 pointed at
a temporary file (one build at a time, process-wide, since a descriptor is process state), so a
successful build prints nothing; the text is kept for --verbose and shown with a failed build."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import Iterator

_redirect_lock = threading.Lock()


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Within the block, whatever is written to fd 2 goes to a list's only item (set on exit)."""
    captured: list[str] = []
    with _redirect_lock:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with tempfile.TemporaryFile() as sink:
                os.dup2(sink.fileno(), 2)
                try:
                    yield captured
                finally:
                    os.dup2(saved, 2)
                    sink.seek(0)
                    captured.append(sink.read().decode("utf-8", errors="replace"))
        finally:
            os.close(saved)
