"""biotune: evolutionary selective fine-tuning of pretrained image classifiers (BioTune).

The flow: a model is split into blocks (:func:`partition_blocks`), a genome decodes to a
:class:`FineTunePlan` that :func:`apply_plan` turns into optimizer param groups, :func:`search`
runs the evolutionary search that finds the plan and trains it, :func:`train` trains a given
plan, and :func:`load_finetuned` loads the fine-tuned model a search or a training saved.

Names are imported on first use (PEP 562), so ``import biotune`` and the command line's start-up
stay fast, and ``biotune.core`` (plans, the evolution, splits, costs, records) needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "BioTuneError": "biotune.errors",
    "BlockPartition": "biotune.blocks",
    "BudgetConfig": "biotune.core.budget",
    "partition_blocks": "biotune.blocks",
    "load_dataset": "biotune.data",
    "load_model": "biotune.models",
    "FineTunePlan": "biotune.core.plan",
    "apply_plan": "biotune.freezing",
    "decode_genome": "biotune.core.plan",
    "DataConfig": "biotune.runner.config",
    "Search": "biotune.runner.search",
    "SearchConfig": "biotune.runner.config",
    "SearchResult": "biotune.runner.search",
    "TrainConfig": "biotune.training",
    "FineTuned": "biotune.finetuned",
    "load_finetuned": "biotune.finetuned",
    "search": "biotune.api",
    "train": "biotune.api",
}

__all__ = [
    "BioTuneError",
    "BlockPartition",
    "BudgetConfig",
    "DataConfig",
    "FineTunePlan",
    "FineTuned",
    "Search",
    "SearchConfig",
    "SearchResult",
    "TrainConfig",
    "apply_plan",
    "decode_genome",
    "load_dataset",
    "load_finetuned",
    "load_model",
    "partition_blocks",
    "search",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'biotune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from biotune.api import search, train
    from biotune.blocks import BlockPartition, partition_blocks
    from biotune.core.budget import BudgetConfig
    from biotune.core.plan import FineTunePlan, decode_genome
    from biotune.data import load_dataset
    from biotune.errors import BioTuneError
    from biotune.finetuned import FineTuned, load_finetuned
    from biotune.freezing import apply_plan
    from biotune.models import load_model
    from biotune.runner.config import DataConfig, SearchConfig
    from biotune.runner.search import Search, SearchResult
    from biotune.training import TrainConfig
