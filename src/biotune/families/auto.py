"""Any other model: an automatic partition over its children, its classifier found by tracing.

The fallback, asked last. A plain ``nn.Sequential`` also gets its forward steps (its children).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from biotune.families import register
from biotune.families._base import BlockSpec, Family, Op, join_names, module_op
from biotune.modules import has_direct_tensors, has_params, numel, param_children

# Consecutive (path, module) children that the automatic partition keeps together.
_Unit = list[tuple[str, nn.Module]]

_MAX_AUTO_BLOCKS = 12
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
#: Attribute names under which models commonly keep their classifier.
_HEAD_ATTRIBUTES = ("fc", "classifier", "head", "heads", "last_linear", "logits")


def auto_blocks(model: nn.Module) -> BlockSpec:
    """Blocks for an unknown model: its children, opened up until the blocks look like stages.

    The head is the classifier the model declares or its forward ends with (``find_head``), else
    the last layer holding parameters. A child holding more than half of the body's parameters
    (a big Sequential) is opened into its children; norm-only children join the layer they
    follow; neighbours are merged, smallest pair first, down to at most 12 blocks.
    """
    head_path = find_head(model)
    units: list[_Unit] = [[c] for c in param_children(model) if c[0] != head_path]
    if head_path is None:
        if not units:
            return []  # every parameter sits on the model itself: one block, the head
        while param_children(units[-1][0][1]):
            path, module = units.pop()[0]
            units += [[(f"{path}.{n}", m)] for n, m in param_children(module)]
        head_path = units.pop()[0][0]
    body = units
    while body:
        total = sum(numel(m) for unit in body for _, m in unit)
        i = max(range(len(body)), key=lambda k: numel(body[k][0][1]))
        path, module = body[i][0]
        children = param_children(module)
        if len(children) < 2 or (numel(module) * 2 <= total and len(body) >= 2):
            break
        body[i : i + 1] = [[(f"{path}.{n}", m)] for n, m in children if f"{path}.{n}" != head_path]

    merged = _attach_norms(body)
    while len(merged) > _MAX_AUTO_BLOCKS - 1:
        sizes = [sum(numel(m) for _, m in unit) for unit in merged]
        i = min(range(len(merged) - 1), key=lambda k: sizes[k] + sizes[k + 1])
        merged[i : i + 2] = [merged[i] + merged[i + 1]]
    spec = [(join_names([p for p, _ in unit]), [p for p, _ in unit]) for unit in merged]
    return [*spec, ("head", [head_path])]


def find_head(model: nn.Module) -> str | None:
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
        if isinstance(declared, nn.Module) and id(declared) in modules and has_params(declared):
            return modules[id(declared)]
    traced = _traced_head(model)
    if traced is not None:
        return traced
    for attr in _HEAD_ATTRIBUTES:
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module) and has_params(module) and id(module) in modules:
            children = param_children(module)
            return f"{attr}.{children[-1][0]}" if len(children) > 1 else attr
    return None


def _classifier(model: nn.Module) -> list[str]:
    """The module the head block holds (``find_head``, else the last layer with parameters)."""
    spec = auto_blocks(model)
    return spec[-1][1] if spec else []


def _forward_ops(model: nn.Module) -> list[Op] | None:
    if not isinstance(model, nn.Sequential):
        return None
    return [module_op(model, name) for name, _ in model.named_children()]


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
        if node.op == "call_module" and has_params(model.get_submodule(node.target)):
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
    layers = [m for _, u in unit for m in u.modules() if has_direct_tensors(m)]
    return bool(layers) and all(isinstance(m, _NORM_TYPES) for m in layers)


register(
    Family(
        "auto",
        matches=lambda model: True,
        blocks=auto_blocks,
        classifier=_classifier,
        forward_ops=_forward_ops,
        scope="any",
    )
)
