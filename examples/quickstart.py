"""Quickstart: TAK in nnU-Net on a small synthetic, class-imbalanced abdominal CT cohort, offline, on CPU.

    python examples/quickstart.py                         # everything in ./quickstart_work
    python examples/quickstart.py --pretrained openai     # real CLIP text (online: downloads ViT-B-32 once)
    python examples/quickstart.py --pretrained /path/to/open_clip_vit_b_32.bin   # real CLIP text, offline
    python examples/quickstart.py --embeddings my_text_embeddings.pt            # your own embeddings

Steps, all with the stock nnU-Net commands: generate 16 labeled + 8 unlabeled (imagesUnlabeled/) + 4 test
scans in AMOS label order -> plan and preprocess -> shrink the plans to a CPU-sized network -> encode the
organ prompts -> train nnUNetTrainerTAK_CPUDemo on fold 0 (the unlabeled scans are preprocessed on first
use) -> predict the 4 held-out test scans -> per-class Dice table and a PNG of one test scan.

nnUNetTrainerTAK_CPUDemo is TAK with a CPU demo schedule (AdamW + poly decay, intensity augmentation only,
a short budget), chosen on the fold-0 validation scans of this cohort; it is not nnU-Net's recipe, which
``nnUNetTrainerTAK`` keeps. Without --pretrained/--embeddings the prompts are encoded by open_clip
ViT-B-32 with *random* weights (no weights can be downloaded offline): every code path runs, but the text
carries no anatomical knowledge. The script says so at the start and at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from workspace import use_workspace

DATASET_ID = 502
DATASET_NAME = "TAKQuickstart"
TRAINER = "nnUNetTrainerTAK_CPUDemo"
CONFIGURATION = "3d_fullres"
FOLD = "0"
COHORT = {"num_training": 16, "num_unlabeled": 8, "num_test": 4, "shape": (24, 48, 48), "spacing": (10.0, 6.0, 6.0),
          "seed": 0}
NETWORK = {"base_features": 8, "max_features": 64, "batch_size": 2}
BIN = Path(sys.executable).parent
BAR_WIDTH = 20


def run(*cmd: str) -> None:
    """Run a console script of this environment, showing the command and its output."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    subprocess.run([str(BIN / cmd[0]), *cmd[1:]], check=True)


def text_source_line(args: argparse.Namespace) -> str:
    if args.embeddings:
        return f"your embedding file {args.embeddings}"
    if args.pretrained:
        return f"open_clip {args.model} with weights {args.pretrained}"
    if own_weights(args.model):
        return f"open_clip {args.model} with the model's own weights"
    return (f"open_clip {args.model} with RANDOM weights (offline default: the text carries no anatomical "
            "knowledge; pass --pretrained openai online, or a local checkpoint, for real CLIP text)")


def own_weights(model: str) -> bool:
    """hf-hub:/local-dir: models bring their own weights (no --pretrained)."""
    return model.startswith(("hf-hub:", "local-dir:"))


def prepare(work: Path) -> Path:
    """Generate the cohort (once), plan and preprocess it with nnU-Net and shrink the plans; return the raw
    dataset folder."""
    from nnunetv2_tak.plans import shrink_plans_file
    from nnunetv2_tak.synthetic import CohortSpec, generate_dataset

    raw = work / "nnUNet_raw"
    existing = sorted(raw.glob(f"Dataset{DATASET_ID:03d}_*"))
    dataset = existing[0] if existing else generate_dataset(
        raw, DATASET_ID, DATASET_NAME, num_training=COHORT["num_training"], num_test=COHORT["num_test"],
        num_unlabeled=COHORT["num_unlabeled"], spec=CohortSpec(shape=COHORT["shape"], spacing=COHORT["spacing"]),
        seed=COHORT["seed"])
    preprocessed = work / "nnUNet_preprocessed" / dataset.name
    if not (preprocessed / f"nnUNetPlans_{CONFIGURATION}").is_dir():
        run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "2")
        shrink_plans_file(preprocessed / "nnUNetPlans.json", CONFIGURATION, **NETWORK)
    return dataset


def encode_text(args: argparse.Namespace) -> None:
    if args.embeddings:
        run("nnUNetv2_tak_encode_prompts", "-d", str(DATASET_ID), "--embeddings", args.embeddings)
    else:
        weights = [] if own_weights(args.model) and not args.pretrained else [
            "--pretrained", args.pretrained or "random-init"]
        run("nnUNetv2_tak_encode_prompts", "-d", str(DATASET_ID), "--model", args.model, *weights)


