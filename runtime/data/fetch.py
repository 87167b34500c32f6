"""Downloads: canonical URLs or mirrors, checksum-verified atomic writes, safe tar extraction."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from codec.errors import ConfigError, DataError
from codec.errors import first_line as _one_line  # formats.py imports it from here
from codec.io import atomic_path
from codec.runtime.data.catalog import CHECKSUMS, DATASETS, MIRROR_ENV

log = logging.getLogger(__name__)


def dataset_urls(
    name: str, filename: str, mirrors: Mapping[str, Sequence[str] | str] | None = None
) -> list[str]:
    """The URLs `filename` of dataset `name` is fetched from, in order.

    `mirrors[name]` (base URLs) wins, then `$CODEC_DATA_MIRROR` (`<base>/<name>/<filename>`), then the
    canonical sources.
    """
    if mirrors and name in mirrors:
        bases = mirrors[name]
        bases = [bases] if isinstance(bases, str) else list(bases)
    elif os.environ.get(MIRROR_ENV):
        bases = [os.environ[MIRROR_ENV].rstrip("/") + f"/{name}/"]
    else:
        bases = list(DATASETS[name].urls)
    if not bases:
        raise ConfigError(f"no URLs to download {name} from")
    return [base.rstrip("/") + "/" + filename for base in bases]


def fetch_file(
    name: str, filename: str, directory: Path, mirrors: Mapping[str, Sequence[str] | str] | None = None
) -> Path:
    """Download one file of dataset `name` into `directory`, verified against `CHECKSUMS`.

    Each URL from `dataset_urls` is tried in turn. The file appears only complete and verified; a
    failed, interrupted or mismatching download leaves nothing behind.

    Returns:
        The downloaded file's path.

    Raises:
        DataError: Every URL failed (the message names each URL, why, and where to put the file by hand).
        ConfigError: No checksum is known for the file.
    """
    expected = CHECKSUMS.get(name, {}).get(filename)
    if expected is None:
        raise ConfigError(f"no checksum known for {name} file {filename}; refusing to download it unverified")
    dest = Path(directory) / filename
    failures = []
    for url in dataset_urls(name, filename, mirrors):
        try:
            _download(url, dest, expected)
            return dest
        except _DownloadFailed as exc:
            log.warning("download of %s failed: %s", url, exc)
            failures.append(f"{url} failed ({exc})")
    raise DataError(
        f"cannot download {name}: {'; '.join(failures)}; download {filename} by hand and put it in "
        f"{dest.parent}"
    )


class _DownloadFailed(Exception):
    """One URL did not give the expected file; the next URL may."""


def _download(url: str, dest: Path, expected: str) -> None:
    from tqdm import tqdm

    algorithm, _, want = expected.partition(":")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file"):
        raise _DownloadFailed(f"unsupported URL scheme {scheme!r}")
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            digest = hashlib.new(algorithm)
            size = response.headers.get("Content-Length")
            total = int(size) if size and size.isdigit() else None
            received = 0
            with (
                open(tmp, "wb") as out,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=dest.name,
                    leave=False,
                    disable=None,  # only on a terminal
                ) as bar,
            ):
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    received += len(chunk)
            # read(n) returns b"" when the server hangs up early rather than raising, so count.
            if total is not None and received != total:
                raise _DownloadFailed(f"connection closed after {received} of {total} bytes")
            got = digest.hexdigest()
            if got != want:
                # Raised inside atomic_path, so the bad file is removed rather than renamed into place.
                raise _DownloadFailed(f"checksum mismatch: {algorithm} {got}, expected {want}")
    except _DownloadFailed:
        raise
    except urllib.error.HTTPError as exc:
        raise _DownloadFailed(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _DownloadFailed(_one_line(exc.reason)) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _DownloadFailed(f"{type(exc).__name__}: {_one_line(exc)}") from exc


def extract_tar_safely(
    archive: str | os.PathLike, dest: str | os.PathLike, only: str | None = None
) -> list[Path]:
    """Extract a tar archive, refusing it whole if any member could escape `dest`.

    Refused: absolute paths, `..` components, and anything but regular files and directories (links,
    devices, fifos). Files are written into a temporary folder inside `dest` and then renamed into place
    one by one, so a failed extraction leaves no partial files.

    Args:
        archive: The tar file (any compression tarfile reads).
        dest: The folder to extract into.
        only: When given, only members under this top-level folder are extracted.

    Returns:
        The extracted files.

    Raises:
        DataError: An unsafe member, or an unreadable archive (naming the archive).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            wanted = []
            for member in members:
                parts = _safe_member_parts(member, archive)
                if member.isfile() and (only is None or (parts and parts[0] == only)):
                    wanted.append((member, parts))
            with tempfile.TemporaryDirectory(prefix=".extract-", dir=dest) as tmp:
                staged = []
                for member, parts in wanted:
                    out = Path(tmp).joinpath(*parts)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # regular files always have data
                    with source, open(out, "wb") as f:
                        shutil.copyfileobj(source, f)
                    staged.append((out, dest.joinpath(*parts)))
                for out, final in staged:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(out, final)
                    written.append(final)
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: cannot extract: {_one_line(exc)}") from exc
    return written


def _safe_member_parts(member: tarfile.TarInfo, archive: Path) -> tuple[str, ...]:
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: unsafe member {name!r} (absolute path); refusing to extract")
    parts = tuple(p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", "."))
    if ".." in parts:
        raise DataError(f"{archive}: unsafe member {name!r} (goes up with '..'); refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: unsafe member {name!r} (a link or special file); refusing to extract")
    return parts


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
