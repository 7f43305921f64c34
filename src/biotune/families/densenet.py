"""torchvision DenseNet: the paper's nine DenseNet-121 blocks (stem, 4 dense blocks, 3
transitions, head)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from biotune.families import register
from biotune.families._base import BlockSpec, Op, flatten_op, function_op, module_ops
from biotune.families._torchvision import torchvision_family
from biotune.modules import param_children


def _blocks(model: nn.Module) -> BlockSpec:
    spec: BlockSpec = [("stem", [])]
    for name, _ in param_children(model.features):
        path = f"features.{name}"
        if name.startswith(("denseblock", "transition")):
            spec.append((name, [path]))
        elif len(spec) == 1:
            spec[0][1].append(path)  # conv0, norm0
        else:
            spec[-1][1].append(path)  # norm5 ends the last dense block
    return [*spec, ("head", ["classifier"])]


def _forward_ops(model: nn.Module) -> list[Op]:
    pool = function_op(lambda x: F.adaptive_avg_pool2d(F.relu(x), (1, 1)))
    return [*module_ops(model, "features"), pool, flatten_op(), *module_ops(model, "classifier")]


register(
    torchvision_family(
        "tv-densenet", ("DenseNet",), _blocks, lambda m: ["classifier"], _forward_ops
    )
)
