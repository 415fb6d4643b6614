"""Files the plugin writes into a folder a team shares (nnUNet_preprocessed): written to a temporary file and
moved into place with ``os.replace`` (a reader never sees half a file, and a write that fails halfway, e.g. on a
full disk, leaves the previous file as it was), with the permissions nnU-Net's own files get,
``0o666 & ~umask`` (0644 under the usual umask 022), not the 0600 of ``tempfile.mkstemp``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_file_mode() -> int:
    """The mode ``open(path, 'w')`` gives a new file: 0o666 & ~umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object],
                 temporary: str | os.PathLike | None = None) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` atomically with
    nnU-Net's file mode. The temporary file is removed if ``write`` fails, and ``path`` keeps its previous content.

    ``temporary``: the temporary file's name, for callers that must recognise the leftovers of killed processes
    (default: a unique ``.<name>.XXXX.tmp``); an existing file of that name is replaced.
    """
    path = Path(path)
    if temporary is None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    else:
        tmp = str(temporary)
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # writers such as blosc2 refuse to write over an existing file
    try:
        write(tmp)
        os.chmod(tmp, shared_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the digest ``sha256sum`` prints), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
