"""Any timm model: timm's own coarse groups (``group_matcher``) and its declared classifier.

timm folds the layers after the last stage (a final norm, EfficientNet's conv_head/bn2) into the
last stage or the classifier; BioTune wants the classifier alone as "head" and those layers as
their own "neck". A timm model without a classifier gets the automatic partition.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from torch import nn

from biotune.families import register
from biotune.families._base import BlockSpec, Family, join_names
from biotune.families.auto import auto_blocks
from biotune.modules import covering_prefixes, under

_TIMM_MATCH_PREV_GROUP = (99999,)  # timm's marker for "same group as the one before"


def is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and callable(
        getattr(model, "group_matcher", None)
    )


def is_timm_class(model: nn.Module, module: str, name: str) -> bool:
    """Whether ``model`` is exactly timm's class ``name`` of ``timm.models.<module>``."""
    kind = type(model)
    return kind.__module__.startswith(f"timm.models.{module}") and kind.__name__ == name


def timm_blocks(model: nn.Module) -> BlockSpec:
    """timm's groups as (block name, parameter names); the automatic partition if it has none."""
    groups = _timm_groups(model)
    return auto_blocks(model) if groups is None else groups


def timm_classifier(model: nn.Module) -> list[str]:
    """Module names of the classifier: timm's config names it; ``get_classifier`` as a backup."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    named = cfg.get("classifier")
    paths = [named] if isinstance(named, str) else list(named or [])
    if paths and under([n for n, _ in model.named_parameters()], paths):
        return paths
    try:
        classifier = model.get_classifier()
    except (AttributeError, NotImplementedError):
        return []
    wanted = {id(m) for m in (classifier if isinstance(classifier, tuple) else (classifier,))}
    return [name for name, module in model.named_modules() if id(module) in wanted and name]


def _timm_groups(model: nn.Module) -> BlockSpec | None:
    """timm's coarse groups (stem, stages), with the neck and the classifier split off; None
    when timm gives no groups or the model has no classifier to call the head."""
    from timm.models import group_parameters

    try:
        matcher = model.group_matcher(coarse=True)
    except NotImplementedError:
        return None
    names = [n for n, _ in model.named_parameters()]
    head = set(under(names, timm_classifier(model)))
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
        kept = set(under(layers[last], covering_prefixes(stage, names, members=layers[last])))
        neck = [n for n in layers[last] if n not in kept]
        layers[last] = [n for n in layers[last] if n in kept]
        for lid in [lid for lid in layers if lid > last]:
            neck += layers.pop(lid)

    key_use = defaultdict(set)
    for lid, params in layers.items():
        for n in params:
            key_use[rule_of[n]].add(lid)
    groups: BlockSpec = []
    for lid in sorted(layers):
        params = layers[lid]
        if not params:
            continue
        keys = {rule_of[n] for n in params}
        key = next(iter(keys))
        if len(keys) == 1 and key and key != "prev" and len(key_use[key]) == 1:
            groups.append((key, params))
        else:
            groups.append((join_names(covering_prefixes(params, names)), params))
    if neck:
        position = {n: i for i, n in enumerate(names)}
        groups.append(("neck", sorted(neck, key=position.__getitem__)))
    groups.append(("head", [n for n in names if n in head]))
    return groups


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


register(
    Family(
        "timm",
        matches=is_timm,
        blocks=timm_blocks,
        classifier=timm_classifier,
        scope="library",
    )
)
