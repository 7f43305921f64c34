"""Model -> ordered, named blocks: the one source of truth for what a "block" is.

BioTune puts one gene on each block, so freezing, per-block learning rates, LoRA targeting and
reports must all agree on the same partition of a model's parameters. Blocks come from module
structure, never from hard-coded parameter index ranges:

* timm models describe themselves (``group_matcher(coarse=True)``); we follow timm's grouping and
  only split the classifier ("head") and the layers between the last stage and it ("neck") apart;
* a small registry of rules covers the torchvision families (ResNet, DenseNet, VGG, EfficientNet,
  MobileNet, ConvNeXt, ViT, Swin, RegNet);
* any other module gets an automatic partition over its children;
* a user ``override`` (block name -> module prefixes or regexes) replaces all of the above.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any

from torch import nn

from biotune.errors import BioTuneError

__all__ = ["Block", "BlockPartition", "describe_blocks", "partition_blocks"]

# Block name -> qualified parameter names, in block order (input -> output).
_Groups = list[tuple[str, list[str]]]
# Block name -> module prefixes, resolved to parameters by `_groups_from_prefixes`.
_PrefixSpec = list[tuple[str, list[str]]]
# Consecutive (path, module) children that the automatic partition keeps together.
_Unit = list[tuple[str, nn.Module]]

_MAX_AUTO_BLOCKS = 12
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_REGEX_CHARS = frozenset("\\^$*+?{}[]|()")
_TIMM_MATCH_PREV_GROUP = (99999,)  # timm's marker for "same group as the one before"


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
        groups = [(name, [prefix + p for p in params]) for name, params in _family_groups(core)]
    return _build_partition(model, groups)


def describe_blocks(partition: BlockPartition) -> str:
    """A plain-text table of the blocks, for ``biotune blocks MODEL``."""
    all_params = [p for block in partition for p in block.param_names]
    rows = [("#", "block", "params", "share", "contents")]
    for i, (name, count, share) in enumerate(partition.summary()):
        covered = _covering_prefixes(partition[name].param_names, all_params)
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
        for prefix in _prefixes(pname)[:-1]:
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
    for prefix in reversed(_prefixes(module_name)):
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
        prefixes = _prefixes(pname)
        hits = [b for b, ms in matchers.items() if any(m(p) for m in ms for p in prefixes)]
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


# ----------------------------------------------------------------------------- family dispatching


def _family_groups(model: nn.Module) -> _Groups:
    """Blocks for a bare model (wrappers already removed), from the first rule that applies."""
    if _is_timm(model):
        groups = _timm_groups(model)
        if groups:
            return groups
    for family, rule in _torchvision_rules():
        if isinstance(model, family):
            return _groups_from_prefixes(model, rule(model))
    return _groups_from_prefixes(model, _auto_spec(model))


def _unwrap(model: nn.Module) -> tuple[str, nn.Module]:
    """Descend through wrappers (PEFT, a lone Sequential) that only hold one child with params."""
    prefix, module = "", model
    while not _has_direct_tensors(module):
        children = _param_children(module)
        if len(children) != 1:
            break
        name, module = children[0]
        prefix = f"{prefix}{name}."
    return prefix, module


def _groups_from_prefixes(model: nn.Module, spec: _PrefixSpec) -> _Groups:
    """Resolve (block, module prefixes) to parameters: the longest matching prefix wins.

    A parameter no prefix claims (a tensor held by the root, such as a class token) joins the
    block of the next claimed parameter, else the previous one, but never the head.
    """
    spec = _unique_names(spec)  # two blocks of one name would silently merge
    block_of_prefix = {prefix: name for name, prefixes in spec for prefix in prefixes}
    names = [n for n, _ in model.named_parameters()]
    owner: list[str | None] = []
    for pname in names:
        hits = [p for p in reversed(_prefixes(pname)) if p in block_of_prefix]
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


# ------------------------------------------------------------------------------------------ timm


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and callable(
        getattr(model, "group_matcher", None)
    )


def _timm_groups(model: nn.Module) -> _Groups | None:
    """timm's own coarse groups (stem, stages), with the neck and the classifier split off.

    timm folds the layers after the last stage (a final norm, EfficientNet's conv_head/bn2) into
    the last stage or the classifier; BioTune wants the classifier alone as "head" and those layers
    as their own "neck". Returns None when the model has no classifier to call the head.
    """
    from timm.models import group_parameters

    try:
        matcher = model.group_matcher(coarse=True)
    except NotImplementedError:
        return None
    names = [n for n, _ in model.named_parameters()]
    head = set(_under(names, _timm_classifier_prefixes(model)))
    if not head:
        return None
    layer_of: dict[str, int] = group_parameters(model, matcher, reverse=True)
    rule_of = {n: _timm_rule_of(matcher, n) for n in names}

    layers: dict[int, list[str]] = defaultdict(list)
    for n in names:
        if n not in head:
            layers[layer_of[n]].append(n)
    proper = [layer_of[n] for n in names if n not in head and rule_of[n] not in (None, "prev")]
    neck: list[str] = []
    if proper:
        last = max(proper)
        stage = [n for n in layers[last] if rule_of[n] not in (None, "prev")]
        kept = set(_under(layers[last], _covering_prefixes(stage, names, members=layers[last])))
        neck = [n for n in layers[last] if n not in kept]
        layers[last] = [n for n in layers[last] if n in kept]
        for lid in [lid for lid in layers if lid > last]:
            neck += layers.pop(lid)

    key_use = defaultdict(set)
    for lid, params in layers.items():
        for n in params:
            key_use[rule_of[n]].add(lid)
    groups: _Groups = []
    for lid in sorted(layers):
        params = layers[lid]
        if not params:
            continue
        keys = {rule_of[n] for n in params}
        key = next(iter(keys))
        if len(keys) == 1 and key and key != "prev" and len(key_use[key]) == 1:
            groups.append((key, params))
        else:
            groups.append((_join_names(_covering_prefixes(params, names)), params))
    if neck:
        position = {n: i for i, n in enumerate(names)}
        groups.append(("neck", sorted(neck, key=position.__getitem__)))
    groups.append(("head", [n for n in names if n in head]))
    return _unique_names(groups)


def _timm_rule_of(matcher: Any, name: str) -> str | None:
    """The matcher key that claims ``name`` the way timm reads it: first match wins.

    Returns "prev" for rules that attach to the previous group (timm's MATCH_PREV_GROUP suffix),
    None when nothing matches (timm puts those last). Callable matchers give no names: "".
    """
    if not isinstance(matcher, dict):
        return ""
    for key, spec in matcher.items():
        if spec is None:
            continue
        for pattern, suffix in spec if isinstance(spec, (list, tuple)) else [(spec, None)]:
            if re.match(pattern, name):
                return "prev" if tuple(suffix or ()) == _TIMM_MATCH_PREV_GROUP else key
    return None


def _timm_classifier_prefixes(model: nn.Module) -> list[str]:
    """Module names of the classifier: timm's config names it; ``get_classifier`` as a backup."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    named = cfg.get("classifier")
    prefixes = [named] if isinstance(named, str) else list(named or [])
    if prefixes and any(True for _ in _under([n for n, _ in model.named_parameters()], prefixes)):
        return prefixes
    try:
        classifier = model.get_classifier()
    except (AttributeError, NotImplementedError):
        return []
    wanted = {id(m) for m in (classifier if isinstance(classifier, tuple) else (classifier,))}
    return [name for name, module in model.named_modules() if id(module) in wanted and name]


# ----------------------------------------------------------------------------------- torchvision


@cache
def _torchvision_rules() -> tuple[tuple[type, Callable[[Any], _PrefixSpec]], ...]:
    """(model class, rule) pairs; a rule gives ordered (block name, module prefixes)."""
    from torchvision import models as tv

    return (
        (tv.ResNet, _resnet_rule),
        (tv.DenseNet, _densenet_rule),
        (tv.VGG, _vgg_rule),
        (tv.AlexNet, _vgg_rule),
        (tv.EfficientNet, _mobile_rule),
        (tv.MobileNetV2, _mobile_rule),
        (tv.MobileNetV3, _mobile_rule),
        (tv.ConvNeXt, _convnext_rule),
        (tv.SwinTransformer, _swin_rule),
        (tv.VisionTransformer, _vit_rule),
        (tv.RegNet, _regnet_rule),
    )


def _resnet_rule(model: nn.Module) -> _PrefixSpec:
    stages = [(name, [name]) for name in ("layer1", "layer2", "layer3", "layer4")]
    return [("stem", ["conv1", "bn1"]), *stages, ("head", ["fc"])]


def _densenet_rule(model: nn.Module) -> _PrefixSpec:
    """The paper's nine DenseNet-121 blocks: stem, 4 dense blocks, 3 transitions, head."""
    spec: _PrefixSpec = [("stem", [])]
    for name, _ in _param_children(model.features):
        path = f"features.{name}"
        if name.startswith(("denseblock", "transition")):
            spec.append((name, [path]))
        elif len(spec) == 1:
            spec[0][1].append(path)  # conv0, norm0
        else:
            spec[-1][1].append(path)  # norm5 ends the last dense block
    return [*spec, ("head", ["classifier"])]


def _vgg_rule(model: nn.Module) -> _PrefixSpec:
    """VGG/AlexNet: one block per conv stage (split at each max-pool), hidden FC layers, head."""
    stages: list[list[str]] = [[]]
    for name, layer in model.features.named_children():
        if _has_params(layer):
            stages[-1].append(f"features.{name}")
        if isinstance(layer, nn.MaxPool2d) and stages[-1]:
            stages.append([])
    spec = [(f"conv{i}", prefixes) for i, prefixes in enumerate(stages, 1) if prefixes]
    return spec + _classifier_spec(model, "classifier", hidden="classifier")


def _mobile_rule(model: nn.Module) -> _PrefixSpec:
    """EfficientNet / MobileNet: features[0] stem, stages, features[-1] the 1x1 conv neck, head.

    EfficientNet's features hold one Sequential per stage; MobileNet's hold single inverted
    residuals, grouped here into stages by their output width.
    """
    layers = _param_children(model.features)
    (first, _), (last, _), middle = layers[0], layers[-1], layers[1:-1]
    if all(isinstance(m, nn.Sequential) for _, m in middle):
        stages = [(f"features.{name}", [f"features.{name}"]) for name, _ in middle]
    else:
        widths: list[tuple[int | None, list[str]]] = []
        for name, module in middle:
            width = _out_channels(module)
            if not widths or widths[-1][0] != width:
                widths.append((width, []))
            widths[-1][1].append(f"features.{name}")
        stages = [(f"stage{i}", prefixes) for i, (_, prefixes) in enumerate(widths, 1)]
    return [
        ("stem", [f"features.{first}"]),
        *stages,
        ("neck", [f"features.{last}"]),
        *_classifier_spec(model, "classifier", hidden="classifier"),
    ]


def _convnext_rule(model: nn.Module) -> _PrefixSpec:
    """ConvNeXt: stem, each stage and each downsampling layer, the pre-head norm, head."""
    stages = _stage_list_spec(model, "features")
    return stages + _classifier_spec(model, "classifier", hidden="neck")


def _swin_rule(model: nn.Module) -> _PrefixSpec:
    """Swin: patch embedding, each stage and each patch-merging layer, final norm, head."""
    return [*_stage_list_spec(model, "features"), ("neck", ["norm"]), ("head", ["head"])]


def _vit_rule(model: nn.Module) -> _PrefixSpec:
    """ViT: patch embedding + class token + position embedding, one block per encoder layer."""
    encoder_layers = _param_children(model.encoder.layers)
    layers = [(name, [f"encoder.layers.{name}"]) for name, _ in encoder_layers]
    return [
        ("stem", ["class_token", "conv_proj", "encoder.pos_embedding"]),
        *layers,
        ("neck", ["encoder.ln", "heads.pre_logits"]),
        ("head", ["heads.head"]),
    ]


def _regnet_rule(model: nn.Module) -> _PrefixSpec:
    stages = [(name, [f"trunk_output.{name}"]) for name, _ in _param_children(model.trunk_output)]
    return [("stem", ["stem"]), *stages, ("head", ["fc"])]


def _stage_list_spec(model: nn.Module, attr: str) -> _PrefixSpec:
    """features[0] is the stem; every later entry of ``features`` is a block of its own."""
    children = _param_children(getattr(model, attr))
    stages = [(f"{attr}.{name}", [f"{attr}.{name}"]) for name, _ in children[1:]]
    return [("stem", [f"{attr}.{children[0][0]}"]), *stages]


def _classifier_spec(model: nn.Module, attr: str, hidden: str) -> _PrefixSpec:
    """The last layer with parameters in ``model.<attr>`` is the head; others are ``hidden``."""
    container = getattr(model, attr)
    layers = [f"{attr}.{name}" for name, _ in _param_children(container)]
    if not layers:
        return [("head", [attr])]
    return ([(hidden, layers[:-1])] if layers[:-1] else []) + [("head", [layers[-1]])]


def _out_channels(module: nn.Module) -> int | None:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else getattr(module, "out_channels", None)


# ------------------------------------------------------------------------------------- automatic


def _auto_spec(model: nn.Module) -> _PrefixSpec:
    """Blocks for an unknown model: its children, opened up until the blocks look like stages.

    The head is the classifier the model declares or its forward ends with (``_find_head``), else
    the last layer holding parameters. A child holding more than half of the body's parameters
    (a big Sequential) is opened into its children; norm-only children join the layer they
    follow; neighbours are merged, smallest pair first, down to at most 12 blocks.
    """
    head_path = _find_head(model)
    units: list[_Unit] = [[c] for c in _param_children(model) if c[0] != head_path]
    if head_path is None:
        if not units:
            return []  # every parameter sits on the model itself: one block, the head
        while _param_children(units[-1][0][1]):
            path, module = units.pop()[0]
            units += [[(f"{path}.{n}", m)] for n, m in _param_children(module)]
        head_path = units.pop()[0][0]
    body = units
    while body:
        total = sum(_numel(m) for unit in body for _, m in unit)
        i = max(range(len(body)), key=lambda k: _numel(body[k][0][1]))
        path, module = body[i][0]
        children = _param_children(module)
        if len(children) < 2 or (_numel(module) * 2 <= total and len(body) >= 2):
            break
        body[i : i + 1] = [
            [(f"{path}.{n}", m)] for n, m in children if f"{path}.{n}" != head_path
        ]

    merged = _attach_norms(body)
    while len(merged) > _MAX_AUTO_BLOCKS - 1:
        sizes = [sum(_numel(m) for _, m in unit) for unit in merged]
        i = min(range(len(merged) - 1), key=lambda k: sizes[k] + sizes[k + 1])
        merged[i : i + 2] = [merged[i] + merged[i + 1]]
    spec = [(_join_names([p for p, _ in unit]), [p for p, _ in unit]) for unit in merged]
    return [*spec, ("head", [head_path])]


#: Attribute names under which models commonly keep their classifier.
_HEAD_ATTRIBUTES = ("fc", "classifier", "head", "heads", "last_linear", "logits")


def _find_head(model: nn.Module) -> str | None:
    """The classifier's module path: what the model declares (``get_classifier``), else the last
    layer with parameters its traced forward runs, else a conventional attribute; None if none.

    Registration order says nothing: a model may register ``self.head`` before its body.
    """
    modules = {id(m): name for name, m in model.named_modules() if name}
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            declared = get_classifier()
        except Exception:  # noqa: BLE001 - a model's own method may fail in any way
            declared = None
        if isinstance(declared, nn.Module) and id(declared) in modules and _has_params(declared):
            return modules[id(declared)]
    traced = _traced_head(model)
    if traced is not None:
        return traced
    for attr in _HEAD_ATTRIBUTES:
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module) and _has_params(module) and id(module) in modules:
            children = _param_children(module)
            return f"{attr}.{children[-1][0]}" if len(children) > 1 else attr
    return None


def _traced_head(model: nn.Module) -> str | None:
    """The last module with parameters on the way to the output of ``torch.fx``'s trace."""
    try:
        from torch import fx

        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - many models cannot be traced symbolically; no answer then
        return None
    output = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    frontier = list(output.all_input_nodes) if output is not None else []
    seen: set[Any] = set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and _has_params(model.get_submodule(node.target)):
            return str(node.target)
        frontier += node.all_input_nodes
    return None


def _attach_norms(units: list[_Unit]) -> list[_Unit]:
    """A norm-only unit joins the sibling layer before it (the one it normalises), else the
    sibling after it; a norm with no sibling layer (a pre-head norm) stays a block of its own."""
    merged: list[_Unit] = []
    waiting: _Unit = []
    for unit in units:
        if waiting and _parent(waiting[-1][0]) == _parent(unit[0][0]):
            unit, waiting = waiting + unit, []
        elif waiting:
            merged.append(waiting)
            waiting = []
        if not _is_norm_only(unit):
            merged.append(list(unit))
        elif merged and _parent(merged[-1][-1][0]) == _parent(unit[0][0]):
            merged[-1] += unit
        else:
            waiting = list(unit)
    return merged + ([waiting] if waiting else [])


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _is_norm_only(unit: _Unit) -> bool:
    layers = [m for _, u in unit for m in u.modules() if _has_direct_tensors(m)]
    return bool(layers) and all(isinstance(m, _NORM_TYPES) for m in layers)


# --------------------------------------------------------------------------------------- helpers


def _param_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, child) for name, child in module.named_children() if _has_params(child)]


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _has_direct_tensors(module: nn.Module) -> bool:
    return (
        next(module.parameters(recurse=False), None) is not None
        or next(module.buffers(recurse=False), None) is not None
    )


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``: the module paths above a name, and the name."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _under(names: Sequence[str], prefixes: Sequence[str]) -> list[str]:
    """Names equal to one of ``prefixes`` or inside one of those modules."""
    wanted = set(prefixes)
    return [n for n in names if any(p in wanted for p in _prefixes(n))]


def _covering_prefixes(
    group: Sequence[str], all_names: Sequence[str], members: Sequence[str] | None = None
) -> list[str]:
    """The shortest module paths above each name of ``group`` that hold no parameter outside
    ``members`` (default: the group itself)."""
    in_group = set(group if members is None else members)
    outside: set[str] = {p for n in all_names if n not in in_group for p in _prefixes(n)}
    covering: list[str] = []
    for name in group:
        shortest = next(p for p in _prefixes(name) if p not in outside)
        if shortest not in covering:
            covering.append(shortest)
    return covering


def _join_names(paths: Sequence[str]) -> str:
    if len(paths) <= 2:
        return "+".join(paths)
    return f"{paths[0]}..{paths[-1]}"


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
