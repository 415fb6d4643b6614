"""Cost of one TAK training iteration vs one nnUNetTrainer iteration on the same plans, side by side.

    python examples/benchmark_iteration_cost.py                     # CPU profile (16..128 features, 48x64x64)
    python examples/benchmark_iteration_cost.py --device cuda --features 32 320 --patch 64 128 128 --batch 2

Builds a synthetic dataset (labeled + unlabeled scans), plans and preprocesses it with the stock
nnU-Net commands, then measures three trainers, each in its own subprocess, alternating rounds:

  stock        nnUNetTrainer                          (nnU-Net's iteration)
  text_prior   nnUNetTrainerTAK_TextPriorOnly         (same iteration through the text-prior network)
  tak          nnUNetTrainerTAK                       (+ unlabeled batch, teacher, pseudo-labels, contrastive)
  tak_sequential  nnUNetTrainerTAK, sequential_halves  (the memory switch: one half's activations at a time)

``--mode compute`` (default) times ``train_step`` on batches fetched beforehand, with no augmentation
workers alive (``nnUNet_n_proc_DA=0`` in the measuring process: workers refilling their queues would share
the cores with the timed steps, TAK's three loaders more than stock's two); this is the compute of an
iteration, whose floor for TAK is ~2.33x (student on twice the batch plus a teacher forward on half).
``--mode full`` includes waiting for nnU-Net's augmentation workers, as many as ``nnUNet_n_proc_DA`` says.
Peak memory: CUDA max allocated, or on CPU the growth of the process's peak RSS once the trainer exists
(network, optimizer, prefetched batches, activations). Each trainer then saves its model, and the stock
``nnUNetv2_predict`` predicts the same scans with each (alternating rounds, wall time of the whole
command, as a user sees it). Prints the ratios to stock: text_prior/stock is the head's own overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from workspace import use_workspace

DATASET_ID = 503
PLANS = "nnUNetPlansBench"
KINDS = ("stock", "text_prior", "tak", "tak_sequential")


def prepare(work: Path, args: argparse.Namespace) -> str:
    """Dataset, plans and text cache (once per work dir); returns the dataset name."""
    from nnunetv2_tak.plans import shrink_plans_file
    from nnunetv2_tak.synthetic import generate_dataset

    raw = work / "nnUNet_raw"
    existing = sorted(raw.glob(f"Dataset{DATASET_ID:03d}_*"))
    dataset = existing[0] if existing else generate_dataset(raw, DATASET_ID, "TAKBench", num_training=6,
                                                            num_unlabeled=4, num_test=4, seed=0)
    pre = work / "nnUNet_preprocessed" / dataset.name
    bin_dir = Path(sys.executable).parent
    if not (pre / "nnUNetPlans_3d_fullres").is_dir():
        subprocess.run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                        "-np", "2"], check=True, capture_output=True)
    shrink_plans_file(pre / "nnUNetPlans.json", "3d_fullres", PLANS, base_features=args.features[0],
                      max_features=args.features[1], batch_size=args.batch, patch_size=args.patch)
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    plans["configurations"]["3d_fullres"]["data_identifier"] = "nnUNetPlans_3d_fullres"  # reuse the data
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))
    if not (pre / "tak_text_embeddings.pt").is_file():  # cost does not depend on the encoder's weights
        subprocess.run([str(bin_dir / "nnUNetv2_tak_encode_prompts"), "-d", str(DATASET_ID), "--pretrained",
                        "random-init"], check=True, capture_output=True)
    return dataset.name


def measure(kind: str, args: argparse.Namespace) -> dict:
    """Child process: one trainer, warm-up, timed iterations."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_tak.trainers import nnUNetTrainerTAK, nnUNetTrainerTAK_TextPriorOnly

    class BenchTAK(nnUNetTrainerTAK):
        allow_random_text_encoder = True
        contrastive_start_fraction = 0.0  # steady state: every term active

    class BenchTAKSequential(nnUNetTrainerTAK):
        allow_random_text_encoder = True
        contrastive_start_fraction = 0.0
        sequential_halves = True

    class BenchTextPrior(nnUNetTrainerTAK_TextPriorOnly):
        allow_random_text_encoder = True

    if args.mode == "compute":  # batches are fetched beforehand: no workers beside the timed steps
        os.environ["nnUNet_n_proc_DA"] = "0"
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after imports, before the trainer
    cls = {"stock": nnUNetTrainer, "text_prior": BenchTextPrior, "tak": BenchTAK,
           "tak_sequential": BenchTAKSequential}[kind]
    pre = Path(os.environ["nnUNet_preprocessed"]) / args.dataset_name
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8 reads (and pops) this key
    dataset_json = json.loads((pre / "dataset.json").read_text())
    torch.manual_seed(0)
    trainer = cls(plans, "3d_fullres", 0, dataset_json, torch.device(args.device))
    trainer.disable_checkpointing = True
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    n = args.warmup + args.iters
    if args.mode == "compute":
        labeled = [next(trainer.dataloader_train) for _ in range(n)]
        if kind.startswith("tak"):
            unlabeled = [next(trainer.dataloader_unlabeled) for _ in range(n)]
            real_unlabeled, trainer.dataloader_unlabeled = trainer.dataloader_unlabeled, iter(unlabeled)
        batches = iter(labeled)
    else:
        batches = trainer.dataloader_train
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        trainer.train_step(next(batches))
        sync()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_start) / 1024)
    if args.mode == "compute" and kind.startswith("tak"):
        trainer.dataloader_unlabeled = real_unlabeled
    trainer.disable_checkpointing = False  # on_train_end writes checkpoint_final.pth for the predict timing
    trainer.on_train_end()
    final = Path(trainer.output_folder) / "checkpoint_final.pth"
    checkpoint = torch.load(final, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = cls.__mro__[1].__name__ if kind != "stock" else cls.__name__  # a class the
    torch.save(checkpoint, final)  # predictor can find; the folder keeps this script's class name
    return {"kind": kind, "times": times, "peak_mib": peak, "trainer": cls.__name__,
            "batch": trainer.batch_size, "patch": list(trainer.configuration_manager.patch_size)}


def predict_seconds(work: Path, dataset_name: str, trainer: str, device: str) -> float:
    """Wall time of the stock ``nnUNetv2_predict`` on the dataset's imagesTs with one trainer's model."""
    output = work / "predict_cost" / trainer
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i",
           str(work / "nnUNet_raw" / dataset_name / "imagesTs"), "-o", str(output), "-d", str(DATASET_ID),
           "-c", "3d_fullres", "-p", PLANS, "-tr", trainer, "-f", "0", "-chk", "checkpoint_final.pth",
           "-device", device, "--disable_tta", "-npp", "1", "-nps", "1"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def add_plans_arguments(p: argparse.ArgumentParser) -> None:
    """Work folder and the plans measured (what ``prepare`` reads)."""
    p.add_argument("--work-dir", default="benchmark_work")
    p.add_argument("--features", type=int, nargs=2, default=[16, 128], metavar=("BASE", "MAX"))
    p.add_argument("--patch", type=int, nargs=3, default=[48, 64, 64])
    p.add_argument("--batch", type=int, default=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plans_arguments(p)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating subprocess rounds per trainer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=["compute", "full"], default="compute")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS[:3]))
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--dataset-name", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args)))
        return 0

    work = Path(args.work_dir).resolve()
    use_workspace(work)  # nnU-Net folders inside work/, CPU-friendly defaults
    name = prepare(work, args)
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results: dict[str, list[dict]] = {k: [] for k in args.kinds}
    for _ in range(args.rounds):
        for kind in args.kinds:
            proc = subprocess.run([sys.executable, __file__, *forwarded, "--child", kind, "--dataset-name", name],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                return proc.returncode
            results[kind].append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    predict: dict[str, list[float]] = {k: [] for k in args.kinds}
    for _ in range(args.rounds):
        for kind in args.kinds:
            predict[kind].append(predict_seconds(work, name, results[kind][0]["trainer"], args.device))
    first = results[args.kinds[0]][0]
    print(f"config: features {args.features}, patch {first['patch']}, batch {first['batch']} (+ the same "
          f"unlabeled for tak), device {args.device}, mode {args.mode}, {args.rounds}x{args.iters} timed "
          "iterations per trainer, alternating subprocesses")
    summary = {}
    for kind, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        summary[kind] = (statistics.median(times), max(r["peak_mib"] for r in runs), min(predict[kind]))
        print(f"  {kind:10s}: {summary[kind][0] * 1000:9.1f} ms/iteration (median), peak "
              f"{'allocated' if args.device == 'cuda' else 'RSS growth'} {summary[kind][1]:9.1f} MiB, "
              f"nnUNetv2_predict of 4 scans {summary[kind][2]:6.1f} s (best of {args.rounds})")
        print("      each timed iteration (s), by round: " + " | ".join(
            " ".join(f"{t:.2f}" for t in r["times"]) for r in runs))
    if "stock" in summary:
        for kind in summary:
            if kind != "stock":
                print(f"ratio {kind}/stock: time {summary[kind][0] / summary['stock'][0]:.3f}, "
                      f"peak memory {summary[kind][1] / summary['stock'][1]:.3f}, "
                      f"predict {summary[kind][2] / summary['stock'][2]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
