"""Named search configurations: the paper's protocol, and our cheaper default."""

from __future__ import annotations

from biotune.core.evolution import EvolutionConfig
from biotune.errors import BioTuneError
from biotune.runner.config import DataConfig, SearchConfig
from biotune.runner.fitness import PruneConfig, SearchProtocol
from biotune.training import TrainConfig

#: The final training of the winning plan (and of every baseline in ``biotune compare``).
FINAL_TRAINING = TrainConfig(epochs=8, patience=2, batch_size=64, eval_batch_size=256)


def paper() -> SearchConfig:
    """The paper's protocol: population 10, 10 generations, elite 3, 3 seeds, half the data,
    up to 30 epochs with patience 3, batch 96/64, children made one after another."""
    return SearchConfig(
        data=DataConfig(),
        evolution=EvolutionConfig(population_size=10, generations=10, elite=3, children_batch=1),
        protocol=SearchProtocol(
            data_fraction=0.5,
            seeds=(0, 1, 2),
            train=TrainConfig(epochs=30, patience=3, batch_size=96, eval_batch_size=64),
            memoize=False,
        ),
        final=TrainConfig(epochs=30, patience=3, batch_size=96, eval_batch_size=64),
        final_seeds=(0, 1, 2),
    )


def default() -> SearchConfig:
    """Our default: the same algorithm at a fraction of the cost (one seed, short training,
    feature caching, early termination, memoisation) followed as a multi-fidelity search. Every
    evaluation trains on the same fold with the same seed (common random numbers), so scores
    compare across the search; it starts from anchor plans at several learning rates; the best
    plan of each of its 6 best sets of trained blocks trains 4 epochs on that fold (the proxy
    that ranks plans like the final recipe, ``benchmarks/fidelity``) and the best 2 of them
    with the final recipe. Chosen on validation by rules written before their runs
    (``benchmarks/accuracy/README.md``)."""
    return SearchConfig(
        data=DataConfig(),
        evolution=EvolutionConfig(
            population_size=6,
            generations=3,
            elite=2,
            anchors=True,
            anchor_set="wide",
            initial_size=10,
        ),
        protocol=SearchProtocol(
            data_fraction=0.5,
            seeds=(0,),
            train=TrainConfig(epochs=2, patience=1, batch_size=64, eval_batch_size=256),
            cache_features=True,
            prune=PruneConfig(min_epochs=1, quantile=0.5),
            fold_policy="fixed",
        ),
        final=FINAL_TRAINING,
        final_seeds=(0, 1, 2),
        rerank=2,
        rerank_from="structures",
        promote=6,
        promote_epochs=4,
    )


PRESETS = {"default": default, "paper": paper}


def preset(name: str) -> SearchConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise BioTuneError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
