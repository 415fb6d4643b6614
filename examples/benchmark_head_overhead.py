"""Cost of the text-prior head: forward+backward (or prediction forward) time and peak memory of the TAK
network vs the stock nnU-Net network built from the same plans, side by side in one run, for one or more
class counts (16: AMOS, 117: TotalSegmentator).

    python examples/benchmark_head_overhead.py                       # CPU-sized 3D configuration
    python examples/benchmark_head_overhead.py --features 32 320 --patch 64 64 64 --stages 5 \
        --classes 16 50 117 --modes train predict --checkpointed   # the numbers in examples/HEAD_OVERHEAD.md
    python examples/benchmark_head_overhead.py --features 32 320 --patch 128 128 128 --stages 6 \
        --classes 16 50 117 --device cuda

Each measurement (network x class count x mode) runs in its own subprocess, so peak memory is per network:
CUDA max allocated, or on CPU the growth of the process's peak RSS from before the network is built.
Runs alternate between the networks to share machine noise. Time is the median wall time of a step; on CPU
also the process CPU time (less sensitive to other processes on a shared machine). ``--checkpointed`` adds
the TAK network with the head's previous eager formulation (activation-checkpointed chunks, what
torch.compile traces) as a third network, to compare the two; ``--fused`` the fused Triton head
(``TAK_FUSED_HEAD=1``, nnunetv2_tak.model.fused_head; CUDA). Prints a table of ratios to stock.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def configuration(features: tuple[int, int], patch: list[int], n_stages: int) -> dict:
    base, cap = features
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1)
    return {
        "patch_size": patch,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages,
                "features_per_stage": [min(base * 2 ** i, cap) for i in range(n_stages)],
                "conv_op": "torch.nn.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * n_stages,
                "strides": strides,
                "n_conv_per_stage": [2] * n_stages,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }


KINDS = ("stock", "tak", "tak_checkpointed", "tak_fused")


def measure(kind: str, classes: int, mode: str, args: argparse.Namespace) -> dict:
    """Runs in a child process: build one network, time forward+backward (deep supervision on) or the
    prediction forward (no grad, no deep supervision)."""
    import os

    os.environ["TAK_FUSED_HEAD"] = "1" if kind == "tak_fused" else "0"
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    import nnunetv2_tak.model.dynamic_head
    from nnunetv2_tak.trainers import nnUNetTrainerTAK

    torch.manual_seed(0)
    device = torch.device(args.device)
    nnunetv2_tak.model.dynamic_head.EAGER_CHUNKED_FUNCTION = kind != "tak_checkpointed"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cm = ConfigurationManager(configuration(tuple(args.features), args.patch, args.stages))
    trainer = nnUNetTrainer if kind == "stock" else nnUNetTrainerTAK
    training = mode == "train"
    net = trainer.build_network_architecture(None, cm, 1, classes, training).to(device)
    if kind != "stock":
        net.set_text_embeddings(torch.randn(classes, 2, 512, device=device))
    x = torch.randn(args.batch, 1, *args.patch, device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        if training:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                out = net(x)
                loss = sum(o.float().square().mean() for o in out)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
                net(x)  # one sliding-window tile as nnU-Net's predictor runs it
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times, cpu_times = [], []
    for _ in range(args.iters):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024)
    return {"kind": kind, "times": times, "cpu_times": cpu_times, "peak_mib": peak}


def summarise(runs: list[dict]) -> dict:
    return {"median_s": statistics.median(t for r in runs for t in r["times"]),
            "cpu_s": statistics.median(t for r in runs for t in r["cpu_times"]),
            "peak_mib": max(r["peak_mib"] for r in runs)}


def table(summary: dict, kinds: list[str], device: str) -> list[str]:
    """Markdown rows: per mode and class count, stock's cost and each TAK network's ratios to it."""
    cpu = device == "cpu"
    head = "| mode | classes | network | ms/step | " + ("CPU s/step | " if cpu else "") + "peak MiB | time ratio | "
    head += ("CPU-time ratio | " if cpu else "") + "memory ratio |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for (mode, classes), by_kind in summary.items():
        stock = by_kind["stock"]
        for kind in kinds:
            r = by_kind[kind]
            cells = [mode, str(classes), kind, f"{r['median_s'] * 1000:.0f}"]
            cells += [f"{r['cpu_s']:.2f}"] if cpu else []
            cells += [f"{r['peak_mib']:.0f}", f"{r['median_s'] / stock['median_s']:.3f}"]
            cells += [f"{r['cpu_s'] / stock['cpu_s']:.3f}"] if cpu else []
            cells += [f"{r['peak_mib'] / stock['peak_mib']:.3f}" if stock["peak_mib"] > 0 else "n/a"]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, nargs=2, default=[16, 128], metavar=("BASE", "MAX"))
    p.add_argument("--patch", type=int, nargs=3, default=[48, 64, 64])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, nargs="+", default=[16],
                   help="class counts incl. background (AMOS: 16, TotalSegmentator: 117)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="alternating subprocess rounds per network")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", choices=["train", "predict"], default=["train"],
                   help="train: forward+backward with deep supervision; predict: no-grad forward, no deep supervision")
    p.add_argument("--checkpointed", action="store_true",
                   help="also measure the TAK network with the head's checkpointed-chunk formulation (before/after)")
    p.add_argument("--fused", action="store_true",
                   help="also measure the TAK network with the fused Triton head (TAK_FUSED_HEAD=1; CUDA)")
    p.add_argument("--child", nargs=3, metavar=("KIND", "CLASSES", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, classes, mode = args.child
        print("RESULT " + json.dumps(measure(kind, int(classes), mode, args)))
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    kinds = ["stock", "tak"] + ["tak_checkpointed"] * args.checkpointed + ["tak_fused"] * args.fused
    summary: dict[tuple[str, int], dict[str, dict]] = {}
    for mode in args.modes:
        for classes in args.classes:
            runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
            for _ in range(args.rounds):
                for kind in kinds:
                    out = subprocess.run([sys.executable, __file__, *forwarded, "--child", kind, str(classes), mode],
                                         capture_output=True, text=True, check=True).stdout
                    runs[kind].append(json.loads(out.split("RESULT ", 1)[1]))
            summary[mode, classes] = {kind: summarise(r) for kind, r in runs.items()}
            print(f"done: {mode}, {classes} classes: {json.dumps(summary[mode, classes])}", file=sys.stderr, flush=True)
    print(f"config: features {args.features}, patch {args.patch}, {args.stages} stages, batch {args.batch}, "
          f"device {args.device}, {args.rounds}x{args.iters} timed steps per network (after one warm-up step)")
    print("\n".join(table(summary, kinds, args.device)))
    print("targets: forward+backward <= 1.10x stock at 16 classes, <= 1.5x at 117 classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
