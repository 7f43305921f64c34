"""What a search is asked to do: the model and data (``DataConfig``) and everything else a
search depends on (``SearchConfig``), stored in the run directory and checked on resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from biotune.core.budget import BudgetConfig
from biotune.core.evolution import EvolutionConfig
from biotune.core.fields import option
from biotune.data import DEFAULT_DATA_ROOT
from biotune.errors import BioTuneError
from biotune.runner.fitness import SearchProtocol
from biotune.training import TrainConfig

BAD_IMAGES = ("skip", "error")
RERANK_FROM = ("last", "winners")


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
    image_size: int | None = option(  # None: the model's native resolution
        32,
        flag="--image-size",
        type="positive_int",
        help="image side in pixels, or --native-size for the model's own",
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
    seed: int = option(0, flag="--seed", help="seed of the evolution and the folds")
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
        "per set of trained blocks",
    )
    # Budgets and the Pareto trade-off's settings (``core.budget``); the defaults change nothing.
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.rerank, int) or self.rerank < 0:
            raise BioTuneError(f"rerank must be a whole number >= 0 (got {self.rerank!r})")
        if self.rerank_from not in RERANK_FROM:
            raise BioTuneError(
                f"rerank_from must be 'last' or 'winners' (got {self.rerank_from!r})"
            )

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
            **({"budget": self.budget.to_dict()} if self.budget != BudgetConfig() else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchConfig:
        return cls(
            data=DataConfig(**d["data"]),
            evolution=EvolutionConfig(**d["evolution"]),
            protocol=SearchProtocol.from_dict(d["protocol"]),
            final=TrainConfig(**d["final"]),
            final_seeds=tuple(d["final_seeds"]),
            seed=d["seed"],
            rerank=d.get("rerank", 0),
            rerank_from=d.get("rerank_from", "last"),
            budget=BudgetConfig.from_dict(d.get("budget")),
        )
