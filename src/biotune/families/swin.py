"""torchvision Swin: patch embedding, each stage and each patch-merging layer, the final norm
(neck), the head. Its forward permutes between steps: no forward chain, so no caching."""

from __future__ import annotations

from torch import nn

from biotune.families import register
from biotune.families._base import BlockSpec
from biotune.families._torchvision import stage_list_spec, torchvision_family


def _blocks(model: nn.Module) -> BlockSpec:
    return [*stage_list_spec(model, "features"), ("neck", ["norm"]), ("head", ["head"])]


register(torchvision_family("tv-swin", ("SwinTransformer",), _blocks, lambda m: ["head"]))
