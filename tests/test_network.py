"""Text-prior network: shapes for every planned architecture, state round trip, batched head vs a
per-sample reference, embedding checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _nets import configuration_manager

from nnunetv2_tak.model.dynamic_head import apply_dynamic_head, split_dynamic_params
from nnunetv2_tak.model.network import TextPriorConfig, TextPriorUNet
from nnunetv2_tak.trainers import PLANS_KEY, nnUNetTrainerTAK

NUM_CLASSES = 5


def build(arch: str, dim: int, deep_supervision: bool, extra: dict | None = None) -> TextPriorUNet:
    """The network as the predictor builds it from a trained model's plans (with the head's plans entry)."""
    if extra is None:
        extra = {PLANS_KEY: {"head": nnUNetTrainerTAK.text_prior.to_dict(), "text": {}}}
    cm = configuration_manager(arch, dim, extra=extra)
    return nnUNetTrainerTAK.build_network_architecture(None, cm, 1, NUM_CLASSES, deep_supervision)


@pytest.mark.parametrize("arch", ["plain", "resenc"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_output_shapes(arch, dim, deep_supervision):
    torch.manual_seed(0)
    net = build(arch, dim, deep_supervision)
    net.set_text_embeddings(torch.randn(NUM_CLASSES, 2, 512))
    size = 32 if dim == 3 else 64
    x = torch.randn(2, 1, *[size] * dim)
    out = net(x)
    if deep_supervision:
        assert isinstance(out, list) and len(out) == 3
        for i, o in enumerate(out):
            assert o.shape == (2, NUM_CLASSES, *[size // 2 ** i] * dim)
            assert torch.isfinite(o).all()
    else:
        assert out.shape == (2, NUM_CLASSES, *[size] * dim)
    # nnU-Net's trainer toggles deep supervision through decoder.deep_supervision
    net.decoder.deep_supervision = not deep_supervision
    assert isinstance(net(x), list) != deep_supervision


def test_segmentation_layers_replaced_and_every_head_built():
    net = build("plain", 3, deep_supervision=False)
    assert len(net.decoder.seg_layers) == 3  # all heads exist even without deep supervision
    widths = [layer[-1].in_channels for layer in net.decoder.seg_layers]
    assert widths == [32, 16, 8]  # decoder widths read from encoder.output_channels
    assert all(layer[-1].out_channels == 8 for layer in net.decoder.seg_layers)
    # no stock 1x1 conv to classes survives
    assert not any(isinstance(m, torch.nn.Conv3d) and m.out_channels == NUM_CLASSES for m in net.modules())


def test_state_dict_round_trip_including_text_embeddings():
    torch.manual_seed(0)
    a = build("resenc", 3, True)
    a.set_text_embeddings(torch.randn(NUM_CLASSES, 2, 512))
    b = build("resenc", 3, False)  # inference-style build: no deep supervision, zero text buffer
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.text_prior.text_embeddings, a.text_prior.text_embeddings)
    a.eval()
    b.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    a.decoder.deep_supervision = False
    torch.testing.assert_close(a(x), b(x))


def test_head_geometry_comes_from_plans():
    """The predictor rebuilds from plans.json: K and D stored by the trainer must be honoured."""
    head = TextPriorConfig(num_kinds=3, embed_dim=64).to_dict()
    net = build("plain", 2, False, extra={PLANS_KEY: {"head": head, "text": {}}})
    assert tuple(net.text_prior.text_embeddings.shape) == (NUM_CLASSES, 3, 64)
    other = build("plain", 2, False)
    with pytest.raises(RuntimeError, match="text embeddings have shape"):
        other.load_state_dict(net.state_dict())


@pytest.mark.parametrize("embed_dim", [512, 768])
def test_plans_without_the_head_entry_refuse_a_trained_model_by_name(embed_dim):
    """A results-folder plans.json without 'tak_text_prior' (hand-edited, or copied from the preprocessed
    folder): the network gets the class's default head, so a trained model's weights are refused with the
    missing key and where it comes from, also where the text shape happens to fit (512)."""
    head = TextPriorConfig(embed_dim=embed_dim).to_dict()
    trained = build("plain", 2, False, extra={PLANS_KEY: {"head": head, "text": {}}})
    without_entry = build("plain", 2, False, extra={})
    assert without_entry.missing_settings_entry == PLANS_KEY
    with pytest.raises(RuntimeError, match=r"no 'tak_text_prior' entry.*plans\.json of its results folder"):
        without_entry.load_state_dict(trained.state_dict())


def test_wrong_embedding_shape_is_rejected():
    net = build("plain", 2, False)
    with pytest.raises(ValueError, match=r"shape \[4, 2, 512\].*\[5, 2, 512\]"):
        net.set_text_embeddings(torch.randn(4, 2, 512))


def reference_dynamic_head(features: torch.Tensor, params: torch.Tensor, h: int) -> torch.Tensor:
    """Per-sample, per-class loop with 1x1 convolutions: what apply_dynamic_head must equal."""
    b, c = params.shape[:2]
    dim = features.ndim - 2
    conv = F.conv3d if dim == 3 else F.conv2d
    layers = split_dynamic_params(params, h)
    out = torch.empty(b, c, *features.shape[2:])
    for i in range(b):
        for j in range(c):
            x = features[i:i + 1]
            for n, (w, bias) in enumerate(layers):
                w_ij = w[i * c + j]
                x = conv(x, w_ij.reshape(*w_ij.shape, *[1] * dim), bias[i * c + j].flatten())
                if n < len(layers) - 1:
                    x = F.relu(x)
            out[i, j] = x[0, 0]
    return out


@pytest.mark.parametrize("spatial", [(6, 7), (4, 5, 6)])
def test_batched_head_equals_per_sample_reference(spatial):
    torch.manual_seed(0)
    cfg = TextPriorConfig()
    features = torch.randn(3, cfg.head_channels, *spatial, dtype=torch.float64)
    params = torch.randn(3, NUM_CLASSES, cfg.num_dynamic_params, dtype=torch.float64)
    expected = reference_dynamic_head(features, params, cfg.head_channels).to(torch.float64)
    torch.testing.assert_close(apply_dynamic_head(features, params, cfg.head_channels), expected)
    with torch.no_grad():  # prediction path: in-place bias/ReLU, chunked
        torch.testing.assert_close(apply_dynamic_head(features, params, cfg.head_channels), expected)
        torch.testing.assert_close(apply_dynamic_head(features, params, cfg.head_channels, chunk_voxels=7), expected)


def test_text_changes_the_output_and_gradients_reach_every_part():
    torch.manual_seed(0)
    net = build("plain", 2, True)
    x = torch.randn(2, 1, 64, 64)
    net.set_text_embeddings(torch.randn(NUM_CLASSES, 2, 512))
    out1 = net(x)
    sum(o.sum() for o in out1).backward()
    for name, p in net.named_parameters():
        if not name.startswith("contrast."):  # the contrastive heads serve the training loss only
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert not net.text_prior.text_embeddings.requires_grad  # E is frozen (a buffer)
    net.set_text_embeddings(torch.randn(NUM_CLASSES, 2, 512))
    assert not torch.allclose(out1[0], net(x)[0])


@pytest.mark.parametrize("samples", [0, 1])
def test_lower_outputs_for_the_first_samples_only_keep_values_and_gradients(samples):
    """deep_supervision_samples n: the full-resolution output for all samples, the lower ones for the first n;
    what is returned and the gradients of a loss that reads it equal the whole list's."""
    torch.manual_seed(0)
    net = build("plain", 3, True)
    net.set_text_embeddings(torch.randn(NUM_CLASSES, 2, 512))
    x = torch.randn(3, 1, 32, 32, 32)
    results = []
    for n in (None, samples):
        net.zero_grad()
        out = net(x, deep_supervision_samples=n)
        if n is not None:
            assert out[0].shape[0] == 3 and all(o.shape[0] == n for o in out[1:])
        read = [out[0], *[o[:samples] for o in out[1:]]]
        sum(o.square().mean() if o.numel() else o.sum() for o in read).backward()
        results.append((read, {k: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                               for k, p in net.named_parameters()}))
    (whole, whole_grads), (first, first_grads) = results
    for a, b in zip(first, whole, strict=True):
        torch.testing.assert_close(a, b)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(first_grads[name], grad, msg=name)


