"""Unlabeled preprocessing in shards on a shared folder: concurrent shard processes give exactly the files of one
process, a killed shard resumes, bad shard arguments and a second run of one shard are refused by name, and the
files are readable by the rest of a team (umask, not 0600)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import blosc2
import numpy as np
import pytest
from conftest import BIN

from nnunetv2_tak.cli.preprocess_unlabeled import main as preprocess_main
from nnunetv2_tak.text.embeddings import CACHE_FILENAME, random_text_embeddings, save_cache
from nnunetv2_tak.unlabeled import (
    MANIFEST,
    UNLABELED_DIR,
    UnlabeledDataError,
    preprocess_unlabeled,
    preprocessed_unlabeled_cases,
    shard_cases,
)

CONFIG = "3d_fullres"


@dataclass
class Shared:
    """A raw dataset whose imagesUnlabeled/ holds copies of the training images, and a preprocessed base with
    the session's plans: what a team shares on a cluster file system."""
    raw: Path
    base: Path
    plans: dict
    dataset_json: dict
    env: dict[str, str]
    source: dict[str, str]  # unlabeled case -> the training case it copies

    @property
    def folder(self) -> Path:
        return self.base / "nnUNetPlans_3d_fullres_unlabeled"

    def cases(self) -> list[str]:
        return sorted(self.source)

    def run(self, **kwargs) -> tuple[Path, list[str]]:
        return preprocess_unlabeled(self.raw, self.base, self.plans, CONFIG, self.dataset_json, progress=False,
                                    **kwargs)

    def cli(self, *args: str) -> list[str]:
        return [str(BIN / "nnUNetv2_tak_preprocess_unlabeled"), "-d", self.raw.name, "-c", CONFIG, "-np", "1", *args]


def make_shared(data, root: Path, num_cases: int) -> Shared:
    raw = root / "nnUNet_raw" / data.name
    (raw / UNLABELED_DIR).mkdir(parents=True)
    shutil.copy(data.raw / "dataset.json", raw / "dataset.json")
    base = root / "nnUNet_preprocessed" / data.name
    base.mkdir(parents=True)
    for name in ("dataset.json", "nnUNetPlans.json"):
        shutil.copy(data.preprocessed / name, base / name)
    source = {}
    for i in range(num_cases):
        source[f"u{i:03d}"] = f"case_{i % 6:04d}"
        shutil.copy(data.raw / "imagesTr" / f"{source[f'u{i:03d}']}_0000.nii.gz",
                    raw / UNLABELED_DIR / f"u{i:03d}_0000.nii.gz")
    env = {**data.env, "nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_preprocessed")}
    return Shared(raw, base, json.loads((base / "nnUNetPlans.json").read_text()),
                  json.loads((base / "dataset.json").read_text()), env, source)


def case_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if not p.name.startswith("tak_unlabeled")}


def part(folder: Path, shard: int, num_shards: int) -> Path:
    return folder / f"tak_unlabeled.shard-{shard}-of-{num_shards}.json"


def lock(folder: Path, shard: int, num_shards: int) -> Path:
    return folder / f"tak_unlabeled.shard-{shard}-of-{num_shards}.lock"


