"""GPU check: does TAK run on a CUDA machine at nnU-Net's default plans, and what does it cost? A few minutes.

    bash examples/gpu_check.sh                       # CUDA (the wrapper sets up the environment)
    python examples/gpu_check.py --work-dir /tmp/w   # the same, in an existing environment
    python examples/gpu_check.py --device cpu --tiny --work-dir /tmp/w   # plumbing smoke run on a CPU

Self-contained: a synthetic abdominal cohort (nnunetv2_tak.synthetic: labeled, unlabeled and test
scans) in nnUNet_* folders inside ``--work-dir``, planned and preprocessed by the stock
``nnUNetv2_plan_and_preprocess`` (nnU-Net's default 3d_fullres plans: its network, patch and batch for
the default GPU memory target), text embeddings from the open_clip text tower with random weights
(cost does not depend on the weights; no download). Then:

  1. stock nnUNetTrainer vs nnUNetTrainerTAK (and the text-prior network alone, and TAK with the memory
     switch ``sequential_halves``): iteration time and
     peak CUDA memory side by side, each trainer in its own process, with nnU-Net's AMP and nnU-Net's
     default torch.compile (on for CUDA unless ``nnUNet_compile`` says otherwise), by
     examples/benchmark_iteration_cost.py at the planned network, patch and batch;
  2. a short TAK training through the stock CLI (``nnUNetv2_train ... -tr
     nnUNetTrainerTAK_RandomText_Short``: nnU-Net's recipe, ``--epochs`` x ``--iterations``; a trainer of
     examples/benchmark/trainers/, which this script adds to ``nnUNet_extTrainer``), then the
     stock ``nnUNetv2_predict`` of the test scans with that model (nnU-Net's default test-time mirroring);
  3. prints the ratios TAK / stock (time, memory, prediction) and the wall times of steps 2.

Time: on an H100 (16 CPU cores) data, plans and text took 45 s; step 1 with torch.compile had not
finished after 6 more minutes (each trainer compiles in its own process). ``nnUNet_compile=false`` measures
eager mode (no compilation).

``--tiny`` shrinks everything (a 24x48x48 cohort, 4..32 features, 2 iterations) for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 503  # the id examples/benchmark_iteration_cost.py works on
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def run(*cmd: str, env: dict[str, str] | None = None, log: Path) -> float:
    """Run a console script of this environment, output to ``log``; wall seconds. Fails with the log's tail."""
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); full output in {log}")
    return time.perf_counter() - start


