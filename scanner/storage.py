"""Storage through fsspec: local paths, ``file://``, ``memory://``, ``s3://``, ``gs://``.

Ray Data retries system failures but never an exception raised inside our own stage, so transient
storage errors are retried here, with backoff, before a stage turns them into failure rows.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
import uuid
from typing import Callable, TypeVar

import fsspec
from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that may pass on a second try; a missing file or a permission error never will.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError, BrokenPipeError)
PERMANENT_OS_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a passing storage fault worth retrying."""
    if isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    # botocore/aiohttp errors are not importable without the cloud extra; match them by name.
    name = type(exc).__name__
    return any(k in name for k in ("Timeout", "Throttl", "SlowDown", "ServiceUnavailable",
                                   "ConnectionClosed", "EndpointConnection", "ClientPayload"))


def with_retries(fn: Callable[[], T], what: str, attempts: int = 4, base_delay_s: float = 0.2) -> T:
    """Return ``fn()``, retrying transient storage errors with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc):
                raise
            delay = base_delay_s * 2 ** (attempt - 1)
            logger.warning("%s: transient error %r, retry %d/%d in %.1fs", what, exc, attempt,
                           attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# Storage settings Ray workers must share with the driver, forwarded through the tasks'
# runtime_env: exactly these names (README and deploy/README list them). They name endpoints,
# regions, profiles and paths of credential files, never a secret: the runtime env shows in Ray's
# dashboard and task metadata, and a forwarded key would override the nodes' own roles. Not
# forwarded, on purpose: AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN, FSSPEC_* (fsspec reads keys from
# e.g. FSSPEC_S3_SECRET) and LENSSCAN_* (test-only fault switches among them): each node takes
# those from its own environment (roles, Kubernetes secrets, ~/.aws, ~/.config/fsspec).
WORKER_ENV_NAMES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                    "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
                    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "STORAGE_EMULATOR_HOST")


def worker_env() -> dict[str, str]:
    """The storage settings (``WORKER_ENV_NAMES``) the driver forwards to its Ray workers."""
    return {k: os.environ[k] for k in WORKER_ENV_NAMES if k in os.environ}


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """Return the fsspec filesystem for ``url`` and the path inside it.

    Object-store filesystems cache directory listings per process; other processes (Ray
    workers) write shards and manifest entries behind that cache, so every lookup starts fresh.
    """
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs, path


def protocol_of(fs: AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def full_url(fs: AbstractFileSystem, path: str) -> str:
    """Turn a path inside ``fs`` back into a URL that fsspec and Ray understand."""
    proto = protocol_of(fs)
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path.lstrip('/')}" if proto != "memory" else f"memory://{path}"


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers run in other directories); other URLs as given."""
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def location(url: str) -> tuple[str, str]:
    """Where ``url`` points, comparable across spellings: (protocol, normalised path).

    Local paths are made absolute with symlinks resolved, so ``./survey`` and a link to it match.
    """
    fs, path = fsspec.core.url_to_fs(url)
    proto = protocol_of(fs)
    if proto in ("file", "local"):
        return "file", os.path.realpath(os.path.expanduser(path))
    return proto, path.rstrip("/")


def contains(outer: str, inner: str) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (on the same filesystem)."""
    (p_out, out), (p_in, path) = location(outer), location(inner)
    return p_out == p_in and (path == out or path.startswith(out.rstrip("/") + "/"))


def join(url: str, *parts: str) -> str:
    """Join URL path parts with '/' whatever the filesystem."""
    return posixpath.join(url.rstrip("/"), *parts)


def read_bytes(url: str) -> bytes:
    """Read a whole (small) file, retrying transient errors."""
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path), f"read {url}")


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Object stores put whole objects atomically; on file systems we write a temporary name in the
    same directory and rename it, so an interrupted writer never leaves a complete-looking file.
    """
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    proto = protocol_of(fs)

    def _write() -> None:
        fs.makedirs(parent, exist_ok=True)
        if proto in ("file", "local", "memory"):
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        else:
            with fs.open(path, "wb") as f:
                f.write(data)

    with_retries(_write, f"write {url}")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.exists(path), f"stat {url}")
