"""Reading training checkpoints for ``--c`` with errors a user can act on, and the switch that lets a
finished run continue for more epochs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# the order in which nnU-Net's --c looks for a checkpoint (nnunetv2.run.run_training.maybe_load_checkpoint)
RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
EXTEND_ENV = "TAK_ALLOW_EXTEND"  # "1": a resumed run may have more epochs than its checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint)."""


def _load(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointError(f"{path} is not an nnU-Net training checkpoint (no 'network_weights')")
    return checkpoint


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` (on the CPU); an unreadable file raises :class:`CheckpointError` naming it
    and the intact checkpoints beside it, with how to resume from one of them."""
    path = Path(path)
    try:
        return _load(path)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a cut file
        size = path.stat().st_size if path.exists() else 0
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise CheckpointError(f"cannot read the checkpoint {path} ({size} bytes; {reason}). The file is truncated "
                              f"or corrupt (e.g. a job killed while copying it, or a full disk). "
                              f"{_alternatives(path)}") from e


def _alternatives(broken: Path) -> str:
    intact = []
    for name in RESUME_ORDER:
        other = broken.parent / name
        if other == broken or not other.is_file():
            continue
        try:
            epoch = _load(other).get("current_epoch")
        except Exception:  # a damaged sibling is simply not offered
            continue
        intact.append(f"{name} (resumes at epoch {epoch})")
    aside = f"mv {broken} {broken}.broken"
    if not intact:
        return (f"No intact checkpoint in {broken.parent}: restore the file from a backup, or move it aside "
                f"({aside}) and train again without --c.")
    return (f"Intact in the same folder: {', '.join(intact)}. To resume from it, move the broken file aside "
            f"({aside}) and rerun with --c: nnU-Net takes the first of {', '.join(RESUME_ORDER)} that exists.")


def extension_allowed(class_switch: bool) -> bool:
    """A longer schedule on resume: the trainer's ``allow_extend_epochs`` or TAK_ALLOW_EXTEND=1."""
    value = os.environ.get(EXTEND_ENV, "0").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"{EXTEND_ENV} must be 1 or 0, not {os.environ[EXTEND_ENV]!r}")
    return class_switch or value in ("1", "true", "yes")


def how_to_extend(trainer_name: str, old_epochs: int, new_epochs: int) -> str:
    """What the refusal of a changed num_epochs tells the user."""
    if new_epochs < old_epochs:
        return (f"Shortening a run ({old_epochs} -> {new_epochs} epochs) is not supported: the ramp-ups were laid out "
                f"for {old_epochs}. Keep {old_epochs} epochs, or train the shorter schedule into a new output folder.")
    return (f"To continue it for {new_epochs} instead of {old_epochs} epochs, allow it explicitly: "
            f"{EXTEND_ENV}=1 nnUNetv2_train ... -tr {trainer_name} --c (or `allow_extend_epochs = True` on the trainer "
            f"class). The schedules are then recomputed for {new_epochs} epochs: the pseudo-label weight and entropy "
            "threshold ramps, the contrastive start and nnU-Net's poly learning rate (which rises again); the "
            "change is written to the training log.")


def poly_lr(scheduler: object, epoch: int, num_epochs: int) -> float | None:
    """Learning rate of nnU-Net's PolyLRScheduler at ``epoch`` of ``num_epochs`` (None for other schedulers)."""
    if not all(hasattr(scheduler, a) for a in ("initial_lr", "exponent", "max_steps")):
        return None
    return scheduler.initial_lr * max(0.0, 1 - epoch / num_epochs) ** scheduler.exponent


def describe_extension(trainer_name: str, epoch: int, old_epochs: int, new_epochs: int, before: dict[str, float],
                       after: dict[str, float], lr_before: float | None, lr_after: float | None) -> str:
    """One log line: the run's new length and every schedule value at the resume epoch, old -> new."""
    changes = [f"{k} {before[k]:.4g} -> {after[k]:.4g}" for k in after if k in before]
    if lr_before is not None and lr_after is not None:
        changes.append(f"learning rate {lr_before:.4g} -> {lr_after:.4g}")
    return (f"TAK: extending {trainer_name} from {old_epochs} to {new_epochs} epochs at epoch {epoch} "
            f"(allow_extend_epochs / {EXTEND_ENV}); schedules recomputed for {new_epochs} epochs: {'; '.join(changes)}")


def stored_text_centering(plans_file: str | os.PathLike, configuration: str, plans_key: str) -> str:
    """The text centring a run was trained with, from its results folder's plans.json (``plans_key`` of the
    configuration, head entry), for checkpoints written before the setting was stored in them. Runs whose
    plans predate the setting, or have no plans, used the raw text ("none")."""
    try:
        with open(plans_file) as f:
            stored = json.load(f)["configurations"][configuration].get(plans_key)
    except (OSError, KeyError, ValueError):
        return "none"
    return (stored or {}).get("head", {}).get("text_centering", "none")


class SSLSettingsError(RuntimeError):
    """A resumed run whose semi-supervised settings or unlabeled data differ from its checkpoint's."""


def changed_settings(current: dict, stored: dict, allow_extend: bool) -> tuple[dict[str, tuple], bool]:
    """Settings whose value differs between the run (``current``) and its checkpoint (``stored``), as
    {name: (now, checkpoint)}, and whether the run extends the checkpoint's schedule (a larger ``num_epochs``
    with ``allow_extend``; then ``num_epochs`` is not listed as differing)."""
    differing = {k: (v, stored.get(k)) for k, v in current.items() if stored.get(k) != v}
    old_epochs = stored.get("num_epochs")
    extending = ("num_epochs" in differing and isinstance(old_epochs, int)
                 and current["num_epochs"] > old_epochs and allow_extend)
    if extending:
        del differing["num_epochs"]
    return differing, extending


def refuse_changed_settings(name: str, trainer_name: str, stored_trainer: str | None, differing: dict[str, tuple],
                            stored_epochs: object, num_epochs: int, hint: str = "") -> SSLSettingsError:
    """The error for a resume whose settings differ: every setting with both values, and how to go on."""
    listed = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (new, old) in differing.items())
    if "num_epochs" in differing and isinstance(stored_epochs, int):
        hint = f" {how_to_extend(trainer_name, stored_epochs, num_epochs)}{hint}"
    return SSLSettingsError(
        f"{name} was trained with other semi-supervised settings ({listed}). Resume with the trainer and settings "
        f"it started with ({stored_trainer}) or train into a new output folder; nothing was loaded or changed.{hint}")


def retire_final_checkpoint(filename: str, old_epochs: int) -> str:
    """nnU-Net's --c always prefers checkpoint_final.pth. Once a finished run is extended, its final checkpoint
    becomes checkpoint_final_epoch<N>.pth and a copy of it checkpoint_latest.pth, so that a later --c (after
    preemption) resumes the extended run instead of restarting it at the old end. Returns the kept file."""
    folder = os.path.dirname(os.path.abspath(filename))
    kept = os.path.join(folder, f"checkpoint_final_epoch{old_epochs}.pth")
    shutil.copyfile(filename, os.path.join(folder, "checkpoint_latest.pth"))
    os.replace(filename, kept)
    return kept
