"""torchvision RegNet: the stem, one block per trunk stage, the classifier ``fc``.

The example of a family: blocks, classifier and forward steps in one file that registers itself;
its test is ``test_regnet_family`` in tests/test_families.py.
"""

from __future__ import annotations

from torch import nn

from biotune.families import register
from biotune.families._base import BlockSpec, Op, flatten_op, module_ops
from biotune.families._torchvision import torchvision_family
from biotune.modules import param_children


def _blocks(model: nn.Module) -> BlockSpec:
    stages = [(name, [f"trunk_output.{name}"]) for name, _ in param_children(model.trunk_output)]
    return [("stem", ["stem"]), *stages, ("head", ["fc"])]


def _classifier(model: nn.Module) -> list[str]:
    return ["fc"]


def _forward_ops(model: nn.Module) -> list[Op]:
    return [
        *module_ops(model, "stem", "trunk_output", "avgpool"),
        flatten_op(),
        *module_ops(model, "fc"),
    ]


register(torchvision_family("tv-regnet", ("RegNet",), _blocks, _classifier, _forward_ops))