def test_three_concurrent_shard_processes_equal_one_process(prepared_dataset, tmp_path):
    shared = make_shared(prepared_dataset, tmp_path / "sharded", 9)
    assert all(shard_cases(shared.cases(), i, 3) for i in range(3))  # every process has work
    procs = [subprocess.Popen(shared.cli("--shard", str(i), "--num-shards", "3"), env=shared.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outputs)

    single = make_shared(prepared_dataset, tmp_path / "single", 9)
    single.run()
    ours, reference = case_files(shared.folder), case_files(single.folder)
    assert sorted(ours) == sorted(reference) == sorted(f"{c}.{s}" for c in shared.cases() for s in ("b2nd", "pkl"))
    for name, path in reference.items():
        if name.endswith(".b2nd"):
            np.testing.assert_array_equal(blosc2.open(str(ours[name]), mode="r")[:],
                                          blosc2.open(str(path), mode="r")[:])
        else:
            assert pickle.loads(ours[name].read_bytes()) == pickle.loads(path.read_bytes())

    parts = [json.loads(part(shared.folder, i, 3).read_text()) for i in range(3)]
    assert all(p["complete"] for p in parts) and not list(shared.folder.glob("*.lock"))
    assert [sorted(p["cases"]) for p in parts] == [shard_cases(shared.cases(), i, 3) for i in range(3)]
    assert sorted(c for p in parts for c in p["cases"]) == shared.cases()  # disjoint, union = all
    assert not (shared.folder / MANIFEST).exists()
    # training without the raw images reads the union of the parts
    assert preprocessed_unlabeled_cases(shared.base, shared.plans, CONFIG, shared.dataset_json) == \
        (shared.folder, shared.cases())
    # training with them (a run without --shard) has nothing left to do and folds the parts into one manifest
    stamps = {name: p.stat().st_mtime_ns for name, p in ours.items()}
    log: list[str] = []
    assert shared.run(log=log.append) == (shared.folder, shared.cases())
    assert not any("preprocessing" in line for line in log), log
    assert {name: p.stat().st_mtime_ns for name, p in case_files(shared.folder).items()} == stamps
    assert sorted(json.loads((shared.folder / MANIFEST).read_text())["cases"]) == shared.cases()
    assert not list(shared.folder.glob("tak_unlabeled.shard-*"))


def test_killed_shard_refuses_a_second_run_and_resumes(prepared_dataset, tmp_path):
    shared = make_shared(prepared_dataset, tmp_path, 40)
    shard = max(range(2), key=lambda i: len(shard_cases(shared.cases(), i, 2)))
    mine = shard_cases(shared.cases(), shard, 2)
    proc = subprocess.Popen(shared.cli("--shard", str(shard), "--num-shards", "2"), env=shared.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            progress = part(shared.folder, shard, 2)
            if progress.is_file() and json.loads(progress.read_text())["cases"]:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the shard ended before it could be interrupted"
        # the same shard again while it runs: refused, naming the shard, the process and the lock file
        with pytest.raises(UnlabeledDataError, match=rf"shard {shard} of 2 .* process {proc.pid} on "
                                                     rf"{socket.gethostname()} .*{lock(shared.folder, shard, 2).name}"):
            shared.run(shard=shard, num_shards=2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = json.loads(part(shared.folder, shard, 2).read_text())
    assert not done["complete"] and 0 < len(done["cases"]) < len(mine)
    assert lock(shared.folder, shard, 2).is_file()  # left behind by the killed process
    kept = {case: (shared.folder / f"{case}.b2nd").stat().st_mtime_ns for case in done["cases"]}
    with pytest.raises(UnlabeledDataError, match=rf"shard {shard} of 2 .* did not finish(.|\n)*shard {1 - shard} of 2 "
                                                 "has not run"):
        preprocessed_unlabeled_cases(shared.base, shared.plans, CONFIG, shared.dataset_json)

    log: list[str] = []
    assert shared.run(shard=shard, num_shards=2, log=log.append) == (shared.folder, mine)
    assert any(f"took over the lock of process {proc.pid}" in line for line in log), log
    assert any(f"preprocessing {len(mine) - len(kept)} unlabeled case(s)" in line for line in log), log
    assert json.loads(part(shared.folder, shard, 2).read_text())["complete"]
    assert not lock(shared.folder, shard, 2).exists()
    assert not [p for p in shared.folder.iterdir() if ".tmp-" in p.name]  # the killed run's temporaries
    assert {case: (shared.folder / f"{case}.b2nd").stat().st_mtime_ns for case in kept} == kept  # not redone
    nnunet = prepared_dataset.preprocessed / "nnUNetPlans_3d_fullres"
    for case in mine:  # every case equals nnU-Net's own preprocessing of the image it copies
        np.testing.assert_allclose(blosc2.open(str(shared.folder / f"{case}.b2nd"), mode="r")[:],
                                   blosc2.open(str(nnunet / f"{shared.source[case]}.b2nd"), mode="r")[:], atol=1e-6)


def test_bad_shard_arguments_are_refused_by_name(prepared_dataset, tmp_path, monkeypatch, caplog):
    shared = make_shared(prepared_dataset, tmp_path, 4)
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, shared.env[var])
    assert preprocess_main(["-d", shared.raw.name, "--shard", "3", "--num-shards", "3"]) == 2
    assert "--shard 3 is outside [0, 3)" in caplog.text
    assert preprocess_main(["-d", shared.raw.name, "--shard", "0"]) == 2
    assert "--shard and --num-shards go together" in caplog.text
    with pytest.raises(UnlabeledDataError, match=r"--shard -1 is outside \[0, 2\)"):
        shared.run(shard=-1, num_shards=2)
    assert not shared.folder.exists()

    # N changed between runs on one folder: refused, naming the other parts; nothing lost
    first = shard_cases(shared.cases(), 0, 2)
    assert shared.run(shard=0, num_shards=2)[1] == first
    before = {name: p.read_bytes() for name, p in case_files(shared.folder).items()}
    with pytest.raises(UnlabeledDataError, match=r"shard 1 of 3: .*another --num-shards "
                                                 r"\(tak_unlabeled\.shard-0-of-2\.json\)"):
        shared.run(shard=1, num_shards=3)
    assert {name: p.read_bytes() for name, p in case_files(shared.folder).items()} == before
    assert part(shared.folder, 0, 2).is_file() and not lock(shared.folder, 1, 3).exists()
    # the incomplete set is named where the raw images are not at hand ...
    with pytest.raises(UnlabeledDataError, match=r"shard 1 of 2 has not run"):
        preprocessed_unlabeled_cases(shared.base, shared.plans, CONFIG, shared.dataset_json)
    # ... a run without --shard (as training runs it) does only the rest and folds the parts in; then any N works
    log: list[str] = []
    shared.run(log=log.append)
    rest = len(shared.cases()) - len(first)
    assert any(f"preprocessing {rest} unlabeled case(s) of 4" in line for line in log), log
    assert {name: p.read_bytes() for name, p in case_files(shared.folder).items() if name in before} == before
    assert not part(shared.folder, 0, 2).exists()
    assert shared.run(shard=1, num_shards=3)[1] == shard_cases(shared.cases(), 1, 3)

    # a lock held by a live process, or by one on another machine, is never taken over
    held = lock(shared.folder, 2, 3)
    for holder in ({"pid": os.getpid(), "host": socket.gethostname()}, {"pid": 1, "host": "node-17"}):
        held.write_text(json.dumps({**holder, "started": "2026-01-01T00:00:00+00:00"}))
        with pytest.raises(UnlabeledDataError, match=rf"shard 2 of 3 .* process {holder['pid']} on {holder['host']}"
                                                     rf" .*delete {held}"):
            shared.run(shard=2, num_shards=3)
        assert held.is_file()
    held.unlink()
    assert shared.run(shard=2, num_shards=3)[1] == shard_cases(shared.cases(), 2, 3)

    # stale preprocessing: shards never move the folder (other shards may be writing into it)
    changed = json.loads(json.dumps(shared.plans))
    changed["configurations"][CONFIG]["spacing"] = [12.0, 8.0, 8.0]
    with pytest.raises(UnlabeledDataError, match=r"shard 0 of 3: .*made with other plans.*never move"):
        preprocess_unlabeled(shared.raw, shared.base, changed, CONFIG, shared.dataset_json, progress=False,
                             replace_stale=True, shard=0, num_shards=3)
    assert {name: p.read_bytes() for name, p in case_files(shared.folder).items() if name in before} == before


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_follow_the_umask_like_nnunet_files(prepared_dataset, tmp_path, umask):
    shared = make_shared(prepared_dataset, tmp_path, 3)
    old = os.umask(umask)
    try:
        shared.run(shard=0, num_shards=2)
        shared.run(shard=1, num_shards=2)
        parts = {p.name: stat.S_IMODE(p.stat().st_mode) for p in shared.folder.glob("tak_unlabeled.shard-*.json")}
        shared.run()  # folds the parts into tak_unlabeled.json
        save_cache(shared.base, random_text_embeddings(["background", "liver"], embed_dim=8))
        nnunet_like = tmp_path / "plain_open"
        nnunet_like.write_text("written with open(), as nnU-Net writes its files")
    finally:
        os.umask(old)
    expected = stat.S_IMODE(nnunet_like.stat().st_mode)
    assert expected == 0o666 & ~umask
    cache = shared.base / CACHE_FILENAME
    files = [*shared.folder.iterdir(), cache, cache.with_suffix(".json")]
    assert {p.name for p in files} >= {MANIFEST, "u000.b2nd", "u000.pkl", CACHE_FILENAME}
    modes = {**parts, **{p.name: stat.S_IMODE(p.stat().st_mode) for p in files}}
    assert len(parts) == 2
    assert {name: oct(mode) for name, mode in modes.items()} == {name: oct(expected) for name in modes}


def test_lock_of_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued array task usually lands on another node: its own earlier lock (same SLURM_JOB_ID, another
    SLURM_RESTART_COUNT) is stale; a lock of another job on another host is not."""
    from nnunetv2_tak.unlabeled.shards import acquire_shard_lock, part_file

    lock = part_file(tmp_path, 1, 3, "lock")
    earlier = {"pid": 1, "host": "another-node", "started": "2026-01-01T00:00:00+00:00",
               "slurm_job": "4242", "slurm_restart": "0"}
    lock.write_text(json.dumps(earlier))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    messages: list[str] = []
    assert acquire_shard_lock(tmp_path, 1, 3, messages.append) == lock
    holder = json.loads(lock.read_text())
    assert holder["pid"] == os.getpid() and holder["slurm_restart"] == "1" and "took over" in messages[0]

    lock.write_text(json.dumps({**earlier, "slurm_job": "999"}))  # another job, alive for all we know
    with pytest.raises(UnlabeledDataError, match=r"shard 1 of 3 .* already being preprocessed"):
        acquire_shard_lock(tmp_path, 1, 3, messages.append)
