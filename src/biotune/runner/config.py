"""What a search is asked to do: the model and data (``DataConfig``) and everything else a
search depends on (``SearchConfig``), stored in the run directory and checked on resume."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from biotune.core.budget import BudgetConfig
from biotune.core.evolution import EvolutionConfig
from biotune.core.fields import checked_fields, option
from biotune.data import DEFAULT_DATA_ROOT
from biotune.errors import BioTuneError
from biotune.runner.fitness import SearchProtocol
from biotune.training import TrainConfig

BAD_IMAGES = ("skip", "error")
RERANK_FROM = ("last", "winners", "best", "structures")
#: The choices of ``rerank_from`` that rank plans of different generations together.
ACROSS_GENERATIONS = ("best", "structures")
#: What proposes the genomes: the paper's evolution, or for comparison at equal cost, uniform
#: random search or Optuna's TPE (``runner.samplers``).
SAMPLERS = ("evolution", "random", "tpe")


@dataclass(frozen=True)
class DataConfig:
    """Which model and data, at which size."""

    model: str = option(
        "efficientnet_lite0",
        flag="--model",
        help="model name: efficientnet_lite0/1/2 (offline ImageNet weights), a torchvision name "
        "(resnet50, densenet121, ...; 'tv:' prefix optional) or 'timm:NAME'",
    )
    dataset: str = option(
        "animal-shape",
        flag="--dataset",
        help="offline: animal-shape, mnist-5k, digits, textures; torchvision: flowers102, "
        "fgvc-aircraft, dtd, cifar10, stl10, mnist, usps, svhn; or a folder with one sub-folder "
        "of images per class",
    )
    data_root: str | None = option(
        None,
        flag="--data-root",
        type="str",
        none=f"~/{DEFAULT_DATA_ROOT.relative_to(Path.home())}",
        help="where torchvision datasets live or are downloaded to",
    )
    download: bool = option(
        False, flag="--download", help="download torchvision datasets (needs internet)"
    )
    pretrained: bool = option(
        True, flag="--no-pretrained", help="start from random weights instead of pretrained ones"
    )
    checkpoint: str | None = option(
        None,
        flag="--checkpoint",
        type="str",
        none="none",
        help="load the model's weights from this state-dict file",
    )
    # None: the model's native resolution (its pretrained config), except the offline demo
    # datasets, which default to data.DEMO_IMAGE_SIZE (``workbench.image_size_for``)
    image_size: int | None = option(
        None,
        flag="--image-size",
        type="positive_int",
        none="the model's native resolution; the offline demo datasets: 32",
        help="image side in pixels",
    )
    # None: the whole split, except the offline demo datasets (capped at data.DEMO_SIZES)
    train_size: int | None = option(
        None,
        flag="--train-size",
        type="positive_int",
        none="all",
        help="use at most this many training images, a stratified subsample",
    )
    val_size: int | None = option(
        None,
        flag="--val-size",
        type="positive_int",
        none="all",
        help="at most this many validation images",
    )
    test_size: int | None = option(
        None,
        flag="--test-size",
        type="positive_int",
        none="all",
        help="at most this many test images",
    )
    split_seed: int = option(0, flag="--split-seed", help="seed of the train/val/test split")
    bad_images: str = option(
        "skip",
        flag="--bad-images",
        choices=BAD_IMAGES,
        help="unreadable image files in a folder dataset (every image is decoded when the "
        "folder is scanned): skip them with a warning or stop with an error",
    )
    # block name -> module prefixes or regexes, in order (None: the model family's blocks)
    blocks: dict[str, list[str]] | None = None
    full_data: bool = False  # the whole splits, the offline demo datasets too (sizes ignored)

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 8:
            raise BioTuneError(f"image_size must be at least 8 (got {self.image_size})")
        for name in ("train_size", "val_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BioTuneError(f"{name} must be a positive integer (got {value})")
        if self.bad_images not in BAD_IMAGES:
            raise BioTuneError(f"bad_images must be 'skip' or 'error' (got {self.bad_images!r})")


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search depends on; stored in the run directory and checked on resume."""

    data: DataConfig = field(default_factory=DataConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    protocol: SearchProtocol = field(default_factory=SearchProtocol)
    final: TrainConfig = field(default_factory=TrainConfig)
    final_seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = option(
        0, flag="--seed", help="seed of the plans proposed (evolution, random or TPE) and the folds"
    )
    # Re-rank the best k distinct plans of the last generation with the final recipe and choose
    # on validation (``runner.rerank``); 0 or 1: the search's best plan as it is.
    rerank: int = option(
        0,
        flag="--rerank",
        type="int",
        metavar="K",
        help="train K of the search's plans (--rerank-from says which) with the final recipe "
        "(seed: the first final seed) and keep the best on validation; the winner's run is "
        "that seed's final run (0 or 1: the search's best plan as it is)",
    )
    rerank_from: str = option(
        "last",
        flag="--rerank-from",
        choices=RERANK_FROM,
        help="where --rerank takes its plans: 'last', the best distinct plans of the last "
        "generation; 'winners', each generation's winner on its own fold, newest first, one "
        "per set of trained blocks; 'best', the best distinct plans of the whole search; "
        "'structures', the best plan of each set of trained blocks of the whole search, best "
        "first (the last two need scores that compare across generations: --fold-policy "
        "fixed, or one fold)",
    )
    promote: int = option(
        0,
        flag="--promote",
        type="int",
        metavar="M",
        help="a middle rung before --rerank: the search's M best plans (picked like --rerank's) "
        "train longer on the search's fold and seeds (--promote-epochs epochs), and the best "
        "--rerank of them go on to the final recipe (0: no middle rung; needs --rerank 2 or "
        "more)",
    )
    promote_epochs: int = option(
        4,
        flag="--promote-epochs",
        type="positive_int",
        help="epochs of the middle rung (--promote), on the search's fold, no early stop",
    )
    sampler: str = option(
        "evolution",
        flag="--sampler",
        choices=SAMPLERS,
        help="what proposes the plans: 'evolution', the paper's algorithm; 'random', uniform "
        "random genomes; 'tpe', Optuna's TPE (pip install 'biotune[tpe]'); the last two need "
        "--fold-policy fixed (or one fold) and are there to check that the evolution earns "
        "its keep at equal cost",
    )
    max_ft_equivalents: float | None = option(
        None,
        flag="--max-ft-equivalents",
        type="positive_float",
        none="no limit",
        help="stop proposing plans once the search's evaluations have cost this many "
        "FT-equivalents (the search's own unit, as search_summary.json counts it, re-ranking "
        "excluded): equal-cost comparisons of samplers",
    )
    # Budgets and the Pareto trade-off's settings (``core.budget``); the defaults change nothing.
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.rerank, int) or self.rerank < 0:
            raise BioTuneError(f"rerank must be a whole number >= 0 (got {self.rerank!r})")
        if self.rerank_from not in RERANK_FROM:
            raise BioTuneError(
                f"rerank_from must be one of {', '.join(RERANK_FROM)} (got {self.rerank_from!r})"
            )
        if self.sampler not in SAMPLERS:
            raise BioTuneError(
                f"sampler must be one of {', '.join(SAMPLERS)} (got {self.sampler!r})"
            )
        comparable = self.protocol.comparable_across_generations
        if self.rerank_from in ACROSS_GENERATIONS and not comparable:
            raise BioTuneError(
                f"--rerank-from {self.rerank_from} compares plans of different generations: it "
                "needs "
                "--fold-policy fixed (or --data-fraction 1)"
            )
        if self.sampler != "evolution" and not comparable:
            raise BioTuneError(
                f"--sampler {self.sampler} (the default preset's is random) ranks every plan it "
                "has seen: it needs --fold-policy fixed (or --data-fraction 1); rotating folds "
                "need the evolution (--preset evolution)"
            )
        if self.sampler != "evolution" and self.evolution.objective != "accuracy":
            raise BioTuneError(
                f"--sampler {self.sampler} (the default preset's is random) ranks by accuracy "
                "only: --objective pareto needs the evolution (--preset evolution)"
            )
        if not isinstance(self.promote, int) or self.promote < 0:
            raise BioTuneError(f"promote must be a whole number >= 0 (got {self.promote!r})")
        if self.promote and self.rerank < 2:
            raise BioTuneError(
                f"--promote {self.promote} needs --rerank 2 or more: the middle rung narrows "
                "the plans the final recipe re-ranks"
            )
        if self.promote and self.promote <= self.rerank:
            raise BioTuneError(
                f"--promote {self.promote} must exceed --rerank {self.rerank}: the middle rung "
                "keeps the best --rerank of the plans it trains"
            )
        if not isinstance(self.promote_epochs, int) or self.promote_epochs < 1:
            raise BioTuneError(
                f"promote_epochs must be a whole number >= 1 (got {self.promote_epochs!r})"
            )
        limit = self.max_ft_equivalents
        if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
            raise BioTuneError(f"max_ft_equivalents must be a positive number (got {limit!r})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": asdict(self.data),
            "evolution": self.evolution.to_dict(),
            "protocol": self.protocol.to_dict(),
            "final": self.final.to_dict(),
            "final_seeds": list(self.final_seeds),
            "seed": self.seed,
            # Written only when on, so configurations from before it existed compare equal.
            **({"rerank": self.rerank} if self.rerank else {}),
            **({"rerank_from": self.rerank_from} if self.rerank_from != "last" else {}),
            **({"sampler": self.sampler} if self.sampler != "evolution" else {}),
            **(
                {"promote": self.promote, "promote_epochs": self.promote_epochs}
                if self.promote
                else {}
            ),
            **(
                {"max_ft_equivalents": self.max_ft_equivalents}
                if self.max_ft_equivalents is not None
                else {}
            ),
            **({"budget": self.budget.to_dict()} if self.budget != BudgetConfig() else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "search") -> SearchConfig:
        """As stored in config.json (``where`` names it in errors): every setting's type is
        checked and an unknown one refused before anything runs (``checked_fields``)."""
        d = checked_fields(cls, d, where)
        for key in ("data", "evolution", "protocol", "final", "final_seeds", "seed"):
            if key not in d:
                raise BioTuneError(f"{where}: '{key}' is missing (see a run's config.json)")
        return cls(
            data=DataConfig(**checked_fields(DataConfig, d["data"], f"{where}.data")),
            evolution=EvolutionConfig(
                **checked_fields(EvolutionConfig, d["evolution"], f"{where}.evolution")
            ),
            protocol=SearchProtocol.from_dict(d["protocol"], f"{where}.protocol"),
            final=TrainConfig(**checked_fields(TrainConfig, d["final"], f"{where}.final")),
            final_seeds=tuple(d["final_seeds"]),
            seed=d["seed"],
            rerank=d.get("rerank", 0),
            rerank_from=d.get("rerank_from", "last"),
            sampler=d.get("sampler", "evolution"),
            promote=d.get("promote", 0),
            promote_epochs=d.get("promote_epochs", 4),
            max_ft_equivalents=d.get("max_ft_equivalents"),
            budget=BudgetConfig.from_dict(d.get("budget"), f"{where}.budget"),
        )


@dataclass(frozen=True)
class PartitionPrint:
    """The blocks a plan was made for: their names in order and the partition's fingerprint
    (``workbench.partition_record``)."""

    names: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True)
