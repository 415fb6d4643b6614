"""Fused Triton kernels for the per-class dynamic head (CUDA; opt-in with ``TAK_FUSED_HEAD=1``).

The eager head (``dynamic_head.apply_dynamic_head``) computes the per-sample, per-class 1x1 MLP h->h->h->1 as
batched matmuls with an inner dimension of h = 8: it writes and reads back C*h hidden values per voxel
(936 at 117 classes), three times over in training, which makes it memory-bound
(examples/HEAD_OVERHEAD.md). These kernels keep a voxel's hidden values on chip instead: the forward reads
the h input channels of a block of voxels once and writes only the C logits; the backward reads the input
and the logits' gradient and recomputes the hidden values. Same maths (float32 accumulation):
tests/test_fused_head.py checks logits and gradients against ``_dynamic_head_flat`` with Triton's
interpreter on the CPU (``TRITON_INTERPRET=1``).

Not measured on a GPU yet, hence opt-in: ``bash examples/gpu_check.sh`` checks it against the eager head on
a GPU and times both (``examples/benchmark_head_overhead.py --device cuda --fused``).
"""

from __future__ import annotations

import os

import torch

FUSED_HEAD_ENV = "TAK_FUSED_HEAD"  # "1": CUDA tensors go through these kernels
BLOCK_VOXELS = 128  # voxels per program (a power of two)
PARAM_CHUNKS = 64  # voxel chunks per (sample, class) in the parameter-gradient kernel

try:  # triton ships with CUDA builds of torch; without it the eager head is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def fused_head_requested() -> bool:
    """``TAK_FUSED_HEAD=1``: the head runs as fused Triton kernels on CUDA (nnunetv2_tak.model.fused_head)."""
    return os.environ.get(FUSED_HEAD_ENV, "0") not in ("", "0")