def test_chunked_head_matches_plain_graph_in_values_and_gradients():
    torch.manual_seed(0)
    cfg = TextPriorConfig()
    features = torch.randn(2, cfg.head_channels, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    params = torch.randn(2, NUM_CLASSES, cfg.num_dynamic_params, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, NUM_CLASSES, 5, 6, 7, dtype=torch.float64)
    grads = []
    for chunk in (0, 37):  # 210 voxels -> 6 chunks, the last one partial
        out = apply_dynamic_head(features, params, cfg.head_channels, chunk_voxels=chunk)
        grads.append((out, *torch.autograd.grad((out * weights).sum(), (features, params))))
    for plain, chunked in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(chunked, plain)
    assert torch.autograd.gradcheck(
        lambda f, p: apply_dynamic_head(f, p, cfg.head_channels, chunk_voxels=50),
        (features[:1, :, :2, :3, :4].detach().requires_grad_(), params[:1].detach().requires_grad_()))


def test_traces_as_one_graph_for_torch_compile():
    """No data-dependent Python control flow: dynamo captures forward (incl. the chunked head's
    autograd.Function) without graph breaks, and values and gradients match eager mode."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    net = build("plain", 3, True)
    net.set_text_embeddings(torch.randn(NUM_CLASSES, 2, 512))
    x = torch.randn(2, 1, 32, 32, 32)  # 32768 voxels at full resolution -> 8 chunks of 4096
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    eager_out, compiled_out = net(x), compiled(x)
    for e, c in zip(eager_out, compiled_out, strict=True):
        torch.testing.assert_close(c, e)
    grads = []
    for out in (eager_out, compiled_out):
        net.zero_grad()
        sum(o.square().mean() for o in out).backward()
        grads.append(net.text_prior.controller.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_autocast_forward_backward():
    """Mixed precision (bfloat16 autocast on CPU stands in for nnU-Net's float16 autocast on CUDA)."""
    torch.manual_seed(0)
    net = build("resenc", 3, True)
    net.set_text_embeddings(torch.randn(NUM_CLASSES, 2, 512))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 32, 32, 32))
        loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert net.text_prior.controller.weight.grad.abs().sum() > 0


