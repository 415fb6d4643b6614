"""Semi-supervised pieces under DDP, on CPU with a gloo process group of 2 processes.

nnU-Net's trainer itself requires CUDA under DDP (it sets cuda:<rank>), so this test runs the same
building blocks the trainer uses, in the same order: the text-prior network wrapped in DDP, the EMA
teacher built after the wrap, student forward on labeled + unlabeled, contrastive term (off in the
first step, when its parameters must still join the graph), optimizer step, teacher update, and the
unlabeled shards. Ranks start from different random weights and see different data."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _nets import configuration_manager

from nnunetv2_tak.semisupervised.losses import text_visual_contrastive_loss
from nnunetv2_tak.semisupervised.teacher import EMATeacher, clipped_noise, pseudo_labels
from nnunetv2_tak.trainers import nnUNetTrainerTAK
from nnunetv2_tak.unlabeled import shard_for_rank

WORLD = 2
CLASSES = 4


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    net = nnUNetTrainerTAK.build_network_architecture(None, configuration_manager("plain", 3, (4, 8, 16, 32)),
                                                      1, CLASSES, True)
    net.set_text_embeddings(torch.randn(CLASSES, 2, 512, generator=torch.Generator().manual_seed(0)))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    teacher = EMATeacher(ddp.module, decay=0.99)
    teacher.module.decoder.deep_supervision = False
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    for step in range(3):
        labeled = torch.randn(2, 1, 32, 32, 32)
        target = torch.randint(0, CLASSES, (2, 1, 32, 32, 32))
        unlabeled = torch.randn(2, 1, 32, 32, 32)
        with torch.no_grad():
            pseudo, _ = pseudo_labels(teacher.module(clipped_noise(unlabeled, 0.1, 0.2)), 2.0, CLASSES)
        outputs, deep = ddp(torch.cat([labeled, unlabeled]), return_deep_features=True)
        # every deep-supervision output enters the loss, as in nnU-Net's DeepSupervisionWrapper under DDP
        loss = sum(1e-6 * F.cross_entropy(o[:2], F.interpolate(target.float(), o.shape[2:]).long()[:, 0])
                   for o in outputs[1:])
        loss = loss + F.cross_entropy(outputs[0][:2], target[:, 0]) + F.cross_entropy(
            outputs[0][2:], pseudo[:, 0], ignore_index=CLASSES)
        if step == 0:  # contrastive term not yet on: its parameters join the graph with weight 0
            loss = loss + 0.0 * sum(p.sum() for p in net.contrast.parameters())
        else:
            loss = loss + 0.1 * text_visual_contrastive_loss(
                deep, torch.cat([target, pseudo]), net.contrast.voxel, net.contrast.text,
                net.text_prior.text_embeddings, (40, 20, 10))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        teacher.update(ddp.module)
    flat = torch.cat([p.detach().reshape(-1) for p in teacher.module.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    student = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    shards: list = [None] * WORLD
    dist.all_gather_object(shards, shard_for_rank([f"u{i}" for i in range(5)], rank, WORLD))
    if rank == 0:
        Path(out).write_text(json.dumps({
            "teacher_max_diff": float((gathered[0] - gathered[1]).abs().max()),
            "teacher_student_diff": float((flat - student).abs().max()),
            "shards": shards,
        }))
    dist.destroy_process_group()


def test_teacher_identical_on_all_ranks_and_shards_disjoint(tmp_path):
    out = tmp_path / "result.json"
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True)
    result = json.loads(out.read_text())
    assert result["teacher_max_diff"] == 0.0  # bitwise identical teachers
    assert result["teacher_student_diff"] > 0  # and it is an average, not a copy of the student
    a, b = result["shards"]
    assert not set(a) & set(b) and sorted(a + b) == [f"u{i}" for i in range(5)]
