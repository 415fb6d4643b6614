"""Text centring before the text MLP (TextPriorConfig.text_centering): geometry, what the head sees,
state dict and plans round trip, the default trainer recording it in the plans, resuming across a
change of it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _nets import configuration_manager

from nnunetv2_tak.model.network import TextPriorConfig, TextPriorUNet, unwrap_network
from nnunetv2_tak.trainers import PLANS_KEY, nnUNetTrainerTAK

C, K, D = 6, 2, 32


def _head(mode: str, embeddings: torch.Tensor) -> TextPriorUNet:
    cm = configuration_manager("plain", 3, extra={PLANS_KEY: {"head": TextPriorConfig(
        num_kinds=K, embed_dim=D, text_centering=mode).to_dict(), "text": {}}})
    net = nnUNetTrainerTAK.build_network_architecture(None, cm, 1, C, False)
    net.set_text_embeddings(embeddings)
    return net


def _collinear(seed: int = 0) -> torch.Tensor:
    """[C, K, D]: a large common component per kind plus small class-specific parts (CLIP-like)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(1, K, D, generator=g) * 4.0
    return common + 0.5 * torch.randn(C, K, D, generator=g)


def _mean_pairwise_cosine(e: torch.Tensor) -> torch.Tensor:
    """[C, K, D] -> mean over kinds and class pairs a != b of cos(e_a, e_b): [K]."""
    n = F.normalize(e, dim=-1).transpose(0, 1)  # [K, C, D]
    cos = n @ n.transpose(1, 2)  # [K, C, C]
    off = ~torch.eye(e.shape[0], dtype=torch.bool)
    return cos[:, off].mean(dim=1)


@pytest.mark.parametrize("mode", ["center", "center_scale"])
def test_centring_zero_class_mean_and_keeps_differences(mode):
    e = _collinear()
    prepared = _head(mode, e).text_prior.prepared_text_embeddings()
    assert prepared.shape == (C, K, D)
    torch.testing.assert_close(prepared.mean(dim=0), torch.zeros(K, D), atol=1e-5, rtol=0)
    diffs, new_diffs = e[:, None] - e[None], prepared[:, None] - prepared[None]  # [C, C, K, D]
    if mode == "center":
        torch.testing.assert_close(new_diffs, diffs, atol=1e-5, rtol=1e-5)
    else:  # one scale per kind: relative structure kept, mean norm back to the original
        scale = new_diffs.norm(dim=-1).sum(dim=(0, 1)) / diffs.norm(dim=-1).sum(dim=(0, 1))  # [K]
        torch.testing.assert_close(new_diffs, diffs * scale[None, None, :, None], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(prepared.norm(dim=-1).mean(0), e.norm(dim=-1).mean(0), atol=1e-4, rtol=1e-4)
        assert (scale > 1).all()  # the common component was most of the norm


def test_centring_drops_the_mean_pairwise_cosine_of_a_collinear_set():
    e = _collinear()
    before = _mean_pairwise_cosine(e)
    after = _mean_pairwise_cosine(_head("center_scale", e).text_prior.prepared_text_embeddings())
    assert (before > 0.9).all()
    # centred vectors sum to 0, so their mean pairwise cosine is about -1/(C-1)
    assert (after < 0.05).all() and (after > -0.5).all()


def test_none_is_the_raw_buffer_and_the_head_sees_the_prepared_text():
    e = _collinear()
    net = _head("none", e)
    assert net.text_prior.prepared_text_embeddings() is net.text_prior.text_embeddings
    centred = _head("center", e)
    centred.load_state_dict(net.state_dict())  # same weights, only the text preparation differs
    assert not torch.allclose(net.text_prior.text_features(), centred.text_prior.text_features())
    shifted = _head("center", e + 3.0)  # a shift common to all classes is invisible to the centred head
    shifted.load_state_dict({**net.state_dict(), "text_prior.text_embeddings": e + 3.0})
    torch.testing.assert_close(shifted.text_prior.text_features(), centred.text_prior.text_features(),
                               atol=1e-5, rtol=1e-5)


def test_state_dict_and_plans_round_trip():
    e = _collinear()
    net = _head("center_scale", e)
    config = TextPriorConfig.from_dict(json.loads(json.dumps(net.config.to_dict())))  # through plans.json
    assert config.text_centering == "center_scale"
    cm = configuration_manager("plain", 3, extra={PLANS_KEY: {"head": config.to_dict(), "text": {}}})
    rebuilt = nnUNetTrainerTAK.build_network_architecture(None, cm, 1, C, False)
    rebuilt.load_state_dict(net.state_dict())
    assert set(net.state_dict()) == set(_head("none", e).state_dict())  # no new checkpoint keys
    torch.testing.assert_close(rebuilt.text_prior.prepared_text_embeddings(),
                               net.text_prior.prepared_text_embeddings())
    x = torch.randn(1, 1, 32, 32, 32)
    net.eval()
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x))


