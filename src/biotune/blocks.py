"""Model -> ordered, named blocks: the one source of truth for what a "block" is.

BioTune puts one gene on each block, so freezing, per-block learning rates, LoRA targeting and
reports must all agree on the same partition of a model's parameters. Blocks come from module
structure, never from hard-coded parameter index ranges:

* the model's family (``biotune.families``) names its blocks: timm models by their own
  ``group_matcher``, the torchvision families by a rule each, any other module automatically;
* a user ``override`` (block name -> module prefixes or regexes) replaces the family's blocks.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import nn

from biotune.errors import BioTuneError
from biotune.families import BlockSpec, family_of
from biotune.modules import covering_prefixes, has_direct_tensors, param_children, prefixes

__all__ = ["Block", "BlockPartition", "describe_blocks", "partition_blocks"]

# Block name -> qualified parameter names, in block order (input -> output).
_Groups = list[tuple[str, list[str]]]
_REGEX_CHARS = frozenset("\\^$*+?{}[]|()")


@dataclass(frozen=True)
class Block:
    """One unit of the search: its parameters share a gene, a freeze flag and a learning rate."""

    name: str
    param_names: tuple[str, ...]
    # Modules whose direct parameters/buffers lie in this block; a frozen block flips their
    # `training` flag (non-recursively) so BatchNorm statistics stay put.
    module_names: tuple[str, ...]
    num_params: int


@dataclass(frozen=True)
class BlockPartition:
    """Each parameter of a model in exactly one block; blocks run input -> output, head last."""

    blocks: tuple[Block, ...]

    def __post_init__(self) -> None:
        if not self.blocks:
            raise BioTuneError("a block partition needs at least one block")
        seen_blocks: set[str] = set()
        seen_params: set[str] = set()
        for block in self.blocks:
            if block.name in seen_blocks:
                raise BioTuneError(f"duplicate block name {block.name!r}")
            if not block.param_names:
                raise BioTuneError(f"block {block.name!r} holds no parameters")
            twice = seen_params.intersection(block.param_names)
            if twice:
                raise BioTuneError(f"parameters in two blocks: {_preview(sorted(twice))}")
            seen_blocks.add(block.name)
            seen_params.update(block.param_names)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(block.name for block in self.blocks)

    @property
    def num_params(self) -> int:
        return sum(block.num_params for block in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self.blocks)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, key: str | int) -> Block:
        if isinstance(key, int):
            return self.blocks[key]
        try:
            return self._by_name[key]
        except KeyError:
            raise BioTuneError(
                f"unknown block {key!r}; blocks are: {', '.join(self.names)}"
            ) from None

    @cached_property
    def _by_name(self) -> dict[str, Block]:
        return {block.name: block for block in self.blocks}

    @cached_property
    def _block_of_param(self) -> dict[str, str]:
        return {p: block.name for block in self.blocks for p in block.param_names}

    def block_of(self, param_name: str) -> str:
        """The block a parameter belongs to, by its name in ``model.named_parameters()``."""
        try:
            return self._block_of_param[param_name]
        except KeyError:
            raise BioTuneError(f"parameter {param_name!r} is in no block") from None

    def parameters(self, model: nn.Module, name: str) -> list[nn.Parameter]:
        """The block's parameter tensors in ``model`` (the model this partition was made from)."""
        params = dict(model.named_parameters())
        missing = [p for p in self[name].param_names if p not in params]
        if missing:
            raise BioTuneError(
                f"block {name!r} does not match this model: no parameter {_preview(missing)}"
            )
        return [params[p] for p in self[name].param_names]

    def modules(self, model: nn.Module, name: str) -> list[nn.Module]:
        """Modules whose direct tensors are in the block (set ``training`` on them one by one)."""
        try:
            return [model.get_submodule(m) for m in self[name].module_names]
        except AttributeError as err:
            raise BioTuneError(f"block {name!r} does not match this model: {err}") from None

    def summary(self) -> list[tuple[str, int, float]]:
        """(name, parameter count, share of all parameters) per block, for reports and the CLI."""
        total = self.num_params
        return [(b.name, b.num_params, b.num_params / total if total else 0.0) for b in self]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, stored in a run's config so a resumed run uses the same blocks."""
        return {
            "blocks": [
                {
                    "name": b.name,
                    "num_params": b.num_params,
                    "param_names": list(b.param_names),
                    "module_names": list(b.module_names),
                }
                for b in self.blocks
            ]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockPartition:
        try:
            return cls(
                tuple(
                    Block(
                        name=str(b["name"]),
                        param_names=tuple(b["param_names"]),
                        module_names=tuple(b.get("module_names", ())),
                        num_params=int(b["num_params"]),
                    )
                    for b in data["blocks"]
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BioTuneError(f"not a stored block partition: {err!r}") from None


def partition_blocks(
    model: nn.Module, override: Mapping[str, Sequence[str]] | None = None
) -> BlockPartition:
    """Split ``model`` into ordered blocks, by ``override`` if given, else by the model's family.

    ``override`` maps block name -> patterns, in block order. A pattern is a module prefix
    (``"layer1"`` takes ``layer1.*``) or, if it has regex characters, a regex that must fully
    match a parameter name or one of its module prefixes (``r"blocks\\.[0-2]"``). Every parameter
    must match exactly one block.
    """
    if not any(True for _ in model.parameters()):
        raise BioTuneError(f"{type(model).__name__} has no parameters to partition")
    if override is not None:
        groups = _groups_from_override(model, override)
    else:
        prefix, core = _unwrap(model)
        spec = family_of(core).blocks(core)
        groups = [
            (name, [prefix + p for p in params])
            for name, params in _groups_from_prefixes(core, spec)
        ]
    return _build_partition(model, groups)


def describe_blocks(partition: BlockPartition) -> str:
    """A plain-text table of the blocks, for ``biotune blocks MODEL``."""
    all_params = [p for block in partition for p in block.param_names]
    rows = [("#", "block", "params", "share", "contents")]
    for i, (name, count, share) in enumerate(partition.summary()):
        covered = covering_prefixes(partition[name].param_names, all_params)
        more = f", ... (+{len(covered) - 3})" if len(covered) > 3 else ""
        contents = ", ".join(covered[:3]) + more
        rows.append((str(i), name, f"{count:,}", f"{share:.1%}", contents))
    rows.append(("", "total", f"{partition.num_params:,}", "100.0%", f"{len(partition)} blocks"))
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    right = {0, 2, 3}
    lines = []
    for row in rows:
        cells = [
            row[c].rjust(widths[c]) if c in right else row[c].ljust(widths[c]) for c in range(4)
        ]
        lines.append("  ".join(cells + [row[4]]).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- building the result


def _build_partition(model: nn.Module, groups: _Groups) -> BlockPartition:
    """Turn ordered (name, parameter names) groups into Blocks, with their modules and sizes."""
    params = dict(model.named_parameters())
    owner = {p: name for name, names in groups for p in names}
    module_owner = _module_owners(model, {id(params[p]): b for p, b in owner.items()})
    modules_of: dict[str, list[str]] = defaultdict(list)
    for module_name, block in module_owner.items():
        modules_of[block].append(module_name)
    return BlockPartition(
        tuple(
            Block(
                name=name,
                param_names=tuple(names),
                module_names=tuple(modules_of[name]),
                num_params=sum(params[p].numel() for p in names),
            )
            for name, names in groups
        )
    )


def _module_owners(model: nn.Module, block_of_param: dict[int, str]) -> dict[str, str]:
    """Module name -> block, for every non-root module holding direct parameters or buffers.

    A module goes with its first direct parameter. A module with buffers only (BatchNorm without
    affine) goes with its enclosing module when that lies in one block, else with the layer before
    it (the one it normalises), else the one after it.
    """
    order: list[tuple[str, str | None]] = []
    for name, module in model.named_modules():
        if not name:
            continue  # the root's `training` flag governs the whole model: never flip it
        direct = [id(p) for p in module.parameters(recurse=False)]
        if direct:
            order.append((name, block_of_param[direct[0]]))
        elif next(module.buffers(recurse=False), None) is not None:
            order.append((name, None))

    blocks_under: dict[str, set[str]] = defaultdict(set)
    for pname, param in model.named_parameters():
        for prefix in prefixes(pname)[:-1]:
            blocks_under[prefix].add(block_of_param[id(param)])

    owners: dict[str, str] = {}
    pending: list[str] = []
    previous: str | None = None
    for name, block in order:
        if block is None:
            block = _enclosing_block(name, blocks_under) or previous
        if block is None:
            pending.append(name)
            continue
        for waiting in pending:
            owners[waiting] = block
        pending.clear()
        owners[name] = previous = block
    if pending:  # buffers but no parameters anywhere before or after: cannot happen with params
        raise BioTuneError(f"modules with no block: {_preview(pending)}")
    return owners


def _enclosing_block(module_name: str, blocks_under: dict[str, set[str]]) -> str | None:
    for prefix in reversed(prefixes(module_name)):
        blocks = blocks_under.get(prefix)
        if blocks:
            return next(iter(blocks)) if len(blocks) == 1 else None
    return None


# --------------------------------------------------------------------------------------- override


def _groups_from_override(model: nn.Module, override: Mapping[str, Sequence[str]]) -> _Groups:
    if not override:
        raise BioTuneError("block override is empty: give at least one block name -> patterns")
    matchers = {
        name: [_pattern_matcher(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]
        for name, patterns in override.items()
    }
    groups: dict[str, list[str]] = {name: [] for name in matchers}
    unmatched: list[str] = []
    doubled: list[str] = []
    for pname, _ in model.named_parameters():
        paths = prefixes(pname)
        hits = [b for b, ms in matchers.items() if any(m(p) for m in ms for p in paths)]
        if not hits:
            unmatched.append(pname)
        elif len(hits) > 1:
            doubled.append(f"{pname} ({' & '.join(hits)})")
        else:
            groups[hits[0]].append(pname)
    if unmatched:
        raise BioTuneError(f"block override matches no block for {_preview(unmatched)}")
    if doubled:
        raise BioTuneError(f"block override matches more than one block for {_preview(doubled)}")
    empty = [name for name, params in groups.items() if not params]
    if empty:
        raise BioTuneError(f"block override: no parameter matches block(s) {', '.join(empty)}")
    return list(groups.items())


def _pattern_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate on a parameter name or module prefix: exact name, or full regex match."""
    if not isinstance(pattern, str) or not pattern:
        raise BioTuneError(f"block override patterns must be non-empty strings, got {pattern!r}")
    if _REGEX_CHARS.isdisjoint(pattern):
        return lambda name: name == pattern
    try:
        return re.compile(pattern).fullmatch  # type: ignore[return-value]
    except re.error as err:
        raise BioTuneError(f"block override pattern {pattern!r} is no valid regex: {err}") from None


# ------------------------------------------------------------------------------ the family's blocks


def _unwrap(model: nn.Module) -> tuple[str, nn.Module]:
    """Descend through wrappers (PEFT, a lone Sequential) that only hold one child with params."""
    prefix, module = "", model
    while not has_direct_tensors(module):
        children = param_children(module)
        if len(children) != 1:
            break
        name, module = children[0]
        prefix = f"{prefix}{name}."
    return prefix, module


def _groups_from_prefixes(model: nn.Module, spec: BlockSpec) -> _Groups:
    """Resolve (block, module paths or parameter names) to parameters: the longest match wins.

    A parameter no prefix claims (a tensor held by the root, such as a class token) joins the
    block of the next claimed parameter, else the previous one, but never the head.
    """
    spec = _unique_names(spec)  # two blocks of one name would silently merge
    block_of_prefix = {path: name for name, paths in spec for path in paths}
    names = [n for n, _ in model.named_parameters()]
    owner: list[str | None] = []
    for pname in names:
        hits = [p for p in reversed(prefixes(pname)) if p in block_of_prefix]
        owner.append(block_of_prefix[hits[0]] if hits else None)
    body = [b if b != "head" else None for b in owner]
    for i, block in enumerate(owner):
        if block is None:
            following = next((b for b in body[i + 1 :] if b), None)
            owner[i] = following or next((b for b in reversed(body[:i]) if b), None) or "head"
    groups: dict[str, list[str]] = {name: [] for name, _ in spec}
    for pname, block in zip(names, owner, strict=True):
        groups.setdefault(block, []).append(pname)
    return [(name, params) for name, params in groups.items() if params]


# --------------------------------------------------------------------------------------- helpers


def _unique_names(groups: _Groups) -> _Groups:
    """Number repeated block names (``name#2``, ...); the last one keeps the plain name, so the
    head stays "head" after any body block that happens to share its name."""
    total: dict[str, int] = defaultdict(int)
    for name, _ in groups:
        total[name] += 1
    seen: dict[str, int] = defaultdict(int)
    unique: _Groups = []
    for name, params in groups:
        seen[name] += 1
        last = seen[name] == total[name]
        unique.append((name if last else f"{name}#{seen[name]}", params))
    return unique


def _preview(items: Sequence[str], limit: int = 3) -> str:
    """A one-line list: the first few items and how many there are."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
