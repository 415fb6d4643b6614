"""Cost of the text-prior head: forward+backward (or prediction forward) time and peak memory of the TAK
network vs the stock nnU-Net network built from the same plans, side by side in one run.

    python examples/benchmark_head_overhead.py                       # CPU-sized 3D configuration
    python examples/benchmark_head_overhead.py --features 32 320 --patch 64 128 128 --device cuda

Each network is measured in its own subprocess (so peak RSS is per network); runs alternate
between the two networks to share machine noise. Prints the ratios.
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


def measure(kind: str, args: argparse.Namespace) -> dict:
    """Runs in a child process: build one network, time forward+backward (deep supervision on)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from nnunetv2_tak.trainers import nnUNetTrainerTAK

    torch.manual_seed(0)
    device = torch.device(args.device)
    cm = ConfigurationManager(configuration(tuple(args.features), args.patch, args.stages))
    trainer = nnUNetTrainerTAK if kind == "tak" else nnUNetTrainer
    training = args.mode == "train"
    net = trainer.build_network_architecture(None, cm, 1, args.classes, training).to(device)
    if kind == "tak":
        net.set_text_embeddings(torch.randn(args.classes, 2, 512, device=device))
    x = torch.randn(args.batch, 1, *args.patch, device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

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

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024)
    return {"kind": kind, "times": times, "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, nargs=2, default=[16, 128], metavar=("BASE", "MAX"))
    p.add_argument("--patch", type=int, nargs=3, default=[48, 64, 64])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=16, help="classes incl. background (AMOS: 16)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="alternating subprocess rounds per network")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=["train", "predict"], default="train",
                   help="train: forward+backward with deep supervision; predict: no-grad forward, no deep supervision")
    p.add_argument("--child", choices=["tak", "stock"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args)))
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results: dict[str, list[dict]] = {"stock": [], "tak": []}
    for _ in range(args.rounds):
        for kind in ("stock", "tak"):
            out = subprocess.run([sys.executable, __file__, *forwarded, "--child", kind], capture_output=True,
                                 text=True, check=True).stdout
            results[kind].append(json.loads(out.split("RESULT ", 1)[1]))
    summary = {}
    for kind, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        summary[kind] = {"median_s": statistics.median(times), "peak_mib": max(r["peak_mib"] for r in runs)}
    print(f"config: features {args.features}, patch {args.patch}, batch {args.batch}, classes {args.classes}, "
          f"device {args.device}, mode {args.mode}, {args.rounds}x{args.iters} timed steps per network")
    for kind in ("stock", "tak"):
        ms, mib = summary[kind]["median_s"] * 1000, summary[kind]["peak_mib"]
        print(f"  {kind:5s}: {ms:8.1f} ms/step, peak {mib:8.1f} MiB")
    print(f"time ratio tak/stock: {summary['tak']['median_s'] / summary['stock']['median_s']:.3f}  (target <= 1.10)")
    print(f"peak memory ratio tak/stock: {summary['tak']['peak_mib'] / summary['stock']['peak_mib']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
