"""Trainers of the evidence benchmark (examples/benchmark/benchmark.py): the stock nnUNetTrainer, the TAK
variants and the plain mean teacher with one shared schedule, so every method gets the same plans, iterations,
optimizer and augmentation. This folder holds trainer modules only: nnU-Net's external lookup imports every
module of each folder in ``nnUNet_extTrainer`` (runs.use_bench_trainers adds this one).

nnU-Net's recipe (SGD, momentum 0.99, poly decay, rotation/scaling/mirroring augmentation) needs
thousands of iterations before the small organs appear; on 2 CPU cores that is out of reach. The
benchmark therefore uses AdamW (lr 3e-3, poly decay) and nnU-Net's intensity augmentations only (noise,
blur, brightness, contrast, low resolution, gamma; no spatial transform, no mirroring), applied
identically to the baseline and to every variant, labeled and unlabeled stream alike. In 1,000
iterations with lr 1e-3 the fully supervised reference segmented none of the small organs but the aorta;
with 3e-3 it also reached the gallbladder, esophagus, IVC, pancreas and an adrenal gland (validation
pseudo-Dice; examples/EVIDENCE.md, "Evidence benchmark").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_tak.fileio import atomic_write
from nnunetv2_tak.trainers import (
    nnUNetTrainerMeanTeacher,
    nnUNetTrainerTAK,
    nnUNetTrainerTAK_ConfidentDiceCE,
    nnUNetTrainerTAK_NoContrastive,
    nnUNetTrainerTAK_NoText,
    nnUNetTrainerTAK_NoUnlabeled,
    nnUNetTrainerTAK_RandomText,
    nnUNetTrainerTAK_RawText,
    nnUNetTrainerTAK_ShuffledText,
)
from nnunetv2_tak.trainers.schedules import CPUSchedule

__all__ = [
    "nnUNetTrainerMeanTeacher_Bench",
    "nnUNetTrainerTAK_Bench",
    "nnUNetTrainerTAK_ConfidentDiceCE_Bench",
    "nnUNetTrainerTAK_NoContrastive_Bench",
    "nnUNetTrainerTAK_NoText_Bench",
    "nnUNetTrainerTAK_NoUnlabeled_Bench",
    "nnUNetTrainerTAK_RandomText_Bench",
    "nnUNetTrainerTAK_RandomText_Short",
    "nnUNetTrainerTAK_RawText_Bench",
    "nnUNetTrainerTAK_ShuffledText_Bench",
    "nnUNetTrainer_Bench",
    "nnUNetTrainer_BenchReference",
]

SNAPSHOT_FOLDER = "teacher_snapshots"


class BenchSchedule(CPUSchedule):
    """Mixin: the benchmark's schedule (``CPUSchedule``: AdamW + poly decay, intensity-only augmentation),
    40 x 25 iterations unless ``TAK_BENCH_EPOCHS`` (benchmark.py --epochs) says otherwise."""

    epochs_env_var: ClassVar[str | None] = "TAK_BENCH_EPOCHS"


def save_teacher_snapshot(output_folder: str | os.PathLike, epoch: int, teacher_state: dict) -> Path:
    """Write ``teacher_snapshots/epoch_NNNN.pth`` ({"epoch", "teacher"}: the EMA teacher's state dict
    only, no optimizer) atomically; returns its path."""
    folder = Path(output_folder) / SNAPSHOT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch_{epoch:04d}.pth"
    snapshot = {"epoch": epoch, "teacher": {k: v.detach().cpu() for k, v in teacher_state.items()}}
    return atomic_write(path, lambda tmp: torch.save(snapshot, tmp))


def teacher_snapshots(output_folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(epoch, path)] of the snapshots in a training folder, by epoch."""
    folder = Path(output_folder) / SNAPSHOT_FOLDER
    found = [(int(p.stem.split("_")[1]), p) for p in folder.glob("epoch_*.pth")] if folder.is_dir() else []
    return sorted(found)


class TeacherSnapshots:
    """Mixin for trainers with an EMA teacher: keep the teacher's weights every ``teacher_snapshot_every``
    epochs and at the last one (0: never). A few MB each for the benchmark's network."""

    teacher_snapshot_every: ClassVar[int] = 5

    def on_epoch_end(self):
        done = self.current_epoch + 1  # epochs completed, including this one
        every = self.teacher_snapshot_every
        if (every > 0 and self.teacher is not None and self.local_rank == 0
                and (done % every == 0 or done == self.num_epochs)):
            save_teacher_snapshot(self.output_folder, done, self.teacher.module.state_dict())
        super().on_epoch_end()


class ShortSchedule:
    """Mixin: nnU-Net's recipe (optimizer, augmentation) on a few epochs: ``TAK_SHORT_EPOCHS`` (default 2)
    x ``TAK_SHORT_ITERATIONS`` (default 50) iterations. For plumbing and cost checks (gpu_check), not
    for results."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("TAK_SHORT_EPOCHS", 2))
        self.num_iterations_per_epoch = int(os.environ.get("TAK_SHORT_ITERATIONS", 50))
        self.num_val_iterations_per_epoch = 5


class nnUNetTrainer_Bench(BenchSchedule, nnUNetTrainer):
    """Stock nnU-Net (labeled cases only) on the benchmark schedule; also the self-training recipe's two
    trainings (the second on labeled + pseudo-labeled cases)."""


class nnUNetTrainer_BenchReference(BenchSchedule, nnUNetTrainer):
    """The fully supervised reference on a longer schedule than the other methods
    (``TAK_BENCH_REFERENCE_EPOCHS``, benchmark.py --reference-epochs); its own results folder."""

    epochs_env_var = "TAK_BENCH_REFERENCE_EPOCHS"


class nnUNetTrainerTAK_Bench(TeacherSnapshots, BenchSchedule, nnUNetTrainerTAK):
    pass


class nnUNetTrainerMeanTeacher_Bench(TeacherSnapshots, BenchSchedule, nnUNetTrainerMeanTeacher):
    """The plain mean teacher (nnU-Net's network, EMA teacher, pseudo-label loss; no text): TAK without its
    text-prior head and contrastive term."""


class nnUNetTrainerTAK_NoText_Bench(TeacherSnapshots, BenchSchedule, nnUNetTrainerTAK_NoText):
    pass


class nnUNetTrainerTAK_RandomText_Bench(TeacherSnapshots, BenchSchedule, nnUNetTrainerTAK_RandomText):
    pass


class nnUNetTrainerTAK_RawText_Bench(TeacherSnapshots, BenchSchedule, nnUNetTrainerTAK_RawText):
    pass


class nnUNetTrainerTAK_ShuffledText_Bench(TeacherSnapshots, BenchSchedule, nnUNetTrainerTAK_ShuffledText):
    """The real text with the organs' descriptions permuted among the organs (does their content matter?)."""


class nnUNetTrainerTAK_NoContrastive_Bench(TeacherSnapshots, BenchSchedule, nnUNetTrainerTAK_NoContrastive):
    pass


class nnUNetTrainerTAK_NoUnlabeled_Bench(BenchSchedule, nnUNetTrainerTAK_NoUnlabeled):
    pass


class nnUNetTrainerTAK_RandomText_Short(ShortSchedule, nnUNetTrainerTAK_RandomText):
    pass


class nnUNetTrainerTAK_ConfidentDiceCE_Bench(TeacherSnapshots, BenchSchedule, nnUNetTrainerTAK_ConfidentDiceCE):
    """The alternative pseudo-label loss: nnU-Net Dice+CE on confident voxels only (the default is the
    reference's GADice on every voxel)."""
