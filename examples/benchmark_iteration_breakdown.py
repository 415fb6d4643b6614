"""Where the time of one TAK iteration goes, piece by piece, beside stock nnU-Net's iteration, in one process.

    python examples/benchmark_iteration_breakdown.py                                   # 16..128, 48x64x64
    python examples/benchmark_iteration_breakdown.py --features 32 320 --patch 48 96 96

Same dataset, plans and trainers as ``benchmark_iteration_cost.py`` (stock ``nnUNetTrainer`` and
``nnUNetTrainerTAK`` with every term active), built side by side in one process on batches fetched
beforehand (no augmentation workers). Each repetition runs every piece once, in the same order, so load
on the machine hits all pieces alike; the table gives per-piece medians over the repetitions and the ratio
of each median to the median stock iteration.

Pieces (fwd+bwd: forward and backward from leaf inputs, i.e. detached copies of what feeds the piece):

  stock step            nnUNetTrainer.train_step on the labeled batch (the reference, 1.00)
  floor: stock x2       nnUNetTrainer.train_step on labeled + unlabeled images (student on twice the batch)
  floor: teacher fwd    the stock network's no-grad forward on the unlabeled images (no deep supervision)
  TAK step              nnUNetTrainerTAK.train_step, everything
  TAK step, sequential halves   the same with ``sequential_halves`` (the memory switch)
  teacher + pseudo      TAK's ``unlabeled_batch``: noise, teacher forward, argmax, entropy, mask
  student fwd+bwd       TAK's ``student_forward`` on twice the batch + supervised loss, backward
  stock fwd+bwd x2      the same with the stock network: the difference is the text-prior head's share
  pseudo-label loss     ``unsup_criterion`` (GADice) on leaf unlabeled logits, fwd+bwd
  contrastive term      ``contrastive_term`` on leaf deep features (projection heads, anchors, loss), fwd+bwd
    of which anchor loss  ``anchor_contrastive_loss`` of the three stages on leaf anchors, fwd+bwd
  optimizer             clip_grad_norm_ + optimizer.step of the TAK student
  EMA update            teacher.update
  step outputs          ``step_outputs`` (statistics for the log, moved to the host)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from workspace import use_workspace

PIECES = ("stock step", "floor: stock x2", "floor: teacher fwd", "TAK step", "TAK step, sequential halves",
          "teacher + pseudo", "student fwd+bwd",
          "stock fwd+bwd x2", "pseudo-label loss", "contrastive term", "anchor loss", "optimizer", "EMA update",
          "step outputs")


def build_trainers(dataset_name: str, device: str) -> tuple:
    """(stock nnUNetTrainer, nnUNetTrainerTAK with every term active), both started, same plans."""
    import torch
    from benchmark_iteration_cost import PLANS
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_tak.trainers import nnUNetTrainerTAK

    class BenchTAK(nnUNetTrainerTAK):
        allow_random_text_encoder = True
        contrastive_start_fraction = 0.0  # steady state: every term active

    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainers = []
    for cls in (nnUNetTrainer, BenchTAK):
        plans = json.loads((pre / f"{PLANS}.json").read_text())
        plans["continue_training"] = False
        torch.manual_seed(0)
        trainer = cls(plans, "3d_fullres", 0, dataset_json, torch.device(device))
        trainer.disable_checkpointing = True
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        trainers.append(trainer)
    return tuple(trainers)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_pieces(stock, tak) -> dict[str, Callable[[], object]]:
    """The pieces, each a closure over batches fetched once (the same batch every repetition)."""
    import torch

    from nnunetv2_tak.model.network import unwrap_network
    from nnunetv2_tak.semisupervised.losses import anchor_contrastive_loss

    batch = next(stock.dataloader_train)
    images = next(tak.dataloader_unlabeled)["data"]
    tak.dataloader_unlabeled = _Repeat({"data": images})
    target = batch["target"]
    doubled = {"data": torch.cat([batch["data"], images]),
               "target": [torch.cat([t, t]) for t in target] if isinstance(target, list) else torch.cat([target] * 2)}
    weights = tak.ssl_weights(tak.current_epoch)
    data, target = tak.labeled_batch(batch)
    n = data.shape[0]
    student = unwrap_network(tak.network)

    unlabeled = tak.unlabeled_batch(weights["threshold"])
    with torch.no_grad():
        output, deep = tak.student_forward(torch.cat([data, unlabeled.images]), labeled=n)
    full_res = output[0] if isinstance(output, list) else output
    logits_leaf = full_res[n:].detach()
    deep_leaves = [f.detach() for f in deep]

    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    import nnunetv2_tak.semisupervised.losses as losses_module
    original = losses_module.anchor_contrastive_loss

    def capture(features, classes, *args, **kwargs):
        captured.append((features.detach(), classes))
        return original(features, classes, *args, **kwargs)

    losses_module.anchor_contrastive_loss = capture
    try:
        with torch.no_grad():
            tak.contrastive_term(deep_leaves, target, unlabeled, True)
    finally:
        losses_module.anchor_contrastive_loss = original

    def floor_teacher():
        net = unwrap_network(stock.network)
        net.decoder.deep_supervision = False
        try:
            with torch.no_grad():
                net(unlabeled.images)  # on the device, as the teacher sees them
        finally:
            net.decoder.deep_supervision = True

    def fwd_bwd(trainer, with_deep: bool):
        trainer.optimizer.zero_grad(set_to_none=True)
        inputs = torch.cat([data, unlabeled.images])
        out = trainer.student_forward(inputs, labeled=n)[0] if with_deep else trainer.network(inputs)
        labeled = [o[:n] for o in out] if isinstance(out, list) else out[:n]
        trainer.loss(labeled, target).backward()

    def pseudo_label_loss():
        leaf = logits_leaf.clone().requires_grad_(True)
        tak.unsup_criterion(leaf, unlabeled.target).backward()

    def contrastive():
        leaves = [f.clone().requires_grad_(True) for f in deep_leaves]
        tak.contrastive_term(leaves, target, unlabeled, True).backward()

    def anchor_loss():
        total = 0.0
        for features, classes in captured:
            total = total + anchor_contrastive_loss(features.clone().requires_grad_(True), classes,
                                                    tak.contrastive_temperature)
        total.backward()

    def optimizer():
        torch.nn.utils.clip_grad_norm_(tak.network.parameters(), 12)
        tak.optimizer.step()

    def sequential_step():
        tak.sequential_halves = True
        try:
            tak.train_step(batch)
        finally:
            tak.sequential_halves = False

    terms = tak.loss_terms(data, target, unlabeled, weights)
    terms = type(terms)(*(t.detach() if isinstance(t, torch.Tensor) else t for t in
                          (terms.total, terms.supervised, terms.pseudo_label, terms.contrastive)))
    return {
        "stock step": lambda: stock.train_step(batch),
        "floor: stock x2": lambda: stock.train_step(doubled),
        "floor: teacher fwd": floor_teacher,
        "TAK step": lambda: tak.train_step(batch),
        "TAK step, sequential halves": sequential_step,
        "teacher + pseudo": lambda: tak.unlabeled_batch(weights["threshold"]),
        "student fwd+bwd": lambda: fwd_bwd(tak, True),
        "stock fwd+bwd x2": lambda: fwd_bwd(stock, False),
        "pseudo-label loss": pseudo_label_loss,
        "contrastive term": contrastive,
        "anchor loss": anchor_loss,
        "optimizer": optimizer,
        "EMA update": lambda: tak.teacher.update(student),
        "step outputs": lambda: tak.step_outputs(terms, unlabeled),
    }


class _Repeat:
    """An endless loader that returns the same batch (the unlabeled stream during the measurement)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __next__(self) -> dict:
        return self.batch

    def __iter__(self):
        return self