def check_fused_head(features: list[int], patch: list[int], stages: int, logs: Path, tiny: bool) -> None:
    """1b. The fused Triton head (TAK_FUSED_HEAD=1) on this GPU: the eager head's logits and gradients at 117
    classes, then its cost next to stock and the eager head (examples/benchmark_head_overhead.py)."""
    import torch

    from nnunetv2_tak.model.fused_head import apply_fused_head
    from nnunetv2_tak.model.network import TextPriorConfig, _dynamic_head_flat

    h, classes = 8, 117
    x = torch.randn(2, h, 64 ** 3 // 8, device="cuda", requires_grad=True)
    params = (torch.randn(2, classes, TextPriorConfig().num_dynamic_params, device="cuda") * 0.5).requires_grad_()
    grad = torch.randn(2, classes, x.shape[-1], device="cuda")
    ref = _dynamic_head_flat(x.double(), params.double(), h)
    ref_grads = torch.autograd.grad(ref, (x, params), grad.double())
    fused = apply_fused_head(x, params, h)
    fused_grads = torch.autograd.grad(fused, (x, params), grad)
    errors = [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
              for a, b in zip((fused, *fused_grads), (ref, *ref_grads), strict=True)]
    print("fused head vs float64 eager head, 117 classes, max relative error (logits, grad x, grad params): "
          + ", ".join(f"{e:.1e}" for e in errors))
    if max(errors) > 1e-3:
        raise SystemExit("the fused head does not match the eager head on this GPU; do not set TAK_FUSED_HEAD=1")
    cmd = [sys.executable, str(HERE / "benchmark_head_overhead.py"), "--device", "cuda", "--fused",
           "--features", str(features[0]), str(max(features)), "--patch", *map(str, patch), "--stages", str(stages),
           "--classes", "16", "117", "--modes", "train", "predict", "--iters", "3" if tiny else "10", "--rounds", "1"]
    print(run_script(cmd, logs / "head_overhead.txt"))


def run_script(cmd: list[str], log: Path) -> str:
    """Run a measurement script (``cmd[0]`` is this Python); its output, also written to ``log``."""
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"{Path(cmd[1]).stem} failed; see {log}")
    return proc.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="folder for the nnU-Net data, models and logs")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny cohort and network: a CPU smoke run of the plumbing")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per trainer (default 20; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first, incl. torch.compile "
                                                             "(default 5; tiny 1)")
    p.add_argument("--epochs", type=int, default=None, help="short training epochs (default 2; tiny 1)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default 50; tiny 2)")
    args = p.parse_args(argv)
    tiny = args.tiny
    iters, warmup = args.iters or (2 if tiny else 20), args.warmup or (1 if tiny else 5)
    epochs = args.epochs or (1 if tiny else 2)
    iterations = args.iterations or (2 if tiny else 50)

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible to torch; on a CPU run with --device cpu --tiny")
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
        os.environ.setdefault("nnUNet_compile", "true")  # nnU-Net's default (use_workspace would turn it off)
        os.environ.setdefault("nnUNet_n_proc_DA", str(min(12, os.cpu_count() or 2)))
        os.environ.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 2)))

    from workspace import use_workspace

    work = use_workspace(args.work_dir)
    sys.path.append(str(HERE / "benchmark"))
    from runs import use_bench_trainers

    use_bench_trainers()  # nnUNetTrainerTAK_RandomText_Short lives with the benchmark's trainers
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    print(f"work dir {work}; nnUNet_compile={os.environ['nnUNet_compile']}")

    from nnunetv2_tak.plans import shrink_plans_file
    from nnunetv2_tak.synthetic import CohortSpec, generate_dataset

    raw = work / "nnUNet_raw"
    existing = sorted(raw.glob(f"Dataset{DATASET_ID:03d}_*"))
    spec = CohortSpec(shape=(24, 48, 48), spacing=(10.0, 6.0, 6.0)) if tiny else \
        CohortSpec(shape=(96, 192, 192), spacing=(2.5, 1.5, 1.5))
    t0 = time.perf_counter()
    dataset = existing[0] if existing else generate_dataset(raw, DATASET_ID, "TAKGPUCheck", num_training=6,
                                                            num_unlabeled=4, num_test=4, spec=spec, seed=0)
    pre = work / "nnUNet_preprocessed" / dataset.name
    if not (pre / "nnUNetPlans_3d_fullres").is_dir():
        run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np",
            os.environ["nnUNet_def_n_proc"], log=logs / "plan_and_preprocess.txt")
        if tiny:
            shrink_plans_file(pre / "nnUNetPlans.json", "3d_fullres", base_features=4, max_features=32, batch_size=2)
    if not (pre / "tak_text_embeddings.pt").is_file():
        run("nnUNetv2_tak_encode_prompts", "-d", str(DATASET_ID), "--pretrained", "random-init",
            log=logs / "encode_prompts.txt")
    print(f"data, plans and text ready in {time.perf_counter() - t0:.0f} s")
    cfg = json.loads((pre / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    arch = cfg["architecture"]["arch_kwargs"]
    features = arch["features_per_stage"]
    print(f"plans: {cfg['architecture']['network_class_name'].rsplit('.', 1)[-1]}, features {features}, "
          f"patch {cfg['patch_size']}, batch {cfg['batch_size']}, spacing {cfg['spacing']}")

    # 1. iteration time and peak memory, side by side, at exactly these plans
    cost = [sys.executable, str(HERE / "benchmark_iteration_cost.py"), "--work-dir", str(work), "--device",
            args.device, "--features", str(features[0]), str(max(features)), "--patch", *map(str, cfg["patch_size"]),
            "--batch", str(cfg["batch_size"]), "--iters", str(iters), "--warmup", str(warmup), "--rounds", "1",
            "--kinds", "stock", "text_prior", "tak", "tak_sequential"]
    print(run_script(cost, logs / "iteration_cost.txt"))

    if args.device == "cuda":
        check_fused_head(features, cfg["patch_size"], len(features), logs, tiny)

    # 2. a short TAK training and the stock predictor
    short_env = {"TAK_SHORT_EPOCHS": str(epochs), "TAK_SHORT_ITERATIONS": str(iterations)}
    train_s = run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerTAK_RandomText_Short",
                  "-device", args.device, env=short_env, log=logs / "train_tak_short.txt")
    predict_s = run("nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(work / "predictions"), "-d",
                    str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerTAK_RandomText_Short",
                    "-chk", "checkpoint_final.pth", "-device", args.device, log=logs / "predict_tak_short.txt")
    predicted = sorted((work / "predictions").glob("*.nii.gz"))
    expected = sorted((dataset / "imagesTs").glob("*_0000.nii.gz"))
    if len(predicted) != len(expected):
        raise SystemExit(f"nnUNetv2_predict wrote {len(predicted)} of {len(expected)} predictions; see "
                         f"{logs / 'predict_tak_short.txt'}")
    print(f"short TAK training ({epochs} x {iterations} iterations, nnU-Net's recipe, incl. nnU-Net's final "
          f"validation): {train_s / 60:.1f} min; nnUNetv2_predict of {len(expected)} test scans (with mirroring): "
          f"{predict_s:.0f} s")
    print("GPU check done." if args.device == "cuda" else "CPU smoke run done (no GPU numbers).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
