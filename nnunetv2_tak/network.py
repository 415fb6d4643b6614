"""Text-prior segmentation network: any nnU-Net UNet whose 1x1 segmentation layers are replaced by
a per-class dynamic head whose parameters come from frozen text embeddings and the image.

Shapes: B batch, C classes (background included), K prompt kinds, D text embedding dim,
S spatial dims (2 or 3), P dynamic-head parameters per class.

The backbone is whatever nnU-Net planned (PlainConvUNet, ResidualEncoderUNet, 2D or 3D): we keep
its encoder and decoder and swap each ``decoder.seg_layers[i]`` for a small projection to
``head_channels`` feature maps, so the stock decoder forward (and nnU-Net's deep-supervision
switch ``decoder.deep_supervision``) is reused unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_instancenorm
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

MAX_HEAD_CHUNKS = 32  # at most this many voxel chunks per output under torch.compile: bounded graph size
HEAD_CHUNK_ELEMENTS = 2**22  # at most this many hidden values per sample in one head chunk (see head_chunk_voxels)
MIN_CHUNK_VOXELS = 512  # floor of the class-adapted chunk (per-chunk overhead)
FUSED_HEAD_ENV = "TAK_FUSED_HEAD"  # "1": CUDA tensors go through nnunetv2_tak.fused_head (Triton)
EAGER_CHUNKED_FUNCTION = True  # False: eager mode also runs the checkpointed chunks (benchmark baseline)
TEXT_CENTERING = ("none", "center", "center_scale")


@dataclass(frozen=True)
class TextPriorConfig:
    """Geometry of the text-prior head. ``num_kinds``/``embed_dim`` must match the text embeddings."""

    num_kinds: int = 2
    embed_dim: int = 512
    hidden_dim: int = 256
    head_channels: int = 8
    num_image_stages: int = 3
    head_input_norm: bool = False  # nnU-Net decoder stages already end in norm + nonlinearity
    chunk_voxels: int = 4096  # chunked, memory-lean head (lowered for > 128 classes: head_chunk_voxels); 0 = off
    stable_controller: bool = True  # LayerNorm on the controller input + He-scaled dynamic parameters
    learned_embeddings: bool = False  # no-text ablation: E [C, K, D] is a trained parameter, not frozen text
    # "none" | "center" | "center_scale": subtract the mean over classes of each prompt kind before the
    # text MLP (and rescale to the original mean norm); see TextPriorHead.prepared_text_embeddings
    text_centering: str = "none"

    def __post_init__(self) -> None:
        if self.text_centering not in TEXT_CENTERING:
            raise ValueError(f"TextPriorConfig.text_centering must be one of {', '.join(TEXT_CENTERING)}, "
                             f"not {self.text_centering!r} (trainer attribute text_prior or the plans' "
                             "'tak_text_prior' entry)")

    def to_dict(self) -> dict[str, int | bool | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, int | bool | str]) -> TextPriorConfig:
        """Keys missing in older plans take their defaults; an unknown key (plans written by a newer
        nnunetv2_tak) is an error: ignoring it would build another network than the one trained."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"the plans' text-prior head settings have keys this nnunetv2_tak does not know "
                             f"({', '.join(unknown)}): they were written by a newer version. Upgrade nnunetv2_tak "
                             "(pip install -U nnunetv2-tak) to use this model.")
        return cls(**values)

    @property
    def num_dynamic_params(self) -> int:
        """P: weights and biases of the 3-layer per-class head (h->h->h->1)."""
        h = self.head_channels
        return (h * h + h) * 2 + (h + 1)


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