def test_checkpoint_with_contrastive_heads_of_release_0_1_still_loads(caplog):
    """0.1 checkpoints carry MLP contrastive heads (Linear-ReLU-Linear on gathered voxels, two-layer
    text MLPs); they are training-only, so the network loads such a state dict (heads re-initialised)."""
    torch.manual_seed(0)
    net = build("plain", 3, True)
    state = net.state_dict()
    old = {k: v for k, v in state.items() if not k.startswith("contrast.")}
    for s, ch in enumerate(net.encoder.output_channels[-net.num_image_stages:]):
        old[f"contrast.voxel.{s}.0.weight"] = torch.randn(ch, ch)
        old[f"contrast.voxel.{s}.2.weight"] = torch.randn(ch, ch)
        old[f"contrast.text.{s}.2.weight"] = torch.randn(ch, ch)
    fresh = build("plain", 3, True)
    own_heads = {k: v.clone() for k, v in fresh.contrast.state_dict().items()}
    with caplog.at_level("WARNING"):
        fresh.load_state_dict(old)  # strict
    assert "older form" in caplog.text
    for key, value in fresh.contrast.state_dict().items():
        torch.testing.assert_close(value, own_heads[key])
    for key, value in fresh.state_dict().items():
        if not key.startswith("contrast."):
            torch.testing.assert_close(value, state[key])
