"""torchvision ViT: patch embedding + class token + position embedding, one block per encoder
layer, the final norm (neck), the head. Its forward reshapes to tokens: no forward chain."""

from __future__ import annotations

from torch import nn

from biotune.families import register
from biotune.families._base import BlockSpec
from biotune.families._torchvision import torchvision_family
from biotune.modules import param_children


def _blocks(model: nn.Module) -> BlockSpec:
    encoder_layers = param_children(model.encoder.layers)
    layers = [(name, [f"encoder.layers.{name}"]) for name, _ in encoder_layers]
    return [
        ("stem", ["class_token", "conv_proj", "encoder.pos_embedding"]),
        *layers,
        ("neck", ["encoder.ln", "heads.pre_logits"]),
        ("head", ["heads.head"]),
    ]


register(torchvision_family("tv-vit", ("VisionTransformer",), _blocks, lambda m: ["heads.head"]))