def run(args: argparse.Namespace, dataset_name: str) -> dict[str, list[float]]:
    import torch

    torch.manual_seed(0)
    stock, tak = build_trainers(dataset_name, args.device)
    pieces = make_pieces(stock, tak)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for fn in pieces.values():  # warm-up
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(args.repeats):
        for name, fn in pieces.items():
            sync()
            times[name].append(timed(lambda fn=fn: (fn(), sync())))
    return times


def report(times: dict[str, list[float]], args: argparse.Namespace) -> str:
    """A markdown table: median ms per piece and its ratio to the median stock step."""
    med = {name: statistics.median(values) for name, values in times.items()}
    stock = med["stock step"]
    rows = [f"features {args.features[0]}..{args.features[1]}, patch {'x'.join(map(str, args.patch))}, batch "
            f"{args.batch} (+{args.batch} unlabeled), {args.device}, {args.repeats} repetitions (medians)", "",
            "| piece | ms | / stock step |", "|---|---|---|"]
    for name in PIECES:
        indent = "  of which " if name == "anchor loss" else ""
        rows.append(f"| {indent}{name} | {med[name] * 1000:.0f} | {med[name] / stock:.3f} |")
    floor = med["floor: stock x2"] + med["floor: teacher fwd"]
    parts = ("teacher + pseudo", "student fwd+bwd", "pseudo-label loss", "contrastive term", "optimizer",
             "EMA update", "step outputs")
    total = sum(med[p] for p in parts)
    rows += ["", f"floor (stock x2 + teacher fwd) / stock: {floor / stock:.3f}",
             f"TAK step / stock: {med['TAK step'] / stock:.3f}",
             f"text-prior head's share (student fwd+bwd - stock fwd+bwd x2) / stock: "
             f"{(med['student fwd+bwd'] - med['stock fwd+bwd x2']) / stock:.3f}",
             f"sum of TAK pieces / stock: {total / stock:.3f} (the TAK step minus this: "
             f"{(med['TAK step'] - total) / stock:+.3f}, what the pieces do not cover: slicing, concatenation, "
             "the supervised loss's share of the labeled half, zero_grad)"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from benchmark_iteration_cost import add_plans_arguments, prepare

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plans_arguments(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the raw times (seconds per piece and repetition) to this file")
    args = p.parse_args(argv)
    os.environ["nnUNet_n_proc_DA"] = "0"  # no augmentation workers beside the measurement
    work = use_workspace(Path(args.work_dir))
    name = prepare(work, args)
    times = run(args, name)
    print(report(times, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "times": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
