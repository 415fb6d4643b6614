"""Text-prior head at TotalSegmentator-like class counts (117): the eager chunked head with its hand-written
backward equals the plain autograd graph and the checkpointed formulation (values and gradients), and what it
materialises is bounded: apart from the input and the logits (inherently classes x voxels), no tensor grows
with the volume."""

from __future__ import annotations

import pytest
import torch
from _nets import configuration_manager
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import nnunetv2_tak.model.dynamic_head as dynamic_head
from nnunetv2_tak.model.dynamic_head import HEAD_CHUNK_ELEMENTS, MIN_CHUNK_VOXELS, apply_dynamic_head, head_chunk_voxels
from nnunetv2_tak.model.network import TextPriorConfig
from nnunetv2_tak.trainers import PLANS_KEY, nnUNetTrainerTAK

CLASSES = 117
H = TextPriorConfig().head_channels
P = TextPriorConfig().num_dynamic_params


class AllocationRecorder(TorchDispatchMode):
    """Records the byte size of every tensor an aten op allocates (outputs that share no storage with an
    input: views and in-place results are not allocations), forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


def head_inputs(spatial: tuple[int, ...], classes: int = CLASSES, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, H, *spatial, dtype=dtype, generator=g).requires_grad_()
    params = torch.randn(2, classes, P, dtype=dtype, generator=g).requires_grad_()
    weights = torch.randn(2, classes, *spatial, dtype=dtype, generator=g)
    return features, params, weights


def values_and_grads(features, params, weights, chunk: int, inputs=None):
    inputs = inputs or (features, params)
    out = apply_dynamic_head(features, params, H, chunk_voxels=chunk)
    return (out, *torch.autograd.grad((out * weights).sum(), inputs))


@pytest.mark.parametrize("chunk", [64, 100, 336, 1000])  # 6 chunks, 4 (last partial), exactly 1, larger than n
def test_chunked_function_equals_plain_graph_and_checkpointed_chunks(chunk, monkeypatch):
    features, params, weights = head_inputs((6, 7, 8))  # 336 voxels
    plain = values_and_grads(features, params, weights, chunk=0)
    fused = values_and_grads(features, params, weights, chunk=chunk)
    monkeypatch.setattr(dynamic_head, "EAGER_CHUNKED_FUNCTION", False)  # the formulation torch.compile traces
    checkpointed = values_and_grads(features, params, weights, chunk=chunk)
    for name, p, f, c in zip(("logits", "d features", "d params"), plain, fused, checkpointed, strict=True):
        # the same maths to float64 rounding (gradients summed over chunks in another order)
        torch.testing.assert_close(f, p, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(f, c, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.equal(fused[0], checkpointed[0])  # forward: the same baddbmm calls on the same chunks


def test_chunked_function_gradient_of_one_input_only():
    features, params, weights = head_inputs((5, 6, 7), classes=7)
    for inputs in ((features,), (params,)):
        plain = values_and_grads(features, params, weights, 0, inputs)
        fused = values_and_grads(features, params, weights, 37, inputs)
        for p, f in zip(plain, fused, strict=True):
            torch.testing.assert_close(f, p, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # prediction path: preallocated logits, no graph
        torch.testing.assert_close(apply_dynamic_head(features, params, H, 37), plain[0], rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda f, p: apply_dynamic_head(f, p, H, chunk_voxels=9),
                                    (features[:, :, :2, :3, :4].detach().requires_grad_(),
                                     params.detach().requires_grad_()))


def test_chunked_function_under_autocast_matches_checkpointed_chunks(monkeypatch):
    """bfloat16 autocast (CPU stand-in for nnU-Net's float16 on CUDA): the matmuls run in the autocast dtype
    in both formulations, the parameter gradient comes back in the parameters' dtype."""
    features, params, weights = head_inputs((6, 7, 8), dtype=torch.float32)
    results = []
    for function in (True, False):
        monkeypatch.setattr(dynamic_head, "EAGER_CHUNKED_FUNCTION", function)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(values_and_grads(features, params, weights, chunk=100))
    (out, gf, gp), (out_ref, gf_ref, gp_ref) = results
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert gp.dtype == params.dtype and gf.dtype == features.dtype
    assert torch.equal(out, out_ref)  # the same baddbmm calls in the same dtype
    for g, ref in ((gf, gf_ref), (gp, gp_ref)):  # bfloat16 sums in another order: within a few bf16 ulps
        torch.testing.assert_close(g, ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def head_allocations(spatial: tuple[int, ...], chunk: int) -> tuple[list[int], int, int]:
    """Bytes of every allocation of a forward+backward through the head; also the logits' and the input's
    sizes (classes x voxels and h x voxels, the inherent ones)."""
    features, params, weights = head_inputs(spatial, dtype=torch.float32)
    features, params, weights = features.detach(), params.detach().requires_grad_(), weights
    features.requires_grad_()
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with AllocationRecorder() as recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = apply_dynamic_head(features, params, H, chunk_voxels=chunk)
        out.backward(weights)  # the logits' gradient is given, not allocated here
    # the graph keeps the inputs only (features and params), nothing per chunk or per class x voxel
    assert max(saved) <= max(features.numel(), weights.numel()) and sum(saved) <= 2 * weights.numel() + features.numel()
    return recorder.sizes, out.numel() * 4, features.numel() * 4


@pytest.mark.parametrize("spatial", [(16, 16, 16), (32, 32, 32)])  # 4,096 and 32,768 voxels
def test_head_memory_is_bounded_by_the_chunk_whatever_the_volume(spatial):
    chunk = 384  # 11 and 86 chunks: above MAX_HEAD_CHUNKS the checkpointed formulation would grow the chunk
    sizes, logits, inputs = head_allocations(spatial, chunk)
    hidden = 2 * CLASSES * H * chunk * 4  # [B, C*h, chunk] float32
    assert sizes.count(logits) == 1  # the logits, written chunk by chunk into one tensor
    others = [s for s in sizes if s not in (logits, inputs)]  # inputs: the features' gradient
    assert max(others) == hidden  # the per-chunk hidden maps, the same for both volumes


def test_checkpointed_formulation_grows_with_the_volume_where_the_function_does_not(monkeypatch):
    """The recorder sees the difference: eager checkpointed chunks are capped at MAX_HEAD_CHUNKS, so their
    hidden map grows with the volume (what the class-count issue asked to remove in eager mode)."""
    chunk = 384
    grown = []
    for function in (True, False):
        monkeypatch.setattr(dynamic_head, "EAGER_CHUNKED_FUNCTION", function)
        sizes, logits, inputs = head_allocations((32, 32, 32), chunk)
        grown.append(max(s for s in sizes if s not in (logits, inputs)))
    assert grown[0] == 2 * CLASSES * H * chunk * 4
    assert grown[1] >= 2 * grown[0]  # 32,768 voxels / 32 chunks = 1,024 voxels per chunk


def test_chunk_size_adapts_to_the_class_count():
    assert head_chunk_voxels(4096, 16, H) == 4096
    assert head_chunk_voxels(4096, 117, H) == 4096  # 3.8 M hidden values per sample: within the budget
    assert head_chunk_voxels(4096, 1000, H) == HEAD_CHUNK_ELEMENTS // (1000 * H)
    assert head_chunk_voxels(4096, 10**5, H) == MIN_CHUNK_VOXELS
    assert head_chunk_voxels(0, 117, H) == 0
    for classes in (2, 16, 50, 117, 300, 1000):
        chunk = head_chunk_voxels(4096, classes, H)
        assert classes * H * chunk <= HEAD_CHUNK_ELEMENTS or chunk == MIN_CHUNK_VOXELS


@pytest.mark.parametrize("size", [16, 24])
def test_network_at_117_classes_holds_nothing_larger_than_its_logits(size):
    """Whole TextPriorUNet (deep supervision on, forward + backward): the largest allocation is the
    full-resolution logits [B, C, *S] (stock nnU-Net allocates the same); controller [B, C, P] and text MLP
    [C, K, hidden] do not depend on the volume."""
    torch.manual_seed(0)
    head = TextPriorConfig(chunk_voxels=512).to_dict()
    cm = configuration_manager("plain", 3, extra={PLANS_KEY: {"head": head, "text": {}}})
    net = nnUNetTrainerTAK.build_network_architecture(None, cm, 1, CLASSES, True)
    net.set_text_embeddings(torch.randn(CLASSES, 2, 512))
    x = torch.randn(2, 1, size, size, size)
    with AllocationRecorder() as recorder:
        out = net(x)
        sum(o.square().mean() for o in out).backward()
    logits = out[0].numel() * 4
    assert max(recorder.sizes) == logits
    params = net.text_prior(net.encoder(x)[-net.num_image_stages:])
    assert params.shape == (2, CLASSES, P)
    assert net.text_prior.text_features().shape == (CLASSES, TextPriorConfig().hidden_dim)
