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
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_instancenorm
from torch import nn

from nnunetv2_tak.model.dynamic_head import apply_dynamic_head, head_chunk_voxels

logger = logging.getLogger(__name__)


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
        # set where the head settings are the trainer's defaults because the plans lack their entry: loading
        # a trained model's weights into such a network is refused (its head may differ in ways weights can't show)
        self.missing_settings_entry: str | None = None
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

    def forward(self, x: torch.Tensor, return_deep_features: bool = False,
                deep_supervision_samples: int | None = None):
        """-> logits (or the deep-supervision list); with ``return_deep_features`` also the deepest
        encoder stages [B, ch_i, *S_i] (shallow to deep) used by the image branch and the contrastive term.

        ``deep_supervision_samples`` n: the lower-resolution outputs of the list hold the first n samples only
        ([n, C, *S_i]; the full-resolution output keeps all B). For a batch whose last samples are read at full
        resolution alone (the unlabeled half: the pseudo-label loss), so the dynamic head does not run where no
        loss reads it; the values of what is returned are unchanged."""
        skips = self.encoder(x)
        deep = skips[-self.num_image_stages:]
        params = self.text_prior(deep)  # [B, C, P]
        head_features = self.decoder(skips)
        h = self.config.head_channels
        chunk = head_chunk_voxels(self.config.chunk_voxels, self.num_classes, h)
        if isinstance(head_features, list | tuple):
            full, *lower = head_features
            logits = [apply_dynamic_head(full, params, h, chunk),
                      *(self._head_on_first(f, params, deep_supervision_samples, chunk) for f in lower)]
        else:
            logits = apply_dynamic_head(head_features, params, h, chunk)
        return (logits, list(deep)) if return_deep_features else logits

    def _head_on_first(self, features: torch.Tensor, params: torch.Tensor, n: int | None, chunk: int) -> torch.Tensor:
        """The head on the first ``n`` samples (None: all) of features [B, h, *S] -> [n, C, *S] (an empty batch
        for 0)."""
        if n is None:
            return apply_dynamic_head(features, params, self.config.head_channels, chunk)
        if n <= 0:
            return features.new_empty((0, self.num_classes, *features.shape[2:]))
        return apply_dynamic_head(features[:n], params[:n], self.config.head_channels, chunk)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "text_prior.text_embeddings"
        own = self.text_prior.text_embeddings
        if key in state_dict and self.missing_settings_entry is not None:
            raise RuntimeError(
                f"the plans this network was built from have no {self.missing_settings_entry!r} entry, so its "
                f"text-prior head has the trainer class's default settings, not the trained model's (the checkpoint's "
                f"text is {list(state_dict[key].shape)} classes x kinds x dim). Training writes the entry into the "
                f"plans.json of its results folder (nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/"
                f"plans.json), which nnUNetv2_predict reads: restore that file from the training's results folder, "
                f"or copy the configuration's {self.missing_settings_entry!r} entry back into it.")
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
        """Checkpoints written by nnunetv2_tak 0.1 carry contrastive heads of another form (MLPs on gathered
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
