"""Other ways to propose genomes, for comparing the evolution at equal cost.

A search method has to beat random search over the same space at the same budget (Bergstra &
Bengio 2012; Hyperband, BOHB, DEHB and ASHA all report it). These samplers propose genomes of
the evolution's own kind, through its own ask / tell / state interface, so the runner, the
evaluation, the re-ranking and the cost accounting stay exactly the same: only the proposals
differ.

* ``RandomSearch``: the anchors (when on), then uniform random genomes that select a block.
* ``TPESearch``: the anchors, then Optuna's Tree-structured Parzen Estimator (multivariate,
  constant liar for a batch), rebuilt from the told history at every ask with a seed derived
  from the search's seed and the candidate count, so a resumed search proposes exactly what the
  uninterrupted one would.

Both rank everything they have seen, so they need fitness values that compare across the whole
search (one fold and the same seeds for every evaluation: ``SearchProtocol.fold_policy``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from biotune.core.evolution import (
    BioTuneEvolution,
    Candidate,
    EvolutionConfig,
    anchor_genes,
    candidate_from_dict,
    candidate_to_dict,
)
from biotune.core.records import Role
from biotune.errors import BioTuneError

#: Proposals TPE may make in a row that select no block (or fit no budget) before one random
#: genome is taken instead.
_MAX_TPE_RETRIES = 50


class RandomSearch(BioTuneEvolution):
    """Anchors, then uniform random genomes: as many as the evolution would score
    (``EvolutionConfig.total_evaluations``), ``children_batch`` (default: the population size)
    at a time. ``population`` is the best ``population_size`` of everything told, ``history``
    one summary per ``population_size`` candidates told."""

    name = "random"

    def __init__(
        self,
        num_blocks: int,
        config: EvolutionConfig | None = None,
        seed: int = 0,
        **hooks: Any,
    ) -> None:
        config = config or EvolutionConfig()
        super().__init__(num_blocks, config, seed, **hooks)
        if config.objective != "accuracy":
            raise BioTuneError(f"the {self.name} sampler ranks by accuracy only (no pareto)")
        self._told: list[tuple[Candidate, float]] = []

    @property
    def _total(self) -> int:
        return self._config.total_evaluations

    def ask(self) -> list[Candidate]:
        if self._pending or self._phase == "done":
            return list(self._pending)
        start = self._next_id
        count = min(
            self._config.children_batch or self._config.population_size, self._total - start
        )
        anchors = (
            anchor_genes(self._num_blocks, self._config.anchor_set) if self._config.anchors else []
        )
        if self._fits is not None:
            anchors = self._anchors_within_budget(anchors)
        given = [anchors[i] for i in range(start, min(start + count, len(anchors)))]
        genes = given + self._propose(count - len(given))
        self._pending = []
        for g in genes:
            self._generation = self._next_id // self._config.population_size
            self._pending.append(self._new_candidate(g, Role.INITIAL))
        return list(self._pending)

    def _propose(self, count: int) -> list[np.ndarray]:
        return [self._random_valid_genes() for _ in range(count)]

    def _finish_generation(self, members: list[tuple[Candidate, float]]) -> None:
        """Called by ``tell`` with the told batch: rank everything seen, summarise each full
        population's worth of candidates, and end after the last one."""
        self._told += members
        ranked = sorted(self._told, key=lambda cf: (cf[1], cf[0].id))
        self._population = ranked[: self._config.population_size]
        self._extinction = []
        size = self._config.population_size
        finished = len(self._told) >= self._total
        while len(self._history) < len(self._told) // size or (
            finished and len(self._history) * size < len(self._told)
        ):
            fitness = [f for _, f in self._population]
            self._history.append(
                {
                    "generation": len(self._history),
                    "best": self._population[0][1],
                    "mean": float(np.mean(fitness)),
                    "fitness": fitness,
                    "best_id": self._population[0][0].id,
                }
            )
        if finished:
            self._phase = "done"

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "sampler": self.name,
            "told": [[candidate_to_dict(c), f] for c, f in self._told],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], **hooks: Any) -> RandomSearch:
        if not isinstance(state, Mapping) or state.get("sampler") != cls.name:
            raise BioTuneError(f"not the state of a {cls.name} sampler")
        search = super().from_state_dict(state, **hooks)
        assert isinstance(search, RandomSearch)
        search._told = [(candidate_from_dict(c), float(f)) for c, f in state["told"]]
        return search


class TPESearch(RandomSearch):
    """Anchors, then Optuna's TPE over the genes (needs ``pip install 'biotune[tpe]'``)."""

    name = "tpe"

    def _propose(self, count: int) -> list[np.ndarray]:
        if count == 0:
            return []
        try:
            import optuna
        except ImportError:
            raise BioTuneError("the tpe sampler needs optuna: pip install 'biotune[tpe]'") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        names = [f"g{i:03d}" for i in range(self._num_blocks + 1)]
        space = {n: optuna.distributions.FloatDistribution(0.0, 1.0) for n in names}
        with warnings.catch_warnings():  # multivariate and constant_liar are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=self._seed * 1_000_003 + self._next_id, multivariate=True, constant_liar=True
            )
            study = optuna.create_study(direction="minimize", sampler=sampler)
            for candidate, fitness in self._told:
                params = dict(zip(names, map(float, candidate.genes), strict=True))
                study.add_trial(
                    optuna.trial.create_trial(params=params, distributions=space, value=fitness)
                )
            out: list[np.ndarray] = []
            retries = 0
            while len(out) < count:
                trial = study.ask(space)
                genes = np.array([trial.params[n] for n in names], dtype=float)
                fitted = self._within_budget(genes) if np.any(genes[:-1] > genes[-1]) else None
                if fitted is not None:
                    out.append(fitted)  # left running: the constant liar sees it pending
                    continue
                study.tell(trial, 1.0)  # selects nothing, or fits no budget: the worst
                retries += 1
                if retries >= _MAX_TPE_RETRIES:
                    out.append(self._random_valid_genes())
                    retries = 0
        return out


SAMPLERS: dict[str, type[BioTuneEvolution]] = {
    "evolution": BioTuneEvolution,
    "random": RandomSearch,
    "tpe": TPESearch,
}