def fused_head_available(x: torch.Tensor) -> bool:
    """Whether ``apply_fused_head`` can run on ``x``'s device: Triton present and a CUDA tensor, or any
    tensor under Triton's CPU interpreter (tests)."""
    if triton is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _load_layer(p, H: tl.constexpr, HP: tl.constexpr, w_off, b_off):
        """(W [HP, HP] float32, bias [HP]) of a square layer of one class's parameters, zero-padded."""
        r = tl.arange(0, HP)
        mask = (r[:, None] < H) & (r[None, :] < H)
        w = tl.load(p + w_off + r[:, None] * H + r[None, :], mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(p + b_off + r, mask=r < H, other=0.0).to(tl.float32)
        return w, bias

    @triton.jit
    def _hidden(x, p, H: tl.constexpr, HP: tl.constexpr):
        """x [HP, BLOCK] -> post-ReLU hidden maps a1, a2 [HP, BLOCK] and the layer weights."""
        w1, b1 = _load_layer(p, H, HP, 0, H * H)
        w2, b2 = _load_layer(p, H, HP, H * H + H, 2 * H * H + H)
        a1 = tl.maximum(tl.dot(w1, x, input_precision="ieee") + b1[:, None], 0.0)
        a2 = tl.maximum(tl.dot(w2, a1, input_precision="ieee") + b2[:, None], 0.0)
        return a1, a2, w1, w2

    @triton.jit
    def _load_x(x_ptr, b, N, offs, H: tl.constexpr, HP: tl.constexpr):
        r = tl.arange(0, HP)
        mask = (r[:, None] < H) & (offs[None, :] < N)
        return tl.load(x_ptr + b * H * N + r[:, None] * N + offs[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _head_forward_kernel(x_ptr, p_ptr, out_ptr, C, N, P, H: tl.constexpr, HP: tl.constexpr,
                             BLOCK: tl.constexpr):
        """grid (voxel blocks, B): one block of one sample's voxels, every class."""
        b = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r = tl.arange(0, HP)
        x = _load_x(x_ptr, b, N, offs, H, HP)
        for c in range(C):
            p = p_ptr + (b * C + c) * P
            _, a2, _, _ = _hidden(x, p, H, HP)
            w3 = tl.load(p + 2 * H * H + 2 * H + r, mask=r < H, other=0.0).to(tl.float32)
            b3 = tl.load(p + 2 * H * H + 3 * H).to(tl.float32)
            y = tl.sum(w3[:, None] * a2, axis=0) + b3
            tl.store(out_ptr + (b * C + c) * N + offs, y.to(out_ptr.dtype.element_ty), mask=offs < N)

    @triton.jit
    def _head_grad_params_kernel(x_ptr, p_ptr, gy_ptr, ws_ptr, C, N, P, blocks_per_chunk,
                                 H: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr):
        """grid (chunks, B*C): the parameter gradient of one (sample, class) over one chunk of voxels,
        written to ws [B*C, chunks, P] (float32, summed over chunks afterwards)."""
        chunk = tl.program_id(0)
        bc = tl.program_id(1)
        b = bc // C
        p = p_ptr + bc * P
        r = tl.arange(0, HP)
        w3 = tl.load(p + 2 * H * H + 2 * H + r, mask=r < H, other=0.0).to(tl.float32)
        gw1 = tl.zeros((HP, HP), tl.float32)
        gw2 = tl.zeros((HP, HP), tl.float32)
        gb1 = tl.zeros((HP,), tl.float32)
        gb2 = tl.zeros((HP,), tl.float32)
        gw3 = tl.zeros((HP,), tl.float32)
        gb3 = tl.zeros((HP,), tl.float32)  # only element 0 is used (a vector keeps the loop types fixed)
        for i in range(blocks_per_chunk):
            offs = (chunk * blocks_per_chunk + i) * BLOCK + tl.arange(0, BLOCK)
            x = _load_x(x_ptr, b, N, offs, H, HP)
            a1, a2, _, w2 = _hidden(x, p, H, HP)
            gy = tl.load(gy_ptr + bc * N + offs, mask=offs < N, other=0.0).to(tl.float32)  # 0 beyond N
            gw3 += tl.sum(a2 * gy[None, :], axis=1)
            gb3 += tl.where(r == 0, tl.sum(gy, axis=0), 0.0)
            g2 = tl.where(a2 > 0, w3[:, None] * gy[None, :], 0.0)  # [HP, BLOCK], ReLU 2
            gw2 += tl.dot(g2, tl.trans(a1), input_precision="ieee")
            gb2 += tl.sum(g2, axis=1)
            g1 = tl.where(a1 > 0, tl.dot(tl.trans(w2), g2, input_precision="ieee"), 0.0)  # ReLU 1
            gw1 += tl.dot(g1, tl.trans(x), input_precision="ieee")
            gb1 += tl.sum(g1, axis=1)
        out = ws_ptr + (bc * tl.num_programs(0) + chunk) * P
        square = (r[:, None] < H) & (r[None, :] < H)
        tl.store(out + r[:, None] * H + r[None, :], gw1, mask=square)
        tl.store(out + H * H + r, gb1, mask=r < H)
        tl.store(out + H * H + H + r[:, None] * H + r[None, :], gw2, mask=square)
        tl.store(out + 2 * H * H + H + r, gb2, mask=r < H)
        tl.store(out + 2 * H * H + 2 * H + r, gw3, mask=r < H)
        tl.store(out + 2 * H * H + 3 * H + r, gb3, mask=r == 0)

    @triton.jit
    def _head_grad_x_kernel(x_ptr, p_ptr, gy_ptr, gx_ptr, C, N, P, H: tl.constexpr, HP: tl.constexpr,
                            BLOCK: tl.constexpr):
        """grid (voxel blocks, B): the input gradient of one block, summed over classes on chip."""
        b = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r = tl.arange(0, HP)
        x = _load_x(x_ptr, b, N, offs, H, HP)
        gx = tl.zeros((HP, BLOCK), tl.float32)
        for c in range(C):
            p = p_ptr + (b * C + c) * P
            a1, a2, w1, w2 = _hidden(x, p, H, HP)
            w3 = tl.load(p + 2 * H * H + 2 * H + r, mask=r < H, other=0.0).to(tl.float32)
            gy = tl.load(gy_ptr + (b * C + c) * N + offs, mask=offs < N, other=0.0).to(tl.float32)
            g2 = tl.where(a2 > 0, w3[:, None] * gy[None, :], 0.0)
            g1 = tl.where(a1 > 0, tl.dot(tl.trans(w2), g2, input_precision="ieee"), 0.0)
            gx += tl.dot(tl.trans(w1), g1, input_precision="ieee")
        mask = (r[:, None] < H) & (offs[None, :] < N)
        tl.store(gx_ptr + b * H * N + r[:, None] * N + offs[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mask)


def _padded(h: int) -> int:
    """Triton's dot needs every dimension >= 16 and a power of two."""
    return max(16, 1 << (h - 1).bit_length())


class _FusedDynamicHead(torch.autograd.Function):
    """x [B, h, n], params [B, C, P] -> logits [B, C, n] (the autocast dtype under autocast, else x's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, params: torch.Tensor, head_channels: int) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x, params = x.contiguous(), params.contiguous()
        b, h, n = x.shape
        c, p = params.shape[1:]
        out = torch.empty(b, c, n, dtype=dtype, device=x.device)
        grid = (triton.cdiv(n, BLOCK_VOXELS), b)
        _head_forward_kernel[grid](x, params, out, c, n, p, H=h, HP=_padded(h), BLOCK=BLOCK_VOXELS)
        ctx.save_for_backward(x, params)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, params = ctx.saved_tensors
        b, h, n = x.shape
        c, p = params.shape[1:]
        gy = grad_out.contiguous()
        grad_x = grad_params = None
        if ctx.needs_input_grad[1]:
            blocks = triton.cdiv(n, BLOCK_VOXELS)
            chunks = min(PARAM_CHUNKS, blocks)
            ws = torch.empty(b * c, chunks, p, dtype=torch.float32, device=x.device)
            _head_grad_params_kernel[(chunks, b * c)](x, params, gy, ws, c, n, p, triton.cdiv(blocks, chunks),
                                                      H=h, HP=_padded(h), BLOCK=BLOCK_VOXELS)
            grad_params = ws.sum(dim=1).reshape(params.shape).to(params.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            _head_grad_x_kernel[(triton.cdiv(n, BLOCK_VOXELS), b)](x, params, gy, grad_x, c, n, p, H=h,
                                                                   HP=_padded(h), BLOCK=BLOCK_VOXELS)
        return grad_x, grad_params, None


@torch.compiler.disable  # launched as is under torch.compile (a graph break at the head)
def apply_fused_head(x: torch.Tensor, params: torch.Tensor, head_channels: int) -> torch.Tensor:
    """x [B, h, n] (flattened voxels), params [B, C, P] -> logits [B, C, n], fused (see the module doc)."""
    if triton is None:
        raise RuntimeError(f"{FUSED_HEAD_ENV}=1 needs Triton (it ships with CUDA builds of torch); "
                           f"unset {FUSED_HEAD_ENV} to use the eager head")
    if x.shape[1] != head_channels:
        raise ValueError(f"the head input has {x.shape[1]} channels, the head expects {head_channels}")
    return _FusedDynamicHead.apply(x, params, head_channels)
