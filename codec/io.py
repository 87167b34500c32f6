"""Atomic file writes: an artifact is either absent or complete, never truncated."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from codec.errors import CodecError, interrupts_deferred

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
    tmp_path = None
    try:
        # creating the file and taking charge of it (tmp_path) must not be cut by a Ctrl-C in between
        with interrupts_deferred():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as exc:  # a folder that is a file, no permission, a full disk: nothing written yet
                raise _write_error(
                    path, exc, f"its folder {path.parent} cannot be created or written to"
                ) from exc
            tmp_path = Path(tmp)
            os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp made the file owner-only (0600); an artifact gets the usual permissions (umask applied)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as exc:
        if tmp_path is not None:
            with interrupts_deferred(), contextlib.suppress(FileNotFoundError):
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
    write_bytes_atomic(
        path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode()
    )


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


# --- reading user paths ----------------------------------------------------------------------------------


def regular_file(path: str | os.PathLike, what: str = "file", error: type[CodecError] = CodecError) -> Path:
    """`path` as a Path, after checking (with stat, which never blocks) that it is an existing regular file.

    Opening a FIFO blocks until something writes to it, and a device or a folder reads as something
    else entirely; so every path a user hands codec (models, data, checkpoints, run state) is checked
    here before it is opened.

    Raises:
        error: one line naming the file: missing, or not a regular file (and what it is instead).
    """
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise error(f"{path}: the {what} is {kind}, not a regular file; codec reads only regular files")
    return path


# --- writing a run's outputs as a unit -------------------------------------------------------------------


def refuse_alias(outputs, inputs, error: type[CodecError] = CodecError) -> None:
    """Refuse outputs that are an input, lie around one (an output folder holding an input), or are
    each other.

    Writing over a file the command is still reading (an export's card onto its own model, `opt -o`
    onto the folder its members come from) destroys the input and exits 0; every command that writes
    calls this with all its outputs and inputs first. Paths are compared resolved (symlinks followed,
    so a link to the input counts as the input) and by file identity where both exist (hard links).

    Raises:
        error: naming both paths.
    """
    outs = [Path(p) for p in outputs if p is not None]
    ins = [Path(p) for p in inputs if p is not None]
    for k, out in enumerate(outs):
        for other, role in [(inp, "the input") for inp in ins] + [
            (o, "another output") for o in outs[k + 1 :]
        ]:
            same = out.resolve() == other.resolve()
            if not same and out.exists() and other.exists():
                with contextlib.suppress(OSError):
                    same = os.path.samefile(out, other)
            if (
                same
                or other.resolve().is_relative_to(out.resolve())
                or out.resolve().is_relative_to(other.resolve())
            ):
                raise error(f"the output {out} is (or overlaps) {role} {other}; choose another output path")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder beside `path`; on success it replaces `path` as a unit.

    A command that writes several files into an output folder (a model and its report) writes them
    all into the staging folder; only when the block finishes is the old folder (if any) moved aside
    and the staging folder renamed to `path` (one atomic exchange where Linux offers renameat2, else
    two renames, between which a SIGKILL leaves the old outputs in a hidden `.<name>.old-*` folder;
    then the old one is deleted). So an
    interrupted run leaves the previous outputs complete and untouched (plus, after a SIGKILL, a hidden
    `.<name>.stage-*` folder codec never reads), and a successful run leaves exactly its own files:
    none of an earlier run's survive. On any exception the staging folder is removed.

    Raises:
        WriteError: the parent folder cannot be created or written to, or a file is in the way.
    """
    import shutil

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(
            f"cannot write {path}: a file is in the way of the output folder; nothing was written"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.stage-", dir=path.parent))
    except OSError as exc:
        raise _write_error(path, exc, f"its folder {path.parent} cannot be created or written to") from exc
    try:
        yield stage
        os.chmod(stage, 0o777 & ~_umask())
        if path.exists() and _exchange(stage, path):
            shutil.rmtree(stage, ignore_errors=True)  # now the previous outputs
            return
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(stage, path)
        except BaseException:
            if old is not None:  # put the previous outputs back: never leave the folder missing
                os.replace(old / path.name, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, CodecError) and exc.errno in _NO_ROOM:
            raise _write_error(path, exc) from exc
        raise
