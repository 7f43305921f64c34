"""Helpers for the torchvision families: class matching and the layouts they share."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from torch import nn

from biotune.families._base import BlockSpec, Family, Op
from biotune.modules import param_children


def torchvision_family(
    name: str,
    classes: tuple[str, ...],
    blocks: Callable[[nn.Module], BlockSpec],
    classifier: Callable[[nn.Module], list[str]],
    forward_ops: Callable[[nn.Module], list[Op] | None] | None = None,
) -> Family:
    """A family of ``torchvision.models`` classes (by name). Subclasses share their blocks; only
    torchvision's own classes their forward steps, since a subclass may change ``forward``."""

    def matches(model: nn.Module) -> bool:
        return isinstance(model, _classes(classes))

    def ops(model: nn.Module) -> list[Op] | None:
        if forward_ops is None or not type(model).__module__.startswith("torchvision.models"):
            return None
        return forward_ops(model)

    return Family(name, matches, blocks, classifier, ops)


@cache
def _classes(names: tuple[str, ...]) -> tuple[type, ...]:
    from torchvision import models as tv  # imported on first use: torchvision is slow to load

    return tuple(getattr(tv, name) for name in names)


def is_instance(model: nn.Module, *names: str) -> bool:
    """``isinstance`` against ``torchvision.models`` classes given by name."""
    return isinstance(model, _classes(names))


def stage_list_spec(model: nn.Module, attr: str) -> BlockSpec:
    """``model.<attr>[0]`` is the stem; every later entry of it is a block of its own."""
    children = param_children(getattr(model, attr))
    stages = [(f"{attr}.{name}", [f"{attr}.{name}"]) for name, _ in children[1:]]
    return [("stem", [f"{attr}.{children[0][0]}"]), *stages]


def classifier_spec(model: nn.Module, attr: str, hidden: str) -> BlockSpec:
    """The last layer with parameters in ``model.<attr>`` is the head; others are ``hidden``."""
    layers = [f"{attr}.{name}" for name, _ in param_children(getattr(model, attr))]
    if not layers:
        return [("head", [attr])]
    return ([(hidden, layers[:-1])] if layers[:-1] else []) + [("head", [layers[-1]])]


def last_layer(attr: str) -> Callable[[nn.Module], list[str]]:
    """The classifier of a model whose ``<attr>`` ends with it: the head of `classifier_spec`."""
    return lambda model: classifier_spec(model, attr, hidden="")[-1][1]