class _ChunkedDynamicHead(torch.autograd.Function):
    """Eager-mode chunked head with a hand-written backward: the same maths and the same matmuls as
    autograd through ``_dynamic_head_flat`` chunk by chunk, but the forward runs without a graph (bias and
    ReLU in place, logits written into one preallocated [B, C, n] tensor instead of a concatenation), and
    the backward recomputes one chunk's hidden maps at a time and turns them into gradients in place
    (ReLU masks applied with masked_fill_, gradients of the dynamic parameters accumulated over chunks).
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
                g2 = torch.bmm(w3.transpose(1, 2), gy).masked_fill_(a2 <= 0, 0)  # [B*C, h, m], ReLU 2
                if grads is not None:
                    grads[5] += gy.sum(dim=2, keepdim=True)
                    grads[4] += torch.bmm(gy, a2.transpose(1, 2))
                    grads[3] += g2.sum(dim=2, keepdim=True)
                    grads[2] += torch.bmm(g2, a1v.transpose(1, 2))
                g1 = torch.bmm(w2.transpose(1, 2), g2).masked_fill_(a1v <= 0, 0).view(b, c * h, -1)  # ReLU 1
                del a1, a1v, a2, g2
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
        from nnunetv2_tak.fused_head import apply_fused_head, fused_head_available

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


def fused_head_requested() -> bool:
    """``TAK_FUSED_HEAD=1``: the head runs as fused Triton kernels on CUDA (nnunetv2_tak.fused_head)."""
    return os.environ.get(FUSED_HEAD_ENV, "0") not in ("", "0")


_fused_warned: set[str] = set()


def _warn_fused_unavailable(x: torch.Tensor) -> None:
    if x.device.type not in _fused_warned:
        _fused_warned.add(x.device.type)
        logger.warning("%s=1 is set, but the fused head kernels need Triton and a CUDA tensor; the head on %s "
                       "runs the eager kernels (same maths).", FUSED_HEAD_ENV, x.device)


def _dynamic_param_scale(config: TextPriorConfig, bias_scale: float = 0.1) -> torch.Tensor:
    """[P] multipliers of the controller output: He std for weights (sqrt(2 / fan_in), sqrt(1 / fan_in)
    for the last, linear layer) and a small scale for biases; all ones without ``stable_controller``."""
    h = config.head_channels
    if not config.stable_controller:
        return torch.ones(config.num_dynamic_params)
    he, last = (2.0 / h) ** 0.5, (1.0 / h) ** 0.5
    sizes = [(h * h, he), (h, bias_scale), (h * h, he), (h, bias_scale), (h, last), (1, bias_scale)]
    return torch.cat([torch.full((n, ), v) for n, v in sizes])


class TextPriorHead(nn.Module):
    """Turns frozen text embeddings E [C, K, D] and multi-scale encoder features into per-class
    dynamic-head parameters [B, C, P]."""

    def __init__(self, num_classes: int, stage_channels: list[int], config: TextPriorConfig):
        super().__init__()
        self.config = config
        hid = config.hidden_dim
        shape = (num_classes, config.num_kinds, config.embed_dim)
        if config.learned_embeddings:  # same state-dict key either way, so checkpoints and the predictor agree
            self.text_embeddings = nn.Parameter(torch.randn(shape) * config.embed_dim ** -0.5)
        else:
            self.register_buffer("text_embeddings", torch.zeros(shape))
        self.kind_mlp = nn.Sequential(nn.Linear(config.embed_dim, hid), nn.ReLU(inplace=True))
        self.text_fuse = nn.Sequential(nn.Linear(config.num_kinds * hid, hid), nn.ReLU(inplace=True))
        self.image_pool = nn.ModuleList(
            nn.ModuleDict({
                "norm": nn.GroupNorm(math.gcd(16, ch), ch),
                "proj": nn.Linear(ch, hid),
            })
            for ch in stage_channels
        )
        self.controller = nn.Linear(2 * hid, config.num_dynamic_params)
        self.joint_norm: nn.Module = nn.Identity()
        if config.stable_controller:
            # Under nnU-Net's SGD (lr 1e-2, momentum 0.99) an unnormalised controller lets the generated
            # weights and biases grow until the dynamic head's ReLUs die. Normalising its input and emitting
            # unit-variance values that a fixed per-parameter scale maps to He-initialised layers keeps the
            # head trainable.
            self.joint_norm = nn.LayerNorm(2 * hid)
            nn.init.normal_(self.controller.weight, std=(2 * hid) ** -0.5)
            nn.init.zeros_(self.controller.bias)
        self.register_buffer("param_scale", _dynamic_param_scale(config), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.text_embeddings.shape[0]

    def prepared_text_embeddings(self) -> torch.Tensor:
        """The embeddings the head (and the contrastive term) see: E [C, K, D], centred per prompt kind
        when ``config.text_centering`` asks for it.

        CLIP-style text embeddings of different classes share a large common component (mean pairwise
        cosine ~0.7-0.8 on the AMOS prompts). "center" subtracts the mean over classes of each kind, which
        keeps every pairwise difference E_a - E_b; "center_scale" then rescales each kind so that its mean
        norm over classes is the original one. Computed from E on every call, so the checkpoint holds only
        E and the setting (plans), and a learned E is centred the same way."""
        e = self.text_embeddings
        mode = self.config.text_centering
        if mode == "none":
            return e
        centred = e - e.mean(dim=0, keepdim=True)  # [C, K, D]
        if mode == "center_scale":
            original = e.norm(dim=-1).mean(dim=0)  # [K]
            current = centred.norm(dim=-1).mean(dim=0).clamp_min(torch.finfo(e.dtype).eps)
            centred = centred * (original / current)[None, :, None]
        return centred

    def text_features(self) -> torch.Tensor:
        """E [C, K, D] (prepared) -> per-class text feature [C, hidden]."""
        per_kind = self.kind_mlp(self.prepared_text_embeddings())  # [C, K, hidden]
        return self.text_fuse(per_kind.flatten(1))

    def image_features(self, deep_skips: list[torch.Tensor]) -> torch.Tensor:
        """Deepest encoder stages [B, ch_i, *S_i] -> pooled image feature [B, hidden] (mean over stages)."""
        pooled = [
            pool["proj"](torch.relu(pool["norm"](skip)).flatten(2).mean(dim=2))
            for pool, skip in zip(self.image_pool, deep_skips, strict=True)
        ]
        return torch.stack(pooled, dim=0).mean(dim=0)

    def forward(self, deep_skips: list[torch.Tensor]) -> torch.Tensor:
        """-> dynamic parameters [B, C, P]."""
        image = self.image_features(deep_skips)  # [B, hidden]
        text = self.text_features().to(image.dtype)  # [C, hidden]
        b, c = image.shape[0], text.shape[0]
        joint = torch.cat([image[:, None, :].expand(b, c, -1), text[None].expand(b, c, -1)], dim=2)
        return self.controller(self.joint_norm(joint)) * self.param_scale.to(joint.dtype)


class ContrastiveHeads(nn.Module):
    """Projection heads of the text-visual contrastive term, one per deep encoder stage (the reference
    code's): voxels 1x1 conv -> InstanceNorm -> ReLU -> 1x1 conv on the whole feature map [B, ch, *S]
    (the norm needs the map; anchors are gathered afterwards), prompt embeddings Linear(D -> ch) + ReLU.
    The reference reuses the controller's 256-wide text MLP at its deepest stage; nnU-Net's stages are
    up to 320 wide, so every stage has its own text head here."""

    def __init__(self, conv_op: type[nn.Module], stage_channels: list[int], embed_dim: int):
        super().__init__()
        norm_op = get_matching_instancenorm(conv_op)
        self.voxel = nn.ModuleList(
            nn.Sequential(conv_op(ch, ch, 1), norm_op(ch), nn.ReLU(inplace=True), conv_op(ch, ch, 1))
            for ch in stage_channels)
        self.text = nn.ModuleList(nn.Sequential(nn.Linear(embed_dim, ch), nn.ReLU(inplace=True))
                                  for ch in stage_channels)


def _head_input(encoder: nn.Module, channels: int, head_channels: int, with_norm: bool) -> nn.Sequential:
    """Decoder features [B, channels, *S] -> [B, head_channels, *S]: (norm, nonlinearity,) 1x1 conv."""
    layers: list[nn.Module] = []
    if with_norm and encoder.norm_op is not None:
        layers.append(encoder.norm_op(channels, **(encoder.norm_op_kwargs or {})))
    if with_norm and encoder.nonlin is not None:
        layers.append(encoder.nonlin(**(encoder.nonlin_kwargs or {})))
    layers.append(encoder.conv_op(channels, head_channels, 1, 1, 0, bias=True))
    return nn.Sequential(*layers)


class TextPriorUNet(nn.Module):
    """nnU-Net UNet with the text-prior head on every (deep-supervision) output.

    forward(x [B, in, *S]) -> logits [B, C, *S], or a list of them (largest first) when
    ``decoder.deep_supervision`` is on, exactly like the wrapped nnU-Net network.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, config: TextPriorConfig | None = None):
        super().__init__()
        config = config or TextPriorConfig()
        self.config = config
        self.encoder = backbone.encoder
        self.decoder = backbone.decoder
        channels = list(self.encoder.output_channels)
        n_decoder_stages = len(self.decoder.seg_layers)
        # seg_layers[s] sits after decoder stage s whose width is the skip width channels[-(s + 2)];
        # we always build every one so deep-supervision checkpoints load without it too.
        self.decoder.seg_layers = nn.ModuleList(
            _head_input(self.encoder, channels[-(s + 2)], config.head_channels, config.head_input_norm)
            for s in range(n_decoder_stages)
        )
        self.num_image_stages = min(config.num_image_stages, len(channels))
        self.text_prior = TextPriorHead(num_classes, channels[-self.num_image_stages:], config)
        # built always (also when a variant does not train it) so every checkpoint has the same keys
        self.contrast = ContrastiveHeads(self.encoder.conv_op, channels[-self.num_image_stages:], config.embed_dim)

    @property
    def num_classes(self) -> int:
        return self.text_prior.num_classes

    def set_text_embeddings(self, embeddings: torch.Tensor) -> None:
        """Copy frozen text embeddings [C, K, D] into the network state."""
        expected = tuple(self.text_prior.text_embeddings.shape)
        if tuple(embeddings.shape) != expected:
            raise ValueError(
                f"text embeddings have shape {list(embeddings.shape)} but this network was built for "
                f"{list(expected)} (classes, prompt kinds, embedding dim)"
            )
        if self.config.learned_embeddings:
            raise ValueError("this network learns its class embeddings (TextPriorConfig.learned_embeddings); "
                             "it takes no text embeddings")
        with torch.no_grad():
            self.text_prior.text_embeddings.copy_(embeddings)

    def forward(self, x: torch.Tensor, return_deep_features: bool = False):
        """-> logits (or the deep-supervision list); with ``return_deep_features`` also the deepest
        encoder stages [B, ch_i, *S_i] (shallow to deep) used by the image branch and the contrastive term."""
        skips = self.encoder(x)
        deep = skips[-self.num_image_stages:]
        params = self.text_prior(deep)  # [B, C, P]
        head_features = self.decoder(skips)
        h = self.config.head_channels
        chunk = head_chunk_voxels(self.config.chunk_voxels, self.num_classes, h)
        if isinstance(head_features, list | tuple):
            logits = [apply_dynamic_head(f, params, h, chunk) for f in head_features]
        else:
            logits = apply_dynamic_head(head_features, params, h, chunk)
        return (logits, list(deep)) if return_deep_features else logits

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "text_prior.text_embeddings"
        own = self.text_prior.text_embeddings
        if key in state_dict and tuple(state_dict[key].shape) != tuple(own.shape):
            raise RuntimeError(
                f"the checkpoint's text embeddings have shape {list(state_dict[key].shape)} (classes, kinds, "
                f"dim) but the network was built for {list(own.shape)} from the plans' 'tak_text_prior' entry "
                f"{self.config.to_dict()}. Use the plans.json saved in the model's results folder."
            )
        self._replace_foreign_contrast_heads(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _replace_foreign_contrast_heads(self, state_dict, prefix: str) -> None:
        """Checkpoints of nnunetv2_tak 0.1 carry contrastive heads of another form (MLPs on gathered
        voxels). They are training-only, so such a checkpoint still predicts: its heads are replaced by
        this network's (freshly initialised) ones, with a warning. Resuming training from it is refused
        by the trainer's settings check."""
        own = {f"{prefix}contrast.{k}": v for k, v in self.contrast.state_dict().items()}
        theirs = [k for k in state_dict if k.startswith(f"{prefix}contrast.")]
        if not theirs or (set(theirs) == set(own)
                          and all(state_dict[k].shape == v.shape for k, v in own.items())):
            return
        for key in theirs:
            del state_dict[key]
        state_dict.update({k: v.detach().clone() for k, v in own.items()})
        logger.warning("the checkpoint's contrastive projection heads are of an older form (nnunetv2_tak 0.1); "
                       "they are used in training only and were re-initialised. Prediction is unaffected.")


def unwrap_network(network: nn.Module) -> nn.Module:
    """Strip DDP and torch.compile wrappers."""
    if hasattr(network, "module") and isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)
