"""Scoring a method's outputs: test predictions per case and organ (Dice, NSD, HD95 on the original image
grid, and where each organ's voxels went), the teachers' pseudo-label quality on the unlabeled pool cases,
and ``Results``, the tables a benchmark run fills."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from runs import bench_trainers, training_stats


@dataclass
class Results:
    """Everything a run measured so far (the report's input). ``rows``: per (method, seed, organ) the mean
    over test cases; ``case_rows``: per (method, seed, test case, organ); ``costs``: per (method, seed);
    ``pl_quality``: (method, seed) -> pseudo-label quality per snapshot; ``confusions``: (method, seed) ->
    [true label, predicted label] test voxel counts; ``skipped``: "method_seedS" not in the report."""

    rows: list[dict] = field(default_factory=list)
    case_rows: list[dict] = field(default_factory=list)
    costs: list[dict] = field(default_factory=list)
    pl_quality: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    confusions: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def score(self, method: str, seed: int, pred_dir: Path, gt_dir: Path, labels: dict[int, str],
              tolerance: float) -> dict[int, dict[str, float]]:
        """Evaluate one method's test predictions of one seed into the tables; returns the per-organ means."""
        confusion = self.confusions[(method, seed)] = np.zeros((max(labels) + 1,) * 2, dtype=np.int64)
        per_case = evaluate_cases(pred_dir, gt_dir, labels, tolerance, confusion)
        scores = mean_over_cases(per_case, labels)
        self.rows += [{"method": method, "seed": seed, "label": label, "organ": labels[label], **metric}
                      for label, metric in scores.items()]
        self.case_rows += [{"method": method, "seed": seed, "case": case, "label": label, **metric}
                           for case, per_label in per_case.items() for label, metric in per_label.items()]
        return scores


def evaluate_cases(pred_dir: Path, gt_dir: Path, labels: dict[int, str], tolerance: float,
                   confusion: np.ndarray | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """Per test case (file name without .nii.gz) and label: Dice / NSD / HD95 (NaN where a class is
    absent from both). ``confusion`` ([L, L], labels 0..L-1), if given, accumulates the [true label,
    predicted label] voxel counts of the same files."""
    import SimpleITK as sitk
    from metrics import case_metrics

    cases: dict[str, dict[int, dict[str, float]]] = {}
    for gt_file in sorted(gt_dir.glob("*.nii.gz")):
        gt_img = sitk.ReadImage(str(gt_file))
        pred_file = pred_dir / gt_file.name
        if not pred_file.is_file():
            raise SystemExit(f"no prediction {pred_file} for the test label {gt_file}; re-run the prediction")
        spacing = tuple(reversed(gt_img.GetSpacing()))
        gt, pred = sitk.GetArrayFromImage(gt_img), sitk.GetArrayFromImage(sitk.ReadImage(str(pred_file)))
        if confusion is not None:
            n = confusion.shape[0]
            pairs = gt.astype(np.int64).ravel() * n + pred.astype(np.int64).ravel()
            confusion += np.bincount(pairs, minlength=n * n).reshape(n, n)
        cases[gt_file.name[:-len(".nii.gz")]] = {
            label: {"dice": m.dice, "nsd": m.nsd, "hd95": m.hd95}
            for label, m in case_metrics(pred, gt, spacing, list(labels), tolerance).items()}
    return cases


def mean_over_cases(cases: dict[str, dict[int, dict[str, float]]], labels: dict[int, str]
                    ) -> dict[int, dict[str, float]]:
    """Per label, the mean over cases of each metric (NaN where no case has a value)."""
    out = {}
    for k in labels:
        out[k] = {}
        for name in ("dice", "nsd", "hd95"):
            values = [c[k][name] for c in cases.values()]
            with np.errstate(all="ignore"):
                out[k][name] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out


def keeps_snapshots(trainer: str) -> bool:
    """Whether a benchmark trainer has a teacher and keeps its snapshots."""
    module = bench_trainers()
    cls = getattr(module, trainer, None)
    return (cls is not None and issubclass(cls, module.TeacherSnapshots)
            and bool(getattr(cls, "use_unlabeled", False)) and cls.teacher_snapshot_every > 0)


def pseudo_label_quality(fold_dir: Path, fold: int, cases: list[str], data_folder: Path, num_classes: int,
                         device: str, cache: Path | None = None, final_model: bool = False) -> list[dict]:
    """Score every teacher snapshot of a finished training on labeled preprocessed cases.

    The training folder's plans and trainer rebuild the network (nnU-Net's predictor), each snapshot's
    teacher weights are loaded, and its argmax from nnU-Net's sliding window (no mirroring) on each
    preprocessed case [c, *S] is compared with the case's preprocessed labels. Returns, per snapshot,
    {"epoch", "counts" [3, num_classes] (intersection, predicted, true voxels over all cases)}. With
    ``cache`` (a JSON file) snapshots already scored on the same cases are not predicted again. With
    ``final_model`` the one "snapshot" is the trained network of checkpoint_final.pth at its last epoch
    (for stock nnU-Net: what labeled-only training knows about the same unlabeled cases)."""
    import torch
    from evidence import overlap_counts
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunetv2_tak.model.network import unwrap_network

    if final_model:
        final = fold_dir / "checkpoint_final.pth"
        snapshots, weights_key = [(int(training_stats(fold_dir)["epochs"]), final)], "network_weights"
    else:
        snapshots, weights_key = bench_trainers().teacher_snapshots(fold_dir), "teacher"
    known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    if known.get("cases") != cases:
        known = {"cases": cases, "snapshots": {}}
    todo = [(e, p) for e, p in snapshots
            if known["snapshots"].get(str(e), {}).get("mtime_ns") != p.stat().st_mtime_ns]
    if todo:
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=device != "cpu", device=torch.device(device),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(fold_dir.parent), use_folds=(fold,),
                                                       checkpoint_name="checkpoint_final.pth")
        dataset = infer_dataset_class(str(data_folder))(str(data_folder), cases)
        loaded = [dataset.load_case(case)[:2] for case in cases]
        for epoch, path in todo:
            state = torch.load(path, map_location="cpu", weights_only=not final_model)[weights_key]
            unwrap_network(predictor.network).load_state_dict(state)  # the predictor may have compiled it
            counts = np.zeros((3, num_classes))
            for data, seg in loaded:
                logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data)).float())
                counts += overlap_counts(logits.argmax(0).cpu().numpy(), np.asarray(seg)[0], num_classes)
            known["snapshots"][str(epoch)] = {"mtime_ns": path.stat().st_mtime_ns, "counts": counts.tolist()}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
    return [{"epoch": e, "counts": known["snapshots"][str(e)]["counts"]} for e, _ in snapshots]
