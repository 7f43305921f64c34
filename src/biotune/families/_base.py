"""The `Family` record and the forward steps (`Op`) a family describes its model with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# One step of a forward pass, or one block's part of it.
Stage = Callable[[torch.Tensor], torch.Tensor]
# Ordered (block name, module paths or parameter names), input -> output, "head" last.
BlockSpec = list[tuple[str, list[str]]]

SCOPES = ("architecture", "library", "any")


@dataclass(frozen=True)
class Op:
    """One step of a model's forward: a submodule (by path) or a parameter-free function.

    ``attach`` says where a parameter-free step goes: "prev" (pooling, activations: with the block
    before it, so a cached prefix includes it) or "next" (dropout: it must run while training).
    """

    path: str | None
    fn: Stage
    attach: str = "prev"


def _no_forward_ops(model: nn.Module) -> list[Op] | None:
    return None


@dataclass(frozen=True)
class Family:
    """All BioTune knows about one model family, so blocks, caching and heads cannot disagree.

    * ``matches(model)``: whether this family describes a bare model (wrappers removed);
    * ``blocks(model)``: its blocks, resolved to parameters by ``blocks.partition_blocks`` (the
      longest path wins; tensors on the root join the next block);
    * ``classifier(model)``: the module path(s) of the classifier, which the "head" block holds
      and ``models.reset_head`` replaces;
    * ``forward_ops(model)``: ``model.forward`` as a flat list of steps for the feature cache, or
      None when the forward is no plain chain (caching is then off);
    * ``scope``: "architecture" (some model classes), "library" (every timm model) or "any"
      (the automatic fallback); narrower scopes are asked first, and families of one scope must
      not claim the same model.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    blocks: Callable[[nn.Module], BlockSpec]
    classifier: Callable[[nn.Module], list[str]]
    forward_ops: Callable[[nn.Module], list[Op] | None] = _no_forward_ops
    scope: str = "architecture"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"family {self.name!r}: scope must be one of {SCOPES}")


def module_op(model: nn.Module, path: str) -> Op:
    """The submodule at ``path`` as a step; dropout layers attach to the block after them."""
    module = model.get_submodule(path)
    dropout = isinstance(module, nn.modules.dropout._DropoutNd)
    return Op(path, module, "next" if dropout else "prev")


def module_ops(model: nn.Module, *paths: str) -> list[Op]:
    return [module_op(model, path) for path in paths]


def function_op(fn: Stage) -> Op:
    """A parameter-free step (pooling, flattening) that runs with the block before it."""
    return Op(None, fn)


def flatten_op() -> Op:
    return function_op(lambda x: torch.flatten(x, 1))


def dropout_op(model: nn.Module) -> Op:
    """timm's functional dropout before the classifier, at ``model.drop_rate``."""
    p = float(getattr(model, "drop_rate", 0.0) or 0.0)
    return Op(None, lambda x: F.dropout(x, p=p, training=model.training), "next")


def join_names(paths: Sequence[str]) -> str:
    """A block name for consecutive module paths: ``a+b`` or ``first..last``."""
    if len(paths) <= 2:
        return "+".join(paths)
    return f"{paths[0]}..{paths[-1]}"
