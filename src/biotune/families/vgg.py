"""torchvision VGG and AlexNet: one block per conv stage (split at each max-pool), the hidden
fully connected layers, the head."""

from __future__ import annotations

from torch import nn

from biotune.families import register
from biotune.families._base import BlockSpec, Op, flatten_op, module_ops
from biotune.families._torchvision import classifier_spec, last_layer, torchvision_family
from biotune.modules import has_params


def _blocks(model: nn.Module) -> BlockSpec:
    stages: list[list[str]] = [[]]
    for name, layer in model.features.named_children():
        if has_params(layer):
            stages[-1].append(f"features.{name}")
        if isinstance(layer, nn.MaxPool2d) and stages[-1]:
            stages.append([])
    spec = [(f"conv{i}", prefixes) for i, prefixes in enumerate(stages, 1) if prefixes]
    return spec + classifier_spec(model, "classifier", hidden="classifier")


def _forward_ops(model: nn.Module) -> list[Op]:
    steps = module_ops(model, "features", "avgpool")
    return [*steps, flatten_op(), *module_ops(model, "classifier")]


register(
    torchvision_family(
        "tv-vgg", ("VGG", "AlexNet"), _blocks, last_layer("classifier"), _forward_ops
    )
)
