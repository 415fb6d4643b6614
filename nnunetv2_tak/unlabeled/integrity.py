"""What every preprocessed unlabeled case must be: its manifest entry records each output file's size and sha256,
taken when the case was finished. Checks against that record are cheap (sizes, and the ``.b2nd`` opens: every
training start) or complete (checksums: ``nnUNetv2_tak_preprocess_unlabeled``). Entries written before sizes and
checksums were recorded are checked by what needs no record: the ``.b2nd`` opens, or decompresses completely."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from nnunetv2_tak.fileio import file_sha256

SIZE = "size"  # recorded sizes, and the .b2nd opens (its header and chunk index are intact)
CHECKSUM = "checksum"  # recorded sizes and sha256 of every file
LEVELS = (SIZE, CHECKSUM)


def output_names(case: str) -> tuple[str, str]:
    """The files a preprocessed unlabeled case consists of: the image and nnU-Net's properties."""
    return f"{case}.b2nd", f"{case}.pkl"


def file_record(path: str | os.PathLike) -> dict:
    """What the manifest records of a finished output file."""
    return {"size": os.stat(path).st_size, "sha256": file_sha256(path)}


def open_b2nd(path: str | os.PathLike):
    """The preprocessed image as a read-only blosc2 array (memory-mapped where the platform allows)."""
    import blosc2

    mmap = {} if os.name == "nt" else {"mmap_mode": "r"}
    return blosc2.open(urlpath=str(path), mode="r", dparams={"nthreads": 1}, **mmap)


def _opens(path: Path) -> str | None:
    try:
        open_b2nd(path)
    except Exception as exc:  # blosc2 raises RuntimeError (bad header, missing trailer) or OSError
        return f"{path} cannot be opened as a blosc2 array ({type(exc).__name__}: {exc})"
    return None


def _decompresses(path: Path) -> str | None:
    """Every chunk of the .b2nd decompresses (all that can be checked without a recorded checksum)."""
    try:
        schunk = open_b2nd(path).schunk
        for i in range(schunk.nchunks):
            schunk.decompress_chunk(i)
    except Exception as exc:
        return f"{path} cannot be read completely ({type(exc).__name__}: {exc})"
    return None


def check_case(folder: Path, case: str, entry: Mapping, level: str = SIZE) -> str | None:
    """Why the files of ``case`` do not match its manifest ``entry`` (None when they do), at ``level``."""
    if level not in LEVELS:
        raise ValueError(f"verification level {level!r} is not one of {LEVELS}")
    missing = [name for name in output_names(case) if not (folder / name).is_file()]
    if missing:
        return f"{folder / missing[0]} is missing"
    files = entry.get("files")
    if not files:  # recorded before sizes and checksums were
        return _opens(folder / output_names(case)[0])
    for name, record in files.items():
        size = (folder / name).stat().st_size
        if size != record["size"]:
            return f"{folder / name} has {size} bytes, the manifest records {record['size']} (cut short or replaced?)"
    if level == SIZE:
        return _opens(folder / output_names(case)[0])
    for name, record in files.items():
        digest = file_sha256(folder / name)
        if digest != record["sha256"]:
            return (f"{folder / name} is not the file that was written: its sha256 is {digest[:16]}..., the manifest "
                    f"records {record['sha256'][:16]}... (overwritten or corrupted on disk)")
    return None


def verify_cases(folder: Path, entries: Mapping[str, Mapping], level: str = SIZE,
                 read_unrecorded: bool = False) -> tuple[dict[str, dict], dict[str, str]]:
    """(entries of the cases whose files pass ``check_case``, {case: what is wrong} of the others).

    ``read_unrecorded``: entries without records of their files are decompressed completely and, when that
    succeeds, returned with records (size, sha256) of their files as they are now; otherwise only their ``.b2nd``
    must open, and they are returned without records.
    """
    passed: dict[str, dict] = {}
    problems: dict[str, str] = {}
    for case, entry in entries.items():
        problem = check_case(folder, case, entry, level)
        if problem is None and read_unrecorded and not entry.get("files"):
            problem = _decompresses(folder / output_names(case)[0])
            if problem is None:
                entry = {**entry, "files": {name: file_record(folder / name) for name in output_names(case)}}
        if problem is None:
            passed[case] = dict(entry)
        else:
            problems[case] = problem
    return passed, problems
