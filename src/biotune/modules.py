"""Small helpers over a module tree (paths, prefixes, children that hold parameters).

Shared by the block partition, the model families and the feature cache, so that none of them
has to import another for these.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = [
    "covering_prefixes",
    "has_direct_tensors",
    "has_params",
    "numel",
    "param_children",
    "prefixes",
    "under",
]


def param_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The direct children that hold parameters, as (name, child)."""
    return [(name, child) for name, child in module.named_children() if has_params(child)]


def has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def has_direct_tensors(module: nn.Module) -> bool:
    return (
        next(module.parameters(recurse=False), None) is not None
        or next(module.buffers(recurse=False), None) is not None
    )


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``: the module paths above a name, and the name."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def under(names: Sequence[str], paths: Sequence[str]) -> list[str]:
    """Names equal to one of ``paths`` or inside one of those modules."""
    wanted = set(paths)
    return [n for n in names if any(p in wanted for p in prefixes(n))]


def covering_prefixes(
    group: Sequence[str], all_names: Sequence[str], members: Sequence[str] | None = None
) -> list[str]:
    """The shortest module paths above each name of ``group`` that hold no parameter outside
    ``members`` (default: the group itself)."""
    in_group = set(group if members is None else members)
    outside: set[str] = {p for n in all_names if n not in in_group for p in prefixes(n)}
    covering: list[str] = []
    for name in group:
        shortest = next(p for p in prefixes(name) if p not in outside)
        if shortest not in covering:
            covering.append(shortest)
    return covering
