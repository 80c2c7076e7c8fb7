"""Fetch a URL into a cache directory: resumed where an earlier attempt stopped, checked against a SHA-256."""

from __future__ import annotations

import hashlib
import os
import re
from http.client import HTTPException
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit
from urllib.request import Request, urlopen

from .errors import UserError
from .files import file_sha256
from .progress import Progress

TIMEOUT_SECONDS = 30
BLOCK_BYTES = 1 << 20
_SHA256_FRAGMENT = re.compile(r"^sha256=([0-9a-fA-F]{64})$")


def split_checksum(url: str) -> tuple[str, str | None]:
    """`https://host/file#sha256=HEX` -> (`https://host/file`, hex); no fragment -> (url, None)."""
    address, _, fragment = url.partition("#")
    if not fragment:
        return url, None
    match = _SHA256_FRAGMENT.match(fragment)
    if not match:
        raise UserError(f"cannot read the checksum in {url}: write it as #sha256= and 64 hex digits")
    return address, match.group(1).lower()


def cached_path(address: str, cache_dir: Path) -> Path:
    """Where `address` is kept: its file name (which tells its kind), after a hash of the whole address."""
    name = unquote(Path(urlsplit(address).path).name) or "download"
    return cache_dir / f"{hashlib.sha256(address.encode()).hexdigest()[:12]}-{name}"


def download(url: str, cache_dir: Path, progress: bool = False,
             verify: Callable[[Path], None] | None = None) -> Path:
    """The cached copy of `url` (a `#sha256=HEX` suffix is verified), downloading what is missing.

    Bytes arrive in `NAME.partial`; a later call asks the server for the rest with an HTTP Range
    request. The file gets its final name only when complete and verified: `verify(path)` raises a
    UserError for a file that is not the one wanted, which is then deleted.
    """
    address, expected = split_checksum(url)
    path = cached_path(address, cache_dir)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _fetch(address, partial, progress)
        except OSError as e:
            raise UserError(f"cannot write the download of {address} to {cache_dir}: {e.strerror}; "
                            f"choose another --cache-dir") from None
        if verify is not None:
            try:
                verify(partial)
            except UserError:
                partial.unlink()
                raise
        os.replace(partial, path)
    if expected:
        actual = file_sha256(path)
        if actual != expected:
            path.unlink()
            raise UserError(f"{address} has SHA-256 {actual}, not the {expected} given: the download was deleted; "
                            f"check the URL and the checksum")
    return path


def _fetch(address: str, partial: Path, progress: bool) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    response = _open(address, have)
    if have and response.status != 206:  # the server sent the whole file instead of the rest
        have = 0
    length = response.headers.get("Content-Length")
    bar = Progress(f"download {partial.name[:-len('.partial')]}", have + int(length) if length else None, progress)
    done = have
    with response, partial.open("ab" if have else "wb") as f:
        try:
            while block := response.read(BLOCK_BYTES):
                f.write(block)
                done += len(block)
                bar.update("", done)
        except (URLError, TimeoutError, ConnectionError, HTTPException) as e:
            raise UserError(f"the download of {address} broke off ({_reason(e)}): run the same command again "
                            f"to resume it") from None
        finally:
            f.flush()
            os.fsync(f.fileno())
            bar.close()
    if length and done != have + int(length):
        raise UserError(f"the download of {address} ended early ({done:,} of {have + int(length):,} bytes): "
                        f"run the same command again to resume it")


def _open(address: str, have: int):
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        return urlopen(Request(address, headers=headers), timeout=TIMEOUT_SECONDS)
    except HTTPError as e:
        if e.code == 416 and have:  # the partial file is already as long as the server's: start over
            return _open(address, 0)
        raise UserError(f"cannot download {address}: HTTP {e.code} {e.reason}; check the URL") from None
    except (URLError, TimeoutError, ConnectionError, HTTPException, ValueError) as e:
        raise UserError(f"cannot download {address} ({_reason(e)}): check the URL and the network") from None


def _reason(error: Exception) -> str:
    return str(getattr(error, "reason", None) or error or type(error).__name__)
