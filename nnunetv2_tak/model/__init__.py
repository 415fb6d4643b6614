"""The text-prior network: nnU-Net's planned UNet with a per-class dynamic head whose parameters come from
frozen text embeddings (``network``), the head itself (``dynamic_head``) and its fused CUDA kernels
(``fused_head``)."""

from nnunetv2_tak.model.dynamic_head import apply_dynamic_head
from nnunetv2_tak.model.network import TextPriorConfig, TextPriorUNet, unwrap_network

__all__ = ["TextPriorConfig", "TextPriorUNet", "apply_dynamic_head", "unwrap_network"]