class PlanOrigin:
    """Where a plan came from (``best_plan.json``'s ``origin``): ``biotune train --plan`` reuses
    its model, data and base learning rate, and refuses a plan made for other blocks. A part
    may be missing (None) in a plan file written by hand."""

    data: DataConfig | None = None
    base_lr: float | None = None
    partition: PartitionPrint | None = None

    def __post_init__(self) -> None:
        lr = self.base_lr
        if lr is not None and not (lr > 0 and math.isfinite(lr)):
            raise BioTuneError(f"base_lr must be a positive number (got {lr!r})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": asdict(self.data) if self.data is not None else None,
            "base_lr": self.base_lr,
            "partition": (
                {"names": list(self.partition.names), "fingerprint": self.partition.fingerprint}
                if self.partition is not None
                else None
            ),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "origin") -> PlanOrigin:
        """Checked like the plan itself: an object of known keys, each of its type."""
        d = checked_fields(cls, d, where)
        data, partition = d.get("data"), d.get("partition")
        try:
            return cls(
                data=None
                if data is None
                else DataConfig(**checked_fields(DataConfig, data, f"{where}.data")),
                base_lr=d.get("base_lr"),
                partition=None
                if partition is None
                else PartitionPrint(
                    **checked_fields(PartitionPrint, partition, f"{where}.partition")
                ),
            )
        except BioTuneError as exc:
            message = str(exc)
            raise BioTuneError(
                message if message.startswith(where) else f"{where}: {message}"
            ) from None