def test_old_plans_load_unknown_keys_are_refused_and_bad_values_are_named():
    old = TextPriorConfig().to_dict()
    del old["text_centering"]  # plans written before the knob existed
    assert TextPriorConfig.from_dict(old).text_centering == "none"
    with pytest.raises(ValueError, match=r"does not know \(some_future_key\).*newer version"):
        TextPriorConfig.from_dict({**old, "some_future_key": 1})  # would silently build another network
    with pytest.raises(ValueError, match=r"text_centering must be one of none, center, center_scale, not 'mean'"):
        TextPriorConfig(text_centering="mean")


class CenteredDebug(nnUNetTrainerTAK):
    """The default trainer (centred text) on a one-iteration schedule; own results folder."""

    text_source = "random"  # the shared test dataset has no text cache; centring applies the same way
    epochs = 1
    iterations_per_epoch = 1
    val_iterations_per_epoch = 1


def test_default_trainer_centres_the_text_and_records_it_in_the_plans(nnunet_env):
    from test_trainer import new_trainer

    from nnunetv2_tak.trainers import nnUNetTrainerTAK_CenteredText, nnUNetTrainerTAK_RawText

    assert nnUNetTrainerTAK.text_prior.text_centering == "center_scale"  # the default the evidence chose
    assert nnUNetTrainerTAK_CenteredText.text_prior == nnUNetTrainerTAK.text_prior  # the old name still builds it
    assert nnUNetTrainerTAK_RawText.text_prior.text_centering == "none"
    trainer = new_trainer(CenteredDebug, nnunet_env)
    trainer.initialize()
    entry = trainer.plans_manager.plans["configurations"]["3d_fullres"][PLANS_KEY]
    assert entry["head"]["text_centering"] == "center_scale"
    network = unwrap_network(trainer.network)
    assert network.config.text_centering == "center_scale"
    prepared = network.text_prior.prepared_text_embeddings()
    torch.testing.assert_close(prepared.mean(0), torch.zeros_like(prepared[0]), atol=1e-5, rtol=0)
    assert not torch.allclose(prepared, network.text_prior.text_embeddings)


class RawDebug(CenteredDebug):
    text_prior = TextPriorConfig(text_centering="none")


def test_resume_with_other_text_centring_is_refused_with_how_to_continue(nnunet_env, monkeypatch):
    """A run trained with the raw text (an older default) resumed under the centred default: refused before
    anything loads, with the rename that continues it; a checkpoint that does not store the setting is
    judged by its results folder's plans.json."""
    from test_trainer import new_trainer

    from nnunetv2_tak.trainers import SSLSettingsError

    raw = new_trainer(RawDebug, nnunet_env)
    raw.initialize()
    raw.on_train_start()  # writes plans.json (with the head's text_centering) into the results folder
    raw.on_train_end()  # (removes checkpoint_latest.pth, as nnU-Net does)
    path = f"{raw.output_folder}/checkpoint_latest.pth"
    raw.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["tak_ssl"]["settings"]["text_centering"] == "none"
    del checkpoint["tak_ssl"]["settings"]["text_centering"]  # as checkpoints without the setting have them
    torch.save(checkpoint, path)

    monkeypatch.setattr(RawDebug, "text_prior", CenteredDebug.text_prior)  # the default changed under the run
    resumed = new_trainer(RawDebug, nnunet_env)
    with pytest.raises(SSLSettingsError) as info:
        resumed.load_checkpoint(path)
    message = str(info.value)
    assert "text_centering: checkpoint 'none', now 'center_scale'" in message
    assert "RawDebug__nnUNetPlans__3d_fullres" in message and "-tr nnUNetTrainerTAK_RawText" in message
    assert resumed.current_epoch == 0 and resumed.teacher.step == 0  # nothing loaded

    monkeypatch.setattr(RawDebug, "text_prior", TextPriorConfig(text_centering="none"))
    same = new_trainer(RawDebug, nnunet_env)
    same.load_checkpoint(path)  # the setting it was trained with resumes
    assert same.current_epoch == checkpoint["current_epoch"]


def test_stored_text_centering_reads_the_run_plans(tmp_path):
    from nnunetv2_tak.trainers.resume import stored_text_centering

    plans = tmp_path / "plans.json"
    assert stored_text_centering(plans, "3d_fullres", PLANS_KEY) == "none"  # no plans: an older run, raw text
    head = TextPriorConfig(text_centering="center_scale").to_dict()
    plans.write_text(json.dumps({"configurations": {"3d_fullres": {PLANS_KEY: {"head": head}}}}))
    assert stored_text_centering(plans, "3d_fullres", PLANS_KEY) == "center_scale"
    del head["text_centering"]
    plans.write_text(json.dumps({"configurations": {"3d_fullres": {PLANS_KEY: {"head": head}}}}))
    assert stored_text_centering(plans, "3d_fullres", PLANS_KEY) == "none"
