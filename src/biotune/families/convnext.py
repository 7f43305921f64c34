"""torchvision ConvNeXt: stem, each stage and each downsampling layer, the pre-head norm (neck),
the classifier."""

from __future__ import annotations

from torch import nn

from biotune.families import register
from biotune.families._base import BlockSpec, Op, module_ops
from biotune.families._torchvision import (
    classifier_spec,
    last_layer,
    stage_list_spec,
    torchvision_family,
)


def _blocks(model: nn.Module) -> BlockSpec:
    return stage_list_spec(model, "features") + classifier_spec(model, "classifier", hidden="neck")


def _forward_ops(model: nn.Module) -> list[Op]:
    return module_ops(model, "features", "avgpool", "classifier")


register(
    torchvision_family(
        "tv-convnext", ("ConvNeXt",), _blocks, last_layer("classifier"), _forward_ops
    )
)
