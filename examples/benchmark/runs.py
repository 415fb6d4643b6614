"""Running nnU-Net for the benchmark: its console scripts with the benchmark's trainers findable by name,
trainings started or reused, predictions, and what a finished training's log says (epochs, time).

Imports nothing from nnunetv2 at module level (examples/gpu_check.py uses ``use_bench_trainers``)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

BIN = Path(sys.executable).parent
TRAINERS_FOLDER = Path(__file__).resolve().parent / "trainers"
PLANS, CONFIGURATION = "nnUNetPlans", "3d_fullres"


def use_bench_trainers(environ: MutableMapping[str, str] | None = None) -> str:
    """Make the benchmark's trainers (``trainers/``) findable by name: append that folder to
    ``nnUNet_extTrainer`` in ``environ`` (default: this process's environment, which the nnU-Net commands
    it starts inherit), after what is already there, the plugin's own folder included. nnunetv2 2.8 reads
    the variable at every trainer lookup (nnunetv2.paths), so setting it before the first lookup is enough,
    in-process (nnUNetPredictor) as in the commands. Returns the new value."""
    from nnunetv2_tak._discovery import ENV_VAR, register

    env = os.environ if environ is None else environ
    entries = register(env).split(os.pathsep)  # the plugin's folder, as its start-up hook adds it
    if not any(os.path.abspath(p) == str(TRAINERS_FOLDER) for p in entries):
        env[ENV_VAR] = os.pathsep.join([*entries, str(TRAINERS_FOLDER)])
    return env[ENV_VAR]


def bench_trainers() -> ModuleType:
    """The benchmark's trainer module (trainers/bench_trainers.py). Imported before nnU-Net's first lookup,
    it is the very module the lookup then finds in this process (nnU-Net keeps modules loaded before it)."""
    if str(TRAINERS_FOLDER) not in sys.path:
        sys.path.append(str(TRAINERS_FOLDER))
    import bench_trainers as module

    return module


def run(*cmd: str, log: Path | None = None) -> float:
    """Run a console script of this environment; returns wall seconds; output to ``log``."""
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log, "w") if log else open(os.devnull, "w") as out:
        proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}")
    return time.time() - start


@dataclass
class Bench:
    """What every method's run shares: the work folder, the benchmark dataset and this run's settings."""

    work: Path
    dataset: Path  # raw folder of the benchmark dataset (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json)
    splits: list[dict]  # its splits_final.json: fold 2s few-label split of seed s, 2s+1 the reference split
    data_folder: Path  # its preprocessed 3d_fullres cases
    labels: dict[int, str]  # foreground label -> organ
    device: str
    epochs: int
    reference_epochs: int
    reuse: bool = False
    report_only: bool = False
    nsd_mm: float = 6.0
    score_pseudo_labels: bool = True
    trained: dict[tuple[int, str, int], float] = field(default_factory=dict)  # done in this run: seconds, NaN reused

    def log(self, name: str) -> Path:
        return self.work / "logs" / name


@dataclass(frozen=True)
class Model:
    """One training: dataset id, trainer and fold; ``folder`` is nnU-Net's results folder of the fold."""

    dataset_id: int
    trainer: str
    fold: int

    @property
    def folder(self) -> Path:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        return Path(get_output_folder(self.dataset_id, self.trainer, PLANS, CONFIGURATION, self.fold))


def ensure_trained(bench: Bench, model: Model, tag: str, epochs: int, newer_than: float | None = None
                   ) -> float | None:
    """Train ``model`` with the stock ``nnUNetv2_train`` (with --reuse an interrupted one continues from its
    checkpoint_latest.pth) unless this run already did, or (--reuse, --report-only) a finished training
    (checkpoint_final.pth, written after ``newer_than`` when given: a time stamp) exists and ran ``epochs``
    epochs. Returns the training's wall seconds (NaN: reused), or None
    with --report-only when there is no finished training."""
    key = (model.dataset_id, model.trainer, model.fold)
    if key in bench.trained:
        return bench.trained[key]
    final = model.folder / "checkpoint_final.pth"
    finished = final.is_file() and (newer_than is None or final.stat().st_mtime > newer_than)
    if bench.report_only and not finished:
        return None
    if finished and (bench.reuse or bench.report_only):
        trained = training_stats(model.folder)["epochs"]
        if trained != epochs:
            raise SystemExit(f"{tag}: the finished training in {model.folder} ran {trained} epochs but this run "
                             f"asks for {epochs}; pass the settings it was trained with "
                             "(--epochs/--reference-epochs) or move that folder away to train anew")
        print(f"{tag}: reusing the finished training in {model.folder}", flush=True)
        seconds = math.nan
    else:
        # --reuse continues an interrupted training from its checkpoint_latest.pth (nnU-Net's --c; nnU-Net starts
        # anew where there is none); its log goes to a new file so the interrupted part's log is kept
        resume = ["--c"] if bench.reuse and (model.folder / "checkpoint_latest.pth").is_file() else []
        if resume:
            print(f"{tag}: continuing the interrupted training in {model.folder} (--c)", flush=True)
        seconds = run("nnUNetv2_train", str(model.dataset_id), CONFIGURATION, str(model.fold), "-tr", model.trainer,
                      "-device", bench.device, *resume,
                      log=bench.log(f"train_{tag}{'_continued' if resume else ''}.txt"))
    bench.trained[key] = seconds
    return seconds


def predict(bench: Bench, model: Model, images: Path, out: Path, log: str) -> float:
    """The stock ``nnUNetv2_predict`` of every image in ``images`` into ``out``, from checkpoint_final.pth (no
    model selection), without test-time mirroring; wall seconds."""
    return run("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(model.dataset_id), "-c",
               CONFIGURATION, "-f", str(model.fold), "-tr", model.trainer, "-chk", "checkpoint_final.pth", "-device",
               bench.device, "--disable_tta", "-npp", "1", "-nps", "1", log=bench.log(log))


def training_stats(fold_dir: Path) -> dict[str, float]:
    """From nnU-Net's log in checkpoint_final.pth: epochs, median epoch seconds, the training's wall minutes
    (first epoch's start to last epoch's end: without start-up and final validation) and, for the trainers
    with pseudo-labels, the final confident fraction of the unlabeled voxels (NaN where not logged)."""
    import torch

    log = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    starts, ends = log["epoch_start_timestamps"], log["epoch_end_timestamps"]
    epoch_s = np.subtract(ends, starts)
    coverage = log.get("tak_pl_coverage") or [float("nan")]
    return {"epochs": len(epoch_s), "epoch_s": float(np.median(epoch_s)), "train_wall_min": (ends[-1] - starts[0]) / 60,
            "pl_coverage": float(coverage[-1])}