def model_folder(work: Path, dataset: Path, trainer: str = TRAINER) -> Path:
    return work / "nnUNet_results" / dataset.name / f"{trainer}__nnUNetPlans__{CONFIGURATION}"


def train(trainer: str = TRAINER) -> None:
    run("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, FOLD, "-tr", trainer, "-device", "cpu")


def class_dice(summary: Mapping) -> dict[int, float]:
    """Per-class mean Dice from an nnU-Net evaluation summary.json (NaN: class absent everywhere)."""
    return {int(label): float(m["Dice"]) for label, m in summary["mean"].items()}


def format_dice_table(dice: Mapping[int, float], names: Mapping[int, str], title: str,
                      missed_below: float = 0.005, weak_below: float = 0.1) -> tuple[str, list[str]]:
    """A per-class Dice table with a bar per organ, organs at 0 flagged (and weak ones, below
    ``weak_below``, marked); returns (text, missed organs).

    ``dice``: label value -> Dice (NaN: not in any reference or prediction); ``names``: label -> organ.
    """
    width = max(len(names[label]) for label in dice)
    lines = [title, f"  {'#':>2}  {'organ':<{width}}   Dice"]
    missed: list[str] = []
    weak: list[str] = []
    for label in sorted(dice):
        value = dice[label]
        if math.isnan(value):
            lines.append(f"  {label:>2}  {names[label]:<{width}}    n/a  (not in these scans)")
            continue
        filled = round(max(0.0, min(1.0, value)) * BAR_WIDTH)
        flag = ""
        if value < missed_below:
            missed.append(names[label])
            flag = "  <-- stayed at 0 (not found)"
        elif value < weak_below:
            weak.append(names[label])
            flag = "  <-- barely found"
        lines.append(f"  {label:>2}  {names[label]:<{width}}  {value:.3f}  {'#' * filled}{'.' * (BAR_WIDTH - filled)}"
                     f"{flag}")
    values = [v for v in dice.values() if not math.isnan(v)]
    mean = float(np.mean(values)) if values else float("nan")
    lines.append(f"  {'':>2}  {'mean (foreground)':<{width}}  {mean:.3f}")
    found = len(values) - len(missed) - len(weak)
    lines.append(f"  found {found} of {len(values)} organs (Dice >= {weak_below})"
                 + (f"; barely found: {', '.join(weak)}" if weak else "")
                 + (f"; stayed at 0: {', '.join(missed)}" if missed else ""))
    return "\n".join(lines), missed


def _best_slice(label: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice showing the most distinct organs (ties: most foreground)."""
    moved = np.moveaxis(label, axis, 0)
    scores = [(len(np.unique(s[s > 0])), int((s > 0).sum())) for s in moved]
    return int(max(range(len(scores)), key=lambda i: scores[i]))


def write_overlay_png(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray,
                      spacing: Sequence[float], names: Mapping[int, str], path: str | Path, title: str = "") -> Path:
    """Coronal and axial slice of one scan, reference beside prediction, organs coloured with a legend.

    ``image``, ``reference``, ``prediction``: [Z, Y, X] arrays of one scan; ``spacing``: (z, y, x) in mm;
    ``names``: label value -> organ name (0 = background, not drawn). The axial slice is the one showing
    the most organs in the reference, the coronal slice likewise.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if not (image.shape == reference.shape == prediction.shape) or image.ndim != 3:
        raise ValueError(f"image {image.shape}, reference {reference.shape} and prediction {prediction.shape} must "
                         "be 3D arrays of the same shape [Z, Y, X]")
    labels = sorted(label for label in names if label > 0)
    palette = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[: max(labels, default=0) + 1]
    colours = {label: palette[(label - 1) % len(palette)] for label in labels}
    table = np.zeros((max(labels, default=0) + 1, 4))
    for label, colour in colours.items():
        table[label] = colour
    cmap = ListedColormap(table)
    lo, hi = np.percentile(image, [1, 99])
    views = [("axial", 0, _best_slice(reference, 0), spacing[1] / spacing[2]),
             ("coronal", 1, _best_slice(reference, 1), spacing[0] / spacing[2])]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
    for row, (view, axis, index, aspect) in enumerate(views):
        for col, (what, seg) in enumerate((("ground truth", reference), ("prediction", prediction))):
            ax = axes[row, col]
            img = np.take(image, index, axis=axis)
            lab = np.take(seg, index, axis=axis)
            if view == "coronal":  # head up
                img, lab = img[::-1], lab[::-1]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=len(table) - 1, alpha=0.6,
                      aspect=aspect, interpolation="nearest")
            ax.set_title(f"{what}, {view} slice {index}")
            ax.axis("off")
    present = [label for label in labels if (reference == label).any() or (prediction == label).any()]
    missed = {label for label in present if not (prediction == label).any()}
    fig.legend(handles=[Patch(color=colours[label], label=f"{label} {names[label]}"
                              + (" (not predicted)" if label in missed else "")) for label in present],
               loc="outside right center", fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_scan(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """[Z, Y, X] array and (z, y, x) spacing of a NIfTI file."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(reversed(img.GetSpacing()))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="quickstart_work")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--pretrained", help="open_clip weights for the text encoder: a tag such as 'openai' "
                                           "(online, downloads once) or a local checkpoint file")
    text.add_argument("--embeddings", help="precomputed text embeddings [16, 2, D] or [32, D] in AMOS order")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model for --pretrained (also hf-hub:org/repo or "
                                                       "local-dir:/path, whose weights come with the model)")
    p.add_argument("--fresh", action="store_true", help="delete the work dir first")
    args = p.parse_args(argv)

    work = Path(args.work_dir).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    use_workspace(work)  # nnU-Net folders inside work/, CPU-friendly defaults
    source = text_source_line(args)
    print(f"TEXT SOURCE: {source}", flush=True)
    started = time.time()

    dataset = prepare(work)
    encode_text(args)
    train()
    model = model_folder(work, dataset)
    pred = work / "predictions_test"
    run("nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
        "-c", CONFIGURATION, "-f", FOLD, "-tr", TRAINER, "-device", "cpu", "--disable_tta")
    run("nnUNetv2_evaluate_folder", str(dataset / "labelsTs"), str(pred), "-djfile", str(model / "dataset.json"),
        "-pfile", str(model / "plans.json"), "-np", "1")
    minutes = (time.time() - started) / 60
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_minutes = (children.ru_utime + children.ru_stime) / 60  # every finished step, workers included

    names = {int(v): k for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items()}
    summary = json.loads((pred / "summary.json").read_text())
    table, _ = format_dice_table(
        class_dice(summary), {k: v for k, v in names.items() if k > 0},
        f"Per-class Dice on the {len(summary['metric_per_case'])} held-out test scans (original image grid):")
    cases = sorted(f.name for f in (dataset / "labelsTs").glob("*.nii.gz"))
    image, spacing = read_scan(dataset / "imagesTs" / cases[0].replace(".nii.gz", "_0000.nii.gz"))
    reference, _ = read_scan(dataset / "labelsTs" / cases[0])
    prediction, _ = read_scan(pred / cases[0])
    png = write_overlay_png(image, reference, prediction, spacing, names, work / "quickstart_overlay.png",
                            title=f"{cases[0]} (held-out): ground truth vs {TRAINER}")

    print("\n" + "=" * 78)
    print(table)
    print(f"\nTEXT SOURCE: {source}")
    print(f"main job wall time: {minutes:.1f} min (CPU time of its steps: {cpu_minutes:.1f} min; a wall time far "
          "above CPU time / number of cores means other programs shared the cores)")
    print(f"\nmodel:          {model}")
    print(f"progress plot:  {model / f'fold_{FOLD}' / 'progress.png'}")
    print(f"training log:   {model / f'fold_{FOLD}'} (training_log_*.txt; validation in validation/summary.json)")
    print(f"predictions:    {pred}")
    print(f"picture:        {png}  (axial + coronal slice of {cases[0]}, ground truth | prediction)")
    print("\nRun the model on your own images (NIfTI, named <case>_0000.nii.gz; this demo model was trained on "
          "synthetic scans, so on real CT it only shows the command):")
    print(f"  nnUNet_results={work / 'nnUNet_results'} {BIN / 'nnUNetv2_predict'} -i /path/to/your/images "
          f"-o /path/to/output -d {DATASET_ID} -c {CONFIGURATION} -f {FOLD} -tr {TRAINER} -device cpu --disable_tta")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
