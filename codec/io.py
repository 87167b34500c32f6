"""Atomic file writes: an artifact is either absent or complete, never truncated."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from codec.errors import CodecError

# A full disk, an exhausted quota, a file too large or a read-only file system: the user's to fix, so a
# one-line error rather than a traceback.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class WriteError(CodecError, OSError):
    """An artifact could not be written: no room (disk full, quota, read-only file system), or its folder
    cannot be created or written to.

    Also an OSError, so code that handles OSError keeps working; `errno` is the original one."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a folder that is a file, no permission, a full disk: nothing written yet
        raise _write_error(path, exc, f"its folder {path.parent} cannot be created or written to") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp made the file owner-only (0600); an artifact gets the usual permissions (umask applied)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, CodecError) and exc.errno in _NO_ROOM:
            raise _write_error(path, exc) from exc
        raise


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status).

    The portable way (set 0, restore) opens a window in which another thread's new file gets mode 0666;
    it is only the fallback, under a lock.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def _write_error(path: Path, exc: OSError, why: str = "") -> WriteError:
    kept = "the previous version is untouched" if path.exists() else "nothing was written"
    reason = f"{why} ({exc.strerror or exc})" if why else (exc.strerror or str(exc))
    error = WriteError(f"cannot write {path}: {reason}; {kept}")
    error.errno = exc.errno
    return error


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
