"""``sequential_halves`` (the memory switch): the student runs the unlabeled and the labeled half one after
the other and gets the losses and gradients of the joint forward, the contrastive term's cross-half pairs
included (its gradients come from a no-grad encoder pass over both halves)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from nnunetv2_tak.trainers import nnUNetTrainerTAK_RandomText_Debug


class ContrastFromTheStart(nnUNetTrainerTAK_RandomText_Debug):
    contrastive_start_fraction = 0.0


def new_trainer(cls, data):
    plans = json.loads((data.preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    return cls(plans, "3d_fullres", 0, data.dataset_json(), torch.device("cpu"))


@pytest.mark.parametrize("contrast_weight", [0.1, 0.0])
def test_sequential_halves_give_the_joint_losses_and_gradients(nnunet_env, contrast_weight):
    trainer = new_trainer(ContrastFromTheStart, nnunet_env)
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        data, target = trainer.labeled_batch(next(trainer.dataloader_train))
        weights = {**trainer.ssl_weights(0.0), "unsup": 0.5, "contrast": contrast_weight}
        unlabeled = trainer.unlabeled_batch(weights["threshold"])
        results = []
        for sequential in (False, True):
            trainer.sequential_halves = sequential
            trainer.optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(3)  # the contrastive anchors are drawn from the global generator
            terms = trainer.loss_terms(data, target, unlabeled, weights)
            assert terms.backward_done == sequential
            if not terms.backward_done:
                trainer.backward(terms.total)
            grads = {name: p.grad.clone() for name, p in trainer.network.named_parameters() if p.grad is not None}
            results.append((terms, grads))
        (joint, joint_grads), (seq, seq_grads) = results
        for name in ("total", "supervised", "pseudo_label", "contrastive"):
            torch.testing.assert_close(getattr(seq, name).detach(), getattr(joint, name).detach(),
                                       rtol=1e-5, atol=1e-6)
        contrastive = float(joint.contrastive.detach())
        assert contrastive > 0 if contrast_weight else contrastive == 0
        assert seq_grads.keys() == joint_grads.keys()
        assert any(name.startswith("contrast.") for name in joint_grads) == (contrast_weight > 0)
        # float32 sums over another split of the voxels: compare each tensor's difference with its norm (a
        # conv bias before InstanceNorm has a true gradient of 0, hence the absolute floor)
        for name, grad in joint_grads.items():
            difference, scale = float((seq_grads[name] - grad).norm()), float(grad.norm())
            assert difference <= 1e-4 * scale + 1e-5, f"{name}: |difference| {difference:.2e}, |gradient| {scale:.2e}"

        trainer.sequential_halves = True  # and a whole iteration: backward already done, clip and step
        before = [p.detach().clone() for p in trainer.network.parameters()]
        loss = trainer.train_step(next(trainer.dataloader_train))["loss"]
        assert math.isfinite(float(loss))
        assert any(not torch.equal(a, p) for a, p in zip(before, trainer.network.parameters(), strict=True))
    finally:
        trainer.on_train_end()


class SequentialHalves(nnUNetTrainerTAK_RandomText_Debug):
    sequential_halves = True


def test_sequential_halves_under_ddp_is_refused_by_name(nnunet_env, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match=r"sequential_halves runs several backward passes.*set sequential"):
            new_trainer(SequentialHalves, nnunet_env)
    finally:
        dist.destroy_process_group()


class OneUnlabeledPatch(SequentialHalves):
    unlabeled_batch_size = 1


@pytest.mark.parametrize("cls, advised, not_advised", [
    (nnUNetTrainerTAK_RandomText_Debug, ["sequential_halves = True", "unlabeled_batch_size = 1"], []),
    (SequentialHalves, ["unlabeled_batch_size = 1"], ["sequential_halves"]),
    (OneUnlabeledPatch, [], ["sequential_halves", "unlabeled_batch_size"]),
])
def test_simulated_out_of_memory_names_the_knobs_not_yet_set(nnunet_env, monkeypatch, cls, advised, not_advised):
    """An out-of-memory error raised inside the step (simulated: this CPU run has no GPU to exhaust) comes back
    as the same error type, the original message first, then the memory knobs this trainer has not set."""
    trainer = new_trainer(cls, nnunet_env)
    trainer.initialize()

    def out_of_memory(batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "labeled_batch", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        trainer.train_step({})
    message = str(caught.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert cls.__name__ in message and "-gpu_memory_target" in message
    for knob in advised:
        assert knob in message
    for knob in not_advised:
        assert knob not in message
