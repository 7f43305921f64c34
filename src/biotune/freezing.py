"""Applying a plan to a model: freeze and unfreeze its blocks, hold frozen blocks in eval mode,
and give one optimizer param group per trained block (plain groups any ``torch.optim``
optimizer takes). The plan itself, and the genome coding, are ``biotune.core.plan``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from biotune.blocks import BlockPartition
from biotune.core.plan import FineTunePlan


def frozen_modules(model: nn.Module, partition: BlockPartition, plan: FineTunePlan) -> list[str]:
    """Names of the modules that must run in eval mode: everything inside frozen blocks.

    Besides the modules that hold a frozen block's parameters and buffers (BatchNorm), this takes
    parameter-free modules (dropout, drop-path) whose parent lies wholly in frozen blocks, so that a
    frozen block is a deterministic function of its input.
    """
    frozen_blocks = {b.name for b in plan.blocks if not b.train}
    owner: dict[str, str] = {}
    for block in partition:
        for m in block.module_names:
            owner[m] = block.name
    names = [m for m, b in owner.items() if b in frozen_blocks]
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if name in owner or not name:
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        blocks = {
            b for m, b in owner.items() if parent == "" or m == parent or m.startswith(parent + ".")
        }
        if parent and blocks and blocks <= frozen_blocks and len(blocks) == 1:
            names.append(name)
    return sorted(names)


def user_frozen(model: nn.Module) -> frozenset[int]:
    """Ids of the parameters the user froze (``requires_grad=False``) before any plan touched the
    model: a fixed positional embedding or scale stays frozen whatever a plan says, and counts as
    frozen. Noted on the model at the first ``apply_plan`` (copies of the model keep the note).
    """
    noted = getattr(model, "_biotune_user_frozen", None)
    if noted is None:
        noted = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
        model._biotune_user_frozen = noted  # type: ignore[attr-defined]
    params = dict(model.named_parameters())
    return frozenset(id(params[n]) for n in noted if n in params)


def _force_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def apply_plan(
    model: nn.Module,
    partition: BlockPartition,
    plan: FineTunePlan,
    base_lr: float,
    *,
    frozen_eval: bool = True,
) -> list[dict[str, Any]]:
    """Freeze and unfreeze blocks, and return one optimizer param group per trained block.

    Each group is ``{"params", "lr": base_lr * lr_mult, "name": block}``. With ``frozen_eval``
    (the default), modules of frozen blocks are held in eval mode whatever ``model.train()``
    later says, so frozen BatchNorm statistics stay untouched (the authors' code let them drift;
    ``frozen_eval=False`` gives that behaviour back). Applying another plan undoes this one.
    """
    plan.check_fits(partition)
    for handle in getattr(model, "_biotune_eval_hooks", []):
        handle.remove()
    held = user_frozen(model)
    groups: list[dict[str, Any]] = []
    for setting in plan.blocks:
        params = [p for p in partition.parameters(model, setting.name) if id(p) not in held]
        for p in params:
            p.requires_grad_(setting.train)
        if setting.train and params:
            groups.append({"params": params, "lr": base_lr * setting.lr_mult, "name": setting.name})
    handles = []
    if frozen_eval:
        modules = dict(model.named_modules())
        for name in frozen_modules(model, partition, plan):
            modules[name].training = False
            handles.append(modules[name].register_forward_pre_hook(_force_eval))
    model._biotune_eval_hooks = handles  # type: ignore[attr-defined]
    return groups
