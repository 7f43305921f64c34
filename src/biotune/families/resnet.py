"""ResNet (torchvision and timm): stem, the four stages ``layer1..4``, the classifier ``fc``."""

from __future__ import annotations

from torch import nn

from biotune.families import register
from biotune.families._base import BlockSpec, Family, Op, dropout_op, flatten_op, module_ops
from biotune.families._torchvision import torchvision_family
from biotune.families.timm_generic import is_timm_class, timm_blocks, timm_classifier

_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _blocks(model: nn.Module) -> BlockSpec:
    return [("stem", ["conv1", "bn1"]), *((name, [name]) for name in _STAGES), ("head", ["fc"])]


def _forward_ops(model: nn.Module) -> list[Op]:
    steps = module_ops(model, "conv1", "bn1", "relu", "maxpool", *_STAGES, "avgpool")
    return [*steps, flatten_op(), *module_ops(model, "fc")]


def _timm_forward_ops(model: nn.Module) -> list[Op]:
    steps = module_ops(model, "conv1", "bn1", "act1", "maxpool", *_STAGES, "global_pool")
    return [*steps, dropout_op(model), *module_ops(model, "fc")]


register(torchvision_family("tv-resnet", ("ResNet",), _blocks, lambda m: ["fc"], _forward_ops))
register(
    Family(
        "timm-resnet",
        matches=lambda model: is_timm_class(model, "resnet", "ResNet"),
        blocks=timm_blocks,  # timm's own groups
        classifier=timm_classifier,
        forward_ops=_timm_forward_ops,
    )
)
