"""The per-class dynamic head: a 1x1 MLP h->h->h->1 per (sample, class) whose parameters come from the
controller, applied as batched matmuls over voxel chunks (bounded memory), or as fused Triton kernels on CUDA
(``TAK_FUSED_HEAD=1``, see fused_head).

Shapes: B batch, C classes, h head channels, N voxels, P dynamic parameters per class."""


from __future__ import annotations

import logging

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from nnunetv2_tak.model.fused_head import FUSED_HEAD_ENV, apply_fused_head, fused_head_available, fused_head_requested

logger = logging.getLogger(__name__)


MAX_HEAD_CHUNKS = 32  # at most this many voxel chunks per output under torch.compile: bounded graph size
HEAD_CHUNK_ELEMENTS = 2**22  # at most this many hidden values per sample in one head chunk (see head_chunk_voxels)
MIN_CHUNK_VOXELS = 512  # floor of the class-adapted chunk (per-chunk overhead)
EAGER_CHUNKED_FUNCTION = True  # False: eager mode also runs the checkpointed chunks (benchmark baseline)


def split_dynamic_params(params: torch.Tensor, head_channels: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[B, C, P] -> [(w1 [B*C, h, h], b1 [B*C, h, 1]), (w2, b2), (w3 [B*C, 1, h], b3 [B*C, 1, 1])]."""
    h = head_channels
    flat = params.reshape(-1, params.shape[-1])
    sizes = [h * h, h, h * h, h, h, 1]
    w1, b1, w2, b2, w3, b3 = torch.split(flat, sizes, dim=1)
    return [
        (w1.reshape(-1, h, h), b1.reshape(-1, h, 1)),
        (w2.reshape(-1, h, h), b2.reshape(-1, h, 1)),
        (w3.reshape(-1, 1, h), b3.reshape(-1, 1, 1)),
    ]


def _dynamic_head_flat(x: torch.Tensor, params: torch.Tensor, head_channels: int) -> torch.Tensor:
    """x [B, h, n] (flattened voxels), params [B, C, P] -> logits [B, C, n] as three batched matmuls."""
    b, h = x.shape[:2]
    c = params.shape[1]
    (w1, b1), (w2, b2), (w3, b3) = split_dynamic_params(params, head_channels)
    # layer 1 for all classes at once: [B, C*h, h] @ [B, h, n]
    x = _batched_linear(w1.reshape(b, c * h, h), x, b1.reshape(b, c * h, 1), relu=True)
    x = _batched_linear(w2, x.reshape(b * c, h, -1), b2, relu=True)
    x = _batched_linear(w3, x, b3, relu=False)  # [B*C, 1, n]
    return x.reshape(b, c, -1)


def _batched_linear(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    """w [G, o, i] @ x [G, i, n] + bias [G, o, 1], optionally ReLU. Without autograd (prediction) the bias
    and ReLU are applied in place, which saves two memory passes over the [G, o, n] output."""
    if torch.is_grad_enabled():
        y = torch.baddbmm(bias, w, x)
        return torch.relu(y) if relu else y
    y = torch.bmm(w, x).add_(bias)
    return y.relu_() if relu else y


def head_chunk_voxels(chunk_voxels: int, num_classes: int, head_channels: int) -> int:
    """Voxels per head chunk: ``chunk_voxels``, lowered when needed so that one chunk's hidden map
    ([B, C*h, chunk]) holds at most ``HEAD_CHUNK_ELEMENTS`` values per sample (16 MiB in float32), but not
    below ``MIN_CHUNK_VOXELS``. With the default 4096 voxels and h = 8 that changes nothing up to 128
    classes (117: 3.8 M values per sample); smaller chunks cost time on CPU (one small matmul per sample
    and class per chunk). 0 (no chunking) stays 0."""
    if chunk_voxels <= 0:
        return 0
    budget = HEAD_CHUNK_ELEMENTS // max(num_classes * head_channels, 1)
    return min(chunk_voxels, max(budget, MIN_CHUNK_VOXELS))


def _split_for_head(params: torch.Tensor, h: int) -> tuple[torch.Tensor, ...]:
    """[B, C, P] -> w1 [B, C*h, h], b1 [B, C*h, 1], w2 [B*C, h, h], b2 [B*C, h, 1], w3 [B*C, 1, h],
    b3 [B*C, 1, 1] (the layout of ``split_dynamic_params``, layer 1 grouped per sample)."""
    b, c = params.shape[:2]
    (w1, b1), (w2, b2), (w3, b3) = split_dynamic_params(params, h)
    return w1.reshape(b, c * h, h), b1.reshape(b, c * h, 1), w2, b2, w3, b3


def _head_chunk_hidden(xs: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """No autograd: xs [B, h, m] -> post-ReLU hidden maps a1 [B, C*h, m], a2 [B*C, h, m] (ReLU in place;
    baddbmm as in ``_dynamic_head_flat``, so the values are the same to the bit, also under autocast)."""
    w1, b1, w2, b2 = weights[:4]
    a1 = torch.baddbmm(b1, w1, xs).relu_()
    a2 = torch.baddbmm(b2, w2, a1.view(w2.shape[0], w2.shape[2], -1)).relu_()
    return a1, a2


def _relu_backward(grad: torch.Tensor, relu_output: torch.Tensor) -> torch.Tensor:
    """``grad`` with 0 where the ReLU's output is <= 0: the kernel autograd's own ReLU backward runs (ATen's
    threshold_backward), one vectorised pass; ``masked_fill_`` with a ``<= 0`` mask gives the same values
    but took about 10x longer on CPU (a mask pass, then a slow masked write)."""
    return torch.ops.aten.threshold_backward(grad, relu_output, 0)


class _ChunkedDynamicHead(torch.autograd.Function):
    """Eager-mode chunked head with a hand-written backward: the same maths and the same matmuls as
    autograd through ``_dynamic_head_flat`` chunk by chunk, but the forward runs without a graph (bias and
    ReLU in place, logits written into one preallocated [B, C, n] tensor instead of a concatenation), and
    the backward recomputes one chunk's hidden maps at a time and turns them into gradients
    (ReLU masks applied by autograd's own ReLU-backward kernel, gradients of the dynamic parameters accumulated
    over chunks).
    Only x and params are saved; per chunk at most four [B, C*h, chunk]-sized maps exist at once.
    Under autocast it computes in the autocast dtype, like the matmuls it replaces, and accumulates the
    parameter gradient in the parameters' dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, params: torch.Tensor, head_channels: int, chunk: int) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        ctx.save_for_backward(x, params)
        ctx.head_channels, ctx.chunk, ctx.dtype = head_channels, chunk, dtype
        with torch.autocast(device_type, enabled=False):
            return _chunked_forward(x.to(dtype), params.to(dtype), head_channels, chunk)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, params = ctx.saved_tensors
        h, chunk, dtype = ctx.head_channels, ctx.chunk, ctx.dtype
        b, c = params.shape[:2]
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            weights = _split_for_head(params.to(dtype), h)
            w1, _, w2, _, w3, _ = weights
            grads = ([torch.zeros(t.shape, dtype=params.dtype, device=t.device) for t in weights]
                     if ctx.needs_input_grad[1] else None)
            grad_x = torch.empty_like(xc) if ctx.needs_input_grad[0] else None
            for s in range(0, x.shape[-1], chunk):
                xs = xc[..., s:s + chunk]
                a1, a2 = _head_chunk_hidden(xs, weights)
                gy = grad_out[..., s:s + chunk].to(dtype).reshape(b * c, 1, -1)  # [B*C, 1, m]
                a1v = a1.view(b * c, h, -1)
                g2 = _relu_backward(torch.bmm(w3.transpose(1, 2), gy), a2)  # [B*C, h, m], ReLU 2
                if grads is not None:
                    grads[5] += gy.sum(dim=2, keepdim=True)
                    grads[4] += torch.bmm(gy, a2.transpose(1, 2))
                    grads[3] += g2.sum(dim=2, keepdim=True)
                    grads[2] += torch.bmm(g2, a1v.transpose(1, 2))
                del a2  # read no more: g1's matmul result and g1 then live beside a1 and g2 only (four maps)
                g1 = _relu_backward(torch.bmm(w2.transpose(1, 2), g2), a1v).view(b, c * h, -1)  # ReLU 1
                del a1, a1v, g2
                if grads is not None:
                    grads[1] += g1.sum(dim=2, keepdim=True)
                    grads[0] += torch.bmm(g1, xs.transpose(1, 2))
                if grad_x is not None:
                    grad_x[..., s:s + chunk] = torch.bmm(w1.transpose(1, 2), g1)
        grad_params = None
        if grads is not None:
            grad_params = torch.cat([g.reshape(b * c, -1) for g in grads], dim=1).reshape(params.shape)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_params, None, None


def _chunked_forward(x: torch.Tensor, params: torch.Tensor, head_channels: int, chunk: int) -> torch.Tensor:
    """No autograd: x [B, h, n], params [B, C, P] -> logits [B, C, n], one chunk of voxels at a time."""
    b, c, n = x.shape[0], params.shape[1], x.shape[-1]
    weights = _split_for_head(params, head_channels)
    out = None
    for s in range(0, n, chunk):
        _, a2 = _head_chunk_hidden(x[..., s:s + chunk], weights)
        y = torch.baddbmm(weights[5], weights[4], a2).view(b, c, -1)
        if out is None:  # the matmuls' dtype (the autocast dtype under autocast)
            out = torch.empty(b, c, n, dtype=y.dtype, device=y.device)
        out[..., s:s + chunk] = y
    return out


def apply_dynamic_head(features: torch.Tensor, params: torch.Tensor, head_channels: int,
                       chunk_voxels: int = 0) -> torch.Tensor:
    """Per-sample, per-class 1x1 MLP (h->h->h->1, ReLU between) as batched matmuls, no loop over
    samples or classes.

    features: [B, h, *S]; params: [B, C, P] -> logits [B, C, *S]. ``chunk_voxels`` > 0 processes that many
    voxels at a time (see ``head_chunk_voxels`` for the class-adapted size the network uses), so the hidden
    maps ([B, C*h, chunk]: 936 channels per sample at 117 classes) never exist for the whole volume; the
    largest tensors are the input and the logits themselves. Eager mode uses ``_ChunkedDynamicHead``
    (bounded by the chunk alone, whatever the volume); under torch.compile the chunks are activation
    checkpoints that dynamo unrolls, so there are at most ``MAX_HEAD_CHUNKS`` (bounded graph; the chunk then
    grows for volumes above MAX_HEAD_CHUNKS * chunk voxels, its hidden map staying <= h / MAX_HEAD_CHUNKS
    of the logits' size).
    """
    b = features.shape[0]
    spatial = features.shape[2:]
    x = features.reshape(b, features.shape[1], -1)
    n = x.shape[-1]
    if fused_head_requested():
        if fused_head_available(x):
            return apply_fused_head(x, params, head_channels).reshape(b, params.shape[1], *spatial)
        _warn_fused_unavailable(x)
    checkpointed = torch.compiler.is_compiling() or not EAGER_CHUNKED_FUNCTION
    if chunk_voxels > 0 and checkpointed:
        chunk_voxels = max(chunk_voxels, -(-n // MAX_HEAD_CHUNKS))  # bound the unrolled chunks
    if not 0 < chunk_voxels < n:
        out = _dynamic_head_flat(x, params, head_channels)
    elif checkpointed:
        # checkpointed chunks: backward recomputes each chunk's hidden maps (traceable by dynamo)
        out = torch.cat([checkpoint(_dynamic_head_flat, x[..., s:s + chunk_voxels], params, head_channels,
                                    use_reentrant=False)
                         for s in range(0, n, chunk_voxels)], dim=2)
    elif torch.is_grad_enabled() and (x.requires_grad or params.requires_grad):
        out = _ChunkedDynamicHead.apply(x, params, head_channels, chunk_voxels)
    else:
        out = _chunked_forward(x, params, head_channels, chunk_voxels)
    return out.reshape(b, params.shape[1], *spatial)


_fused_warned: set[str] = set()


def _warn_fused_unavailable(x: torch.Tensor) -> None:
    if x.device.type not in _fused_warned:
        _fused_warned.add(x.device.type)
        logger.warning("%s=1 is set, but the fused head kernels need Triton and a CUDA tensor; the head on %s "
                       "runs the eager kernels (same maths).", FUSED_HEAD_ENV, x.device)


