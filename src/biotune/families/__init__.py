"""Model families: all BioTune knows about an architecture, in one file per family.

A `Family` says how a model splits into blocks, where its classifier is and how its forward runs
as a chain of steps. ``blocks.partition_blocks``, the feature cache (``features.block_chain``)
and ``models.reset_head`` all ask ``family_of(model)``, so they cannot disagree.

Lookup: the families of scope "architecture" (one file each: resnet.py, densenet.py, ...), then
"library" (timm_generic.py: any timm model, by timm's ``group_matcher``), then "auto" (auto.py:
any module); by name within a scope, where no two families may claim the same model.

To add a family, write one module in this package that builds a `Family` and calls
``register(...)`` when imported (regnet.py is the example), and a test next to
``test_regnet_family`` in tests/test_families.py. Every module here whose name does not start
with "_" is imported on the first lookup; nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from biotune.errors import BioTuneError
from biotune.families._base import SCOPES, BlockSpec, Family, Op, Stage, module_op

__all__ = [
    "BlockSpec",
    "Family",
    "Op",
    "Stage",
    "family_of",
    "get_family",
    "list_families",
    "module_op",
    "register",
]

_REGISTRY: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Add ``family`` to the lookup (called by each family module when it is imported)."""
    known = _REGISTRY.get(family.name)
    if known is not None and known is not family:
        raise BioTuneError(f"two model families are called {family.name!r}")
    _REGISTRY[family.name] = family
    return family


def family_of(model: nn.Module) -> Family:
    """The first family, narrowest scope first, that claims ``model`` (a bare model)."""
    return next(family for family in _ordered() if family.matches(model))


def get_family(name: str) -> Family:
    for family in _ordered():
        if family.name == name:
            return family
    raise BioTuneError(f"unknown model family {name!r}; families are: {', '.join(list_families())}")


def list_families() -> list[str]:
    """Family names in lookup order, the automatic fallback ("auto") last."""
    return [family.name for family in _ordered()]


def _ordered() -> list[Family]:
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True
    return sorted(_REGISTRY.values(), key=lambda f: (SCOPES.index(f.scope), f.name))
