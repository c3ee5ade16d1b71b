"""What a scan prints: Ray's notices that are not the user's business kept off the terminal.

Real warnings stay. Two notices go:

- Ray's note that a new local cluster turned on token authentication (its default; nothing to act
  on). Its warning that authentication is *off* stays.
- The ERROR line that the driver's Ray core worker prints for every Ray Data actor pool, about
  actor constructor arguments in the object store with ``max_restarts > 0`` (ray-project/ray#53727).
  Ray Data passes its own context and transformer that way and holds them for the life of the
  stream, so the failed restart it warns of does not happen here. The line is written by C++
  straight to file descriptor 2, so it is filtered there, and only while a stream runs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"

#: The whole line, as Ray's logger writes it: '[<time> E <pid> <tid>] core_worker.cc:<n>: Actor ...'.
ACTOR_ARGS_NOTICE = re.compile(
    rb"\[[^\]\n]*\] core_worker\.cc:\d+: Actor with class name: [^\n]*has constructor arguments in "
    rb"the object store and max_restarts > 0[^\n]*\n?")


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TOKEN_NOTICE)


def quiet_ray_notices() -> None:
    """Drop Ray's token-authentication default notice (call before ``ray.init``; idempotent)."""
    logger = logging.getLogger(TOKEN_NOTICE_LOGGER)
    if not any(isinstance(f, _DropTokenNotice) for f in logger.filters):
        logger.addFilter(_DropTokenNotice())


def _pump(read_fd: int, write_fd: int, drop: re.Pattern[bytes]) -> None:
    # A line Ray writes is one write() of under PIPE_BUF bytes, atomic in the pipe, and a read of
    # more than the pipe holds returns whole writes: each line arrives within one chunk.
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1 << 20):
            kept = drop.sub(b"", chunk)
            view = memoryview(kept)
            while view:
                view = view[os.write(write_fd, view):]


@contextmanager
def without_ray_noise(drop: re.Pattern[bytes] = ACTOR_ARGS_NOTICE) -> Iterator[None]:
    """Filter lines matching ``drop`` out of this process's stderr (file descriptor 2) while
    the block runs; everything else passes through unchanged, as it is written.

    Start no process inside the block: it would inherit the pipe.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr (a detached process): nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = threading.Thread(target=_pump, args=(read_fd, saved, drop), name="stderr-filter",
                            daemon=True)
    pump.start()
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump drains it and stops
        pump.join(timeout=10)
        if not pump.is_alive():  # else a stray holder of the pipe keeps it writing there
            os.close(saved)
