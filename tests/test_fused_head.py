"""The fused Triton head (TAK_FUSED_HEAD=1) computes the eager head's logits and gradients: run with Triton's
CPU interpreter in a subprocess (TRITON_INTERPRET must be set before Triton is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from nnunetv2_tak.model import fused_head
    from nnunetv2_tak.model.dynamic_head import _dynamic_head_flat, apply_dynamic_head
    from nnunetv2_tak.model.network import TextPriorConfig

    calls = []  # the fused kernels, not the eager head, must have run
    launch = fused_head._FusedDynamicHead.apply
    fused_head._FusedDynamicHead.apply = lambda *args: (calls.append(args[0].shape), launch(*args))[1]
    torch.manual_seed(0)
    h = 8
    p = TextPriorConfig(head_channels=h).num_dynamic_params
    for b, c, n in ((2, 3, 300), (1, 5, 128), (2, 2, 77)):  # n not a multiple of the block, one block, less
        x = torch.randn(b, h, n, dtype=torch.float64, requires_grad=True)
        params = (torch.randn(b, c, p, dtype=torch.float64) * 0.5).requires_grad_()
        grad = torch.randn(b, c, n, dtype=torch.float64)
        ref = _dynamic_head_flat(x, params, h)
        gx_ref, gp_ref = torch.autograd.grad(ref, (x, params), grad)
        xf, pf = x.detach().float().requires_grad_(), params.detach().float().requires_grad_()
        fused = apply_dynamic_head(xf.reshape(b, h, n), pf, h, chunk_voxels=64)  # env: the fused path
        gx, gp = torch.autograd.grad(fused, (xf, pf), grad.float())
        assert fused.dtype == torch.float32 and fused.shape == (b, c, n)
        torch.testing.assert_close(fused.double(), ref.detach(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gx.double(), gx_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gp.double(), gp_ref, atol=2e-4, rtol=1e-4)
        with torch.no_grad():  # prediction: no graph, same logits
            torch.testing.assert_close(apply_dynamic_head(xf.reshape(b, h, n), pf, h).double(), ref.detach(),
                                       atol=1e-4, rtol=1e-4)
    # a 3D volume through the public entry point: [B, h, *S] -> [B, C, *S]
    feats = torch.randn(2, h, 3, 5, 7)
    params = torch.randn(2, 4, p)
    out = apply_dynamic_head(feats, params, h)
    torch.testing.assert_close(out, _dynamic_head_flat(feats.reshape(2, h, -1), params, h).reshape(2, 4, 3, 5, 7),
                               atol=1e-4, rtol=1e-4)
    assert len(calls) == 7, calls
    print("fused head ok")
""")


def test_fused_head_matches_the_eager_head_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "TAK_FUSED_HEAD": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fused head ok" in proc.stdout


def test_fused_head_request_on_cpu_warns_and_keeps_the_eager_maths(monkeypatch, caplog):
    import torch

    from nnunetv2_tak.model import dynamic_head
    from nnunetv2_tak.model.network import TextPriorConfig

    monkeypatch.setenv("TAK_FUSED_HEAD", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dynamic_head, "_fused_warned", set())
    x = torch.randn(1, 8, 2, 3, 4)
    params = torch.randn(1, 3, TextPriorConfig().num_dynamic_params)
    with caplog.at_level("WARNING", logger="nnunetv2_tak.model.dynamic_head"):
        out = dynamic_head.apply_dynamic_head(x, params, 8)
    assert "TAK_FUSED_HEAD=1 is set" in caplog.text and "eager kernels" in caplog.text
    eager = dynamic_head._dynamic_head_flat(x.reshape(1, 8, -1), params, 8)
    torch.testing.assert_close(out, eager.reshape(1, 3, 2, 3, 4))
