"""Shards of an unlabeled preprocessing run (``--shard I --num-shards N``), their locks (pid/host/SLURM
liveness) and the manifests that record which case was made from which source with which plans."""


from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from nnunetv2_tak.unlabeled.files import MANIFEST, READABLE_MANIFEST_FORMATS, UnlabeledDataError

logger = logging.getLogger(__name__)

PART_PATTERN = re.compile(r"^tak_unlabeled\.shard-(?P<shard>\d+)-of-(?P<num>\d+)\.(?P<kind>json|lock)$")


def shard_of(case: str, num_shards: int) -> int:
    """The shard of a case id: a stable hash, the same on every machine and whatever other files exist."""
    return int.from_bytes(hashlib.sha256(case.encode()).digest()[:8], "big") % num_shards


def shard_cases(cases: Iterable[str], shard: int, num_shards: int) -> list[str]:
    """The sorted case ids of shard ``shard`` of ``num_shards`` (disjoint shards; their union is ``cases``)."""
    return sorted(case for case in cases if shard_of(case, num_shards) == shard)


def part_file(folder: Path, shard: int, num_shards: int, kind: str = "json") -> Path:
    return folder / f"tak_unlabeled.shard-{shard}-of-{num_shards}.{kind}"


def shard_files(folder: Path, kind: str) -> dict[tuple[int, int], Path]:
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = PART_PATTERN.match(path.name)
            if match and match["kind"] == kind:
                found[int(match["shard"]), int(match["num"])] = path
    return found


def check_shard_arguments(shard: int | None, num_shards: int | None) -> None:
    if shard is None or num_shards is None:
        raise UnlabeledDataError(f"--shard and --num-shards go together (got shard {shard}, num_shards {num_shards})")
    if num_shards < 1:
        raise UnlabeledDataError(f"--num-shards {num_shards}: the number of shards must be at least 1")
    if not 0 <= shard < num_shards:
        raise UnlabeledDataError(f"--shard {shard} is outside [0, {num_shards}): shards of --num-shards {num_shards} "
                                 f"are numbered 0 to {num_shards - 1} (a SLURM array: --array=0-{num_shards - 1})")


def host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):  # a killed process not yet reaped by its parent
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return True


def read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _slurm_identity() -> dict:
    """The batch job this process belongs to: SLURM keeps SLURM_JOB_ID when it requeues a job and counts the
    restarts, so a lock of the same job with another restart count was left by a preempted earlier run."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0")} if job else {}


def _dead_here(holder: dict | None) -> bool:
    """The lock's holder no longer runs: a dead pid on this host, or an earlier run of this SLURM job."""
    if holder is None:
        return False
    if holder.get("host") == host() and not pid_alive(holder["pid"]):
        return True
    mine = _slurm_identity()
    return bool(mine) and holder.get("slurm_job") == mine["slurm_job"] \
        and holder.get("slurm_restart") != mine["slurm_restart"]


def describe_lock(holder: dict | None) -> str:
    if holder is None:
        return "a process that is starting or whose lock file cannot be read"
    return f"process {holder['pid']} on {holder.get('host')} since {holder.get('started')}"


def acquire_shard_lock(folder: Path, shard: int, num_shards: int, log: Callable[[str], None]) -> Path:
    """An O_EXCL lock file per shard, holding pid, host, start time and SLURM job. A lock left by a killed
    process on this machine, or by an earlier (preempted, requeued) run of the same SLURM job on any machine,
    is taken over; any other held lock is an error that names the shard and how to clear it."""
    path = part_file(folder, shard, num_shards, "lock")
    me = {"pid": os.getpid(), "host": host(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **_slurm_identity()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = read_lock(path)
            if not _dead_here(holder):
                raise UnlabeledDataError(
                    f"shard {shard} of {num_shards} of {folder} is already being preprocessed by "
                    f"{describe_lock(holder)} (lock file {path}). Two runs of one shard would do the same work: "
                    f"wait for it to finish. If that process is not running any more (e.g. a killed job on another "
                    f"machine), delete {path} and run again; the cases it finished are kept.") from None
            _break_stale_lock(path, holder)
            log(f"TAK: shard {shard} of {num_shards}: took over the lock of {describe_lock(holder)}, which no longer "
                "runs (killed?); resuming where it stopped")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise UnlabeledDataError(f"shard {shard} of {num_shards}: could not take the lock {path} (other runs of this "
                             "shard keep starting); run one job per shard")


def _break_stale_lock(path: Path, holder: dict) -> None:
    """Moves a dead process's lock away; if another run replaced it meanwhile, puts that one back."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if read_lock(aside) != holder:  # not the lock judged dead: restore it (unless a third run took the name)
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.remove(aside)


def release_shard_lock(path: Path) -> None:
    holder = read_lock(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == host():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# --- manifests ----------------------------------------------------------------------------------
def read_manifests(folder: Path, attempts: int = 5) -> dict[Path, dict]:
    """Every manifest of the folder: ``tak_unlabeled.json`` (runs without --shard) and one part per shard.
    A part that vanishes while it is read has just been folded into ``tak_unlabeled.json`` by another run:
    everything is read again."""
    for _ in range(attempts - 1):
        manifests = _read_manifests_once(folder)
        if manifests is not None:
            return manifests
    manifests = _read_manifests_once(folder)
    if manifests is None:
        raise UnlabeledDataError(f"the manifests in {folder} kept changing while they were read ({attempts} "
                                 "attempts); wait for the other preprocessing runs to finish and run again")
    return manifests


def _read_manifests_once(folder: Path) -> dict[Path, dict] | None:
    """The manifests, or None when a shard part disappeared between listing and reading."""
    paths = [folder / MANIFEST] if (folder / MANIFEST).is_file() else []
    paths += [path for _, path in sorted(shard_files(folder, "json").items())]
    manifests = {}
    for path in paths:
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            if path.name == MANIFEST:
                raise
            return None
        except (OSError, ValueError) as exc:
            raise UnlabeledDataError(f"{path} cannot be read ({exc}); delete it and run nnUNetv2_tak_preprocess_"
                                     "unlabeled again (only cases without a record are redone)") from exc
        if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_MANIFEST_FORMATS:
            raise UnlabeledDataError(f"{path} is not an nnunetv2_tak unlabeled manifest (format "
                                     f"{' or '.join(READABLE_MANIFEST_FORMATS)}); move the folder {folder} away.")
        manifests[path] = manifest
    return manifests


def what(manifest: dict) -> str:
    if "shard" in manifest:
        return f"shard {manifest['shard']} of {manifest['num_shards']}"
    return "the run without --shard"


