"""Quickstart: TAK in nnU-Net on a small synthetic, class-imbalanced abdominal CT cohort, offline.

    python examples/quickstart.py                      # everything in ./quickstart_work
    python examples/quickstart.py --pretrained /path/to/open_clip_vit_b_32.bin   # real CLIP text
    python examples/quickstart.py --embeddings my_text_embeddings.pt            # your own embeddings

Steps, all with the stock nnU-Net commands: generate 12 labeled + 8 unlabeled (imagesUnlabeled/) +
4 test scans in AMOS label order -> plan and preprocess -> shrink the plans to a CPU-sized network ->
encode the organ prompts -> train nnUNetTrainerTAK_Quick (20 x 25 semi-supervised iterations; the
unlabeled scans are preprocessed on first use) -> predict the 4 held-out scans -> per-class Dice.

Without --pretrained/--embeddings the prompts are encoded by open_clip ViT-B-32 with *random*
weights (no weights can be downloaded offline): the run then exercises every code path but the
text carries no anatomical knowledge. The script says so at the start and at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunetv2_tak.workspace import use_workspace

DATASET_ID = 502
TRAINER = "nnUNetTrainerTAK_Quick"
BIN = Path(sys.executable).parent


def run(*cmd: str) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    subprocess.run([str(BIN / cmd[0]), *cmd[1:]], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="quickstart_work")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--pretrained", help="local open_clip checkpoint (or tag, if online) for the text encoder")
    text.add_argument("--embeddings", help="precomputed text embeddings [16, 2, D] or [32, D] in AMOS order")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name for --pretrained")
    p.add_argument("--fresh", action="store_true", help="delete the work dir first")
    args = p.parse_args(argv)

    work = Path(args.work_dir).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    use_workspace(work)  # nnU-Net folders inside work/, CPU-friendly defaults
    if args.embeddings:
        text_source = f"your embedding file {args.embeddings}"
    elif args.pretrained:
        text_source = f"open_clip {args.model} with weights {args.pretrained}"
    else:
        text_source = "open_clip ViT-B-32 with RANDOM weights (offline default: no textual knowledge)"
    print(f"TEXT SOURCE: {text_source}")
    started = time.time()

    from nnunetv2_tak.plans import shrink_plans_file
    from nnunetv2_tak.synthetic import CohortSpec, generate_dataset

    raw = work / "nnUNet_raw"
    existing = sorted(raw.glob(f"Dataset{DATASET_ID:03d}_*"))
    dataset = existing[0] if existing else generate_dataset(
        raw, DATASET_ID, "TAKQuickstart", num_training=12, num_test=4, num_unlabeled=8,
        spec=CohortSpec(shape=(24, 48, 48), spacing=(10.0, 6.0, 6.0)), seed=0)
    preprocessed = work / "nnUNet_preprocessed" / dataset.name
    if not (preprocessed / "nnUNetPlans_3d_fullres").is_dir():
        run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2")
        shrink_plans_file(preprocessed / "nnUNetPlans.json", "3d_fullres", base_features=8, max_features=64)

    if args.embeddings:
        run("nnUNetv2_tak_encode_prompts", "-d", str(DATASET_ID), "--embeddings", args.embeddings)
    else:
        run("nnUNetv2_tak_encode_prompts", "-d", str(DATASET_ID), "--model", args.model,
            "--pretrained", args.pretrained or "random-init")

    run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu")
    pred = work / "predictions_test"
    run("nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
        "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta")
    model = work / "nnUNet_results" / dataset.name / f"{TRAINER}__nnUNetPlans__3d_fullres"
    run("nnUNetv2_evaluate_folder", str(dataset / "labelsTs"), str(pred), "-djfile", str(model / "dataset.json"),
        "-pfile", str(model / "plans.json"), "-np", "1")

    summary = json.loads((pred / "summary.json").read_text())
    names = {str(v): k for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items()}
    print(f"\nPer-class Dice on {len(summary['metric_per_case'])} held-out scans (original image grid):")
    for label, metrics in sorted(summary["mean"].items(), key=lambda kv: int(kv[0])):
        print(f"  {label:>2} {names[label]:<22} {metrics['Dice']:.3f}")
    print(f"  mean (foreground)         {summary['foreground_mean']['Dice']:.3f}")
    print(f"\nTEXT SOURCE: {text_source}")
    print(f"model: {model}\nwall time: {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
