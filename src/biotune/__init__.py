"""biotune: evolutionary selective fine-tuning of pretrained image classifiers (BioTune).

The flow: a model is split into blocks (:func:`partition_blocks`), a genome decodes to a
:class:`FineTunePlan` that :func:`apply_plan` turns into optimizer param groups, and
:func:`search` runs the evolutionary search that finds the plan.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

from biotune.blocks import BlockPartition, partition_blocks  # noqa: E402
from biotune.data import load_dataset  # noqa: E402
from biotune.errors import BioTuneError  # noqa: E402
from biotune.models import load_model  # noqa: E402
from biotune.plan import FineTunePlan, apply_plan, decode_genome  # noqa: E402
from biotune.runner import DataConfig, Search, SearchConfig, SearchResult  # noqa: E402

__all__ = [
    "BioTuneError",
    "BlockPartition",
    "DataConfig",
    "FineTunePlan",
    "SearchConfig",
    "SearchResult",
    "apply_plan",
    "decode_genome",
    "load_dataset",
    "load_model",
    "partition_blocks",
    "search",
]


def search(
    run_dir: str | Path,
    config: SearchConfig | None = None,
    *,
    preset: str = "default",
    resume: bool = False,
    final: bool = True,
    executor: str = "inprocess",
    workers: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
    **data: Any,
) -> SearchResult:
    """Search a fine-tuning plan (and train and test it unless ``final=False``).

    ``data`` overrides fields of :class:`DataConfig` (``model=``, ``dataset=``,
    ``image_size=``, ...) of ``config`` or of the named preset ("default" or "paper").
    """
    from biotune.presets import preset as named_preset
    from biotune.progress import SearchProgress

    config = config or named_preset(preset)
    if data:
        config = replace(config, data=replace(config.data, **data))
    runner = Search(
        config, run_dir, progress=SearchProgress() if progress else None,
        executor=executor, workers=workers, ray_address=ray_address,
    )
    return runner.run_search(resume=resume, final=final)
