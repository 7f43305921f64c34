"""The paper's evolutionary search over genomes, as a pure, seedable ask/tell object.

The search knows nothing about training: a runner asks for candidates, evaluates them and tells
their fitness back, so evaluations can run anywhere and the search can be saved and resumed.
Fitness is lower-is-better (1 - validation accuracy, in [0, 1]).

Two corrections of the authors' code shape this module. The data fold rotates every generation,
so fitness values from different generations are never ranked against each other: elites are
re-evaluated on the new fold, and a child is only compared with parents scored on its own fold.
And the genes stored after the elite local search are exactly the clipped genes evaluated.

Beyond the paper, the search can respect a budget and trace a trade-off. ``fits`` (genes ->
bool, e.g. "trains at most 10 % of the parameters") keeps every proposal within a budget: a
genome over it is repaired by keeping its most important trained blocks that fit together
(``_repair``), and one that cannot be repaired is redrawn. ``objective="pareto"`` with a
``cost`` (genes -> cost) ranks each generation by Pareto front of (1 - validation score, cost)
instead of by score alone. Both are functions of the genes given by the caller, so this module
stays numpy only; with neither, the search is the paper's, random stream included.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from biotune.core.fields import option
from biotune.core.pareto import dominates, non_dominated, pareto_order
from biotune.core.plan import BlockSetting, FineTunePlan, encode_plan
from biotune.core.records import Role
from biotune.errors import BioTuneError

OBJECTIVES = ("accuracy", "pareto")
ANCHOR_SETS = ("basic", "wide")
_STATE_FORMAT = 1
#: Random genomes in a row that no repair brings within the budget before the search gives up.
_MAX_REDRAWS = 1000

Genes = np.ndarray


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class EvolutionConfig:
    """Settings of the search; the defaults are the paper's: population 10, elite 3, 10 generations.

    ``children_batch`` sets how many children one ``ask()`` returns: 1 is the paper's sequential
    order (the mating pool changes after every child), None asks all of a generation's children at
    once so a runner can evaluate them in parallel.

    ``anchors`` (not in the paper, off in its preset) makes the first members of the initial
    population the textbook plans instead of random ones (``anchor_genes``: full fine-tuning, the
    top half of the blocks, linear probing; all at the base learning rate), so the search starts
    from, and can never end worse on validation than, the plans a practitioner would try first.

    ``initial_size`` (not in the paper; None: ``population_size``) scores that many genomes in
    the initial generation and keeps the best ``population_size`` of them: a wider first look
    at the space for a few more evaluations.

    ``objective`` (not in the paper): "accuracy" ranks by fitness alone; "pareto" ranks each
    generation by Pareto front of (fitness, cost), the ends and least crowded members of each
    front first (NSGA-II), so the elites are the front's most accurate and cheapest plans; a
    local variant replaces its elite only if it dominates it, and a child removes an elite
    parent from the mating pool only if it dominates it. The search then needs a ``cost``.
    """

    population_size: int = option(
        10, flag="--population", type="positive_int", help="population size"
    )
    generations: int = option(
        10, flag="--generations", type="int", help="generations after the initial population"
    )
    elite: int = option(
        3, flag="--elite", type="int", help="elites kept and refined by local search"
    )
    local_search_step: float = 0.25
    children_batch: int | None = None
    anchors: bool = option(
        False,
        flag="--anchors",
        negatable=True,
        help="start the population from full fine-tuning, the top half and linear probing "
        "instead of random genomes",
    )
    anchor_set: str = option(
        "basic",
        flag="--anchor-set",
        choices=ANCHOR_SETS,
        help="which anchors --anchors starts from: 'basic', full fine-tuning, the top half and "
        "linear probing at the base lr; 'wide', those plus full fine-tuning at x0.3 and x3, "
        "layer-wise lr decay 0.8 and linear probing at x10 (see anchor_genes)",
    )
    initial_size: int | None = option(
        None,
        flag="--initial-size",
        type="positive_int",
        none="the population size",
        help="genomes scored in the initial generation, the best --population of them kept",
    )
    objective: str = option(
        "accuracy",
        flag="--objective",
        choices=OBJECTIVES,
        help="accuracy: the most accurate plan; pareto: every plan no other beats in both "
        "validation accuracy and cost (--pareto-cost), compared on one fold, each trained and "
        "tested at the end next to the anchors (pareto.json, pareto.png, pareto.md)",
    )

    def __post_init__(self) -> None:
        for name in ("population_size", "generations", "elite"):
            value = getattr(self, name)
            if not _is_int(value):
                raise BioTuneError(f"{name} must be an integer (got {value!r})")
        if self.population_size < 2:
            raise BioTuneError(f"population_size must be at least 2 (got {self.population_size})")
        if self.generations < 0:
            raise BioTuneError(f"generations must be at least 0 (got {self.generations})")
        if self.elite < 0:
            raise BioTuneError(f"elite must be at least 0 (got {self.elite})")
        if self.elite >= self.population_size:
            raise BioTuneError(
                "elite must be smaller than population_size "
                f"(got elite={self.elite}, population_size={self.population_size})"
            )
        step = self.local_search_step
        if isinstance(step, bool) or not isinstance(step, (int, float, np.number)):
            raise BioTuneError(f"local_search_step must be a number in (0, 1] (got {step!r})")
        if not 0.0 < float(step) <= 1.0:
            raise BioTuneError(f"local_search_step must be in (0, 1] (got {step})")
        batch = self.children_batch
        if batch is not None and (not _is_int(batch) or batch < 1):
            raise BioTuneError(f"children_batch must be None or an integer >= 1 (got {batch!r})")
        if not isinstance(self.anchors, bool):
            raise BioTuneError(f"anchors must be true or false (got {self.anchors!r})")
        initial = self.initial_size
        if initial is not None and (not _is_int(initial) or initial < self.population_size):
            raise BioTuneError(
                "initial_size must be None or an integer >= population_size "
                f"(got initial_size={initial!r}, population_size={self.population_size})"
            )
        if self.anchor_set not in ANCHOR_SETS:
            raise BioTuneError(
                f"anchor_set must be one of {', '.join(ANCHOR_SETS)} (got {self.anchor_set!r})"
            )
        if self.objective not in OBJECTIVES:
            raise BioTuneError(
                f"objective must be one of {', '.join(OBJECTIVES)} (got {self.objective!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as stored in a run directory; an unset ``initial_size`` and the
        accuracy objective are left out, so run directories made before those settings existed
        still resume."""
        settings = asdict(self)
        if self.initial_size is None:
            del settings["initial_size"]
        if self.objective == "accuracy":
            del settings["objective"]
        if self.anchor_set == "basic":
            del settings["anchor_set"]
        return settings

    def resized(self, population: int, **changes: Any) -> EvolutionConfig:
        """These settings with another population (and ``changes``); an initial generation set
        smaller than it grows to it (it scores at least a population), a larger one (the
        anchors' room) stays."""
        initial = self.initial_size
        if initial is not None and initial < population:
            initial = population
        return replace(self, population_size=population, initial_size=initial, **changes)

    @property
    def initial_evaluations(self) -> int:
        """Genomes scored in the initial generation."""
        return self.population_size if self.initial_size is None else self.initial_size

    @property
    def total_evaluations(self) -> int:
        """Evaluations of a whole search, for progress reports and cost estimates."""
        per_generation = 3 * self.elite + self.population_size - self.elite
        return self.initial_evaluations + self.generations * per_generation


@dataclass(frozen=True, eq=False)
class Candidate:
    """One genome to evaluate: B+1 block genes then the threshold gene, all in [0, 1].

    ``parents`` holds the ids it was made from: the elite for "elite" and "local" candidates,
    (parent a, parent b, prototype) for a child, nothing for "initial" and "immigrant".
    """

    id: int
    genes: np.ndarray
    generation: int
    role: Role
    parents: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        genes = np.array(self.genes, dtype=np.float64)
        if genes.ndim != 1 or genes.size < 2:
            raise BioTuneError(
                f"genes must be a 1-D array of at least 2 genes (got shape {genes.shape})"
            )
        if not np.all((genes >= 0.0) & (genes <= 1.0)):
            raise BioTuneError(f"genes must lie in [0, 1] (candidate {self.id})")
        roles = [r.value for r in Role]
        if self.role not in roles:
            raise BioTuneError(f"role must be one of {', '.join(roles)} (got {self.role!r})")
        genes.setflags(write=False)
        object.__setattr__(self, "genes", genes)
        object.__setattr__(self, "role", Role(self.role))
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))

    @property
    def valid(self) -> bool:
        """A genome that selects no block would train nothing, so it is never evaluated."""
        return bool(np.any(self.genes[:-1] > self.genes[-1]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Candidate):
            return NotImplemented
        return (self.id, self.generation, self.role, self.parents) == (
            other.id,
            other.generation,
            other.role,
            other.parents,
        ) and np.array_equal(self.genes, other.genes)

    def __hash__(self) -> int:
        return hash((self.id, self.generation, self.role, self.parents))


_DEFAULT_CONFIG = EvolutionConfig()


class BioTuneEvolution:
    """The search as an ask/tell loop: ``ask()`` candidates, evaluate them, ``tell()`` fitnesses.

    Each generation g >= 1 first re-evaluates every elite on the new fold next to its two local
    variants (one ``ask()``), then makes children until the population is full (``children_batch``
    at a time). Everything random comes from one seeded generator whose state is saved by
    ``state_dict()``, so a resumed search asks exactly what the original would have.

    ``fits`` and ``cost`` are functions of a genome (see the module's docstring); they are not
    saved with the state, so give the same ones to ``from_state_dict``.
    """

    def __init__(
        self,
        num_blocks: int,
        config: EvolutionConfig = _DEFAULT_CONFIG,
        seed: int = 0,
        *,
        fits: Callable[[Genes], bool] | None = None,
        cost: Callable[[Genes], float] | None = None,
    ) -> None:
        if not _is_int(num_blocks) or num_blocks < 1:
            raise BioTuneError(f"num_blocks must be an integer >= 1 (got {num_blocks!r})")
        if not isinstance(config, EvolutionConfig):
            raise BioTuneError(f"config must be an EvolutionConfig (got {type(config).__name__})")
        if not _is_int(seed) or seed < 0:
            raise BioTuneError(f"seed must be an integer >= 0 (got {seed!r})")
        if config.objective == "pareto" and cost is None:
            raise BioTuneError("the pareto objective needs cost= (a genome's cost, lower better)")
        self._fits = fits
        self._cost = cost
        self._num_blocks = int(num_blocks)
        self._config = config
        self._seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self._seed))
        self._next_id = 0
        self._generation = 0
        self._phase = "initial"  # "initial", "elite", "children" or "done"
        # The latest finished generation, best first, with its extinction probabilities.
        self._population: list[tuple[Candidate, float]] = []
        self._extinction: list[float] = []
        self._pending: list[Candidate] = []
        # The generation being built: the best of each elite's three, the elites' fitness on
        # this generation's fold, the children told so far, and the mating pool (indices into
        # the previous population, best first).
        self._survivors: list[tuple[Candidate, float]] = []
        self._elite_fitness: list[float] = []
        self._children: list[tuple[Candidate, float]] = []
        self._pool: list[int] = []
        self._history: list[dict[str, Any]] = []

    # -- public view -------------------------------------------------------------------------

    @property
    def config(self) -> EvolutionConfig:
        return self._config

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def done(self) -> bool:
        return self._phase == "done"

    @property
    def generation(self) -> int:
        """The generation being evaluated (the last one once the search is done)."""
        return self._generation

    @property
    def population(self) -> list[tuple[Candidate, float]]:
        """The latest finished generation, best first; all its scores come from one fold."""
        return list(self._population)

    @property
    def best(self) -> tuple[Candidate, float]:
        """Best of the latest finished generation; scores of older folds are not comparable.

        With the pareto objective: its most accurate member (lowest fitness, then lowest id).
        """
        if not self._population:
            raise BioTuneError("no generation has finished yet: tell() the initial population")
        if self._config.objective == "pareto":
            return min(self._population, key=lambda cf: (cf[1], cf[0].id))
        return self._population[0]

    @property
    def front(self) -> list[tuple[Candidate, float]]:
        """The non-dominated members of the latest finished generation (one fold), as
        (candidate, fitness), cheapest first; needs ``cost``."""
        if self._cost is None:
            raise BioTuneError("front needs cost= (a genome's cost)")
        points = [self._point(c, f) for c, f in self._population]
        members = [self._population[i] for i in non_dominated(points)]
        return sorted(members, key=lambda cf: (self._point(*cf)[1], cf[1], cf[0].id))

    @property
    def history(self) -> list[dict[str, Any]]:
        """One summary per finished generation: generation, best, mean, fitness (population
        order), best_id; with the pareto objective also front (the ids of its front)."""
        return copy.deepcopy(self._history)

    # -- ask / tell --------------------------------------------------------------------------

    def ask(self) -> list[Candidate]:
        """Candidates to evaluate next; the same list until told; empty once the search is done."""
        if self._pending or self._phase == "done":
            return list(self._pending)
        if self._phase == "initial":
            size = self._config.initial_evaluations
            genes = (
                anchor_genes(self._num_blocks, self._config.anchor_set)[:size]
                if self._config.anchors
                else []
            )
            if self._fits is not None:
                genes = self._anchors_within_budget(genes)
            genes += [self._random_valid_genes() for _ in range(size - len(genes))]
            self._pending = [self._new_candidate(g, Role.INITIAL) for g in genes]
        elif self._phase == "elite":
            self._pending = self._ask_elite()
        else:
            self._pending = self._ask_children()
        return list(self._pending)

    def tell(self, fitness: Mapping[int, float]) -> None:
        """Record the fitness of every pending candidate (NaN counts as the worst, 1.0).

        Candidates are processed in id order, so the result does not depend on the order in
        which a parallel runner got its results.
        """
        if not self._pending:
            raise BioTuneError("tell() without pending candidates: call ask() first")
        expected = [c.id for c in self._pending]
        missing = [i for i in expected if i not in fitness]
        if missing:
            raise BioTuneError(f"tell() is missing the fitness of candidates {missing}")
        unknown = sorted(int(i) for i in set(fitness) - set(expected))
        if unknown:
            raise BioTuneError(f"tell() got fitness for candidates that are not pending: {unknown}")
        told = [(c, _checked_fitness(c.id, fitness[c.id])) for c in self._pending]
        self._pending = []
        if self._phase == "initial":
            self._finish_generation(told)
        elif self._phase == "elite":
            self._tell_elite(told)
        else:
            self._tell_children(told)

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole state as JSON-serialisable values, random generator included."""
        return {
            "format": _STATE_FORMAT,
            "num_blocks": self._num_blocks,
            "seed": self._seed,
            "config": self._config.to_dict(),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "next_id": self._next_id,
            "generation": self._generation,
            "phase": self._phase,
            "population": [[candidate_to_dict(c), f] for c, f in self._population],
            "extinction": list(self._extinction),
            "pending": [candidate_to_dict(c) for c in self._pending],
            "survivors": [[candidate_to_dict(c), f] for c, f in self._survivors],
            "elite_fitness": list(self._elite_fitness),
            "children": [[candidate_to_dict(c), f] for c, f in self._children],
            "pool": list(self._pool),
            "history": copy.deepcopy(self._history),
        }

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        *,
        fits: Callable[[Genes], bool] | None = None,
        cost: Callable[[Genes], float] | None = None,
    ) -> BioTuneEvolution:
        """Rebuild a search saved by ``state_dict()``; it continues bit-identically (given the
        ``fits`` and ``cost`` it was made with)."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise BioTuneError(f"not a BioTune evolution state of format {_STATE_FORMAT}")
        try:
            evo = cls(
                state["num_blocks"],
                EvolutionConfig(**state["config"]),
                state["seed"],
                fits=fits,
                cost=cost,
            )
            evo._rng.bit_generator.state = copy.deepcopy(dict(state["rng"]))
            evo._next_id = int(state["next_id"])
            evo._generation = int(state["generation"])
            evo._phase = str(state["phase"])
            evo._population = [(candidate_from_dict(c), float(f)) for c, f in state["population"]]
            evo._extinction = [float(p) for p in state["extinction"]]
            evo._pending = [candidate_from_dict(c) for c in state["pending"]]
            evo._survivors = [(candidate_from_dict(c), float(f)) for c, f in state["survivors"]]
            evo._elite_fitness = [float(f) for f in state["elite_fitness"]]
            evo._children = [(candidate_from_dict(c), float(f)) for c, f in state["children"]]
            evo._pool = [int(i) for i in state["pool"]]
            evo._history = copy.deepcopy(list(state["history"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BioTuneError(f"not a BioTune evolution state: {exc!r}") from exc
        if evo._phase not in ("initial", "elite", "children", "done"):
            raise BioTuneError(f"not a BioTune evolution state: unknown phase {evo._phase!r}")
        return evo

    # -- the algorithm -----------------------------------------------------------------------

    def _new_candidate(
        self, genes: np.ndarray, role: Role, parents: tuple[int, ...] = ()
    ) -> Candidate:
        candidate = Candidate(self._next_id, genes, self._generation, role, parents)
        self._next_id += 1
        return candidate

    def _random_valid_genes(self) -> np.ndarray:
        """Uniform genes that select a block (and fit the budget, after repair if need be)."""
        redraws = 0
        while True:
            genes = self._rng.random(self._num_blocks + 1)
            if not np.any(genes[:-1] > genes[-1]):
                continue
            fitted = self._within_budget(genes)
            if fitted is not None:
                return fitted
            redraws += 1
            if redraws >= _MAX_REDRAWS:
                raise BioTuneError(
                    f"no genome within the budget in {_MAX_REDRAWS} random draws: the budget "
                    "admits almost no plan; loosen it"
                )

    def _within_budget(self, genes: np.ndarray) -> np.ndarray | None:
        """``genes`` if they fit the budget (or there is none), else repaired; None if no
        repair fits. Uses no random numbers, so a budget that everything fits changes nothing."""
        if self._fits is None or self._fits(genes):
            return genes
        return _repair(genes, self._fits)

    def _anchors_within_budget(self, anchors: list[np.ndarray]) -> list[np.ndarray]:
        """The anchors repaired to fit (full fine-tuning becomes as many of the top blocks as
        fit), without duplicates; random genomes take the places of those left out."""
        out: list[np.ndarray] = []
        for genes in anchors:
            fitted = self._within_budget(genes)
            if fitted is not None and not any(_same_plan(fitted, g) for g in out):
                out.append(fitted)
        return out

    def _point(self, candidate: Candidate, fitness: float) -> tuple[float, float]:
        """(fitness, cost) for Pareto comparisons; a genome that trains nothing costs nothing
        but is worth nothing either, so it is put behind every plan."""
        assert self._cost is not None
        if not candidate.valid:
            return (fitness, math.inf)
        return (fitness, float(self._cost(candidate.genes)))

    def _ask_elite(self) -> list[Candidate]:
        """Each elite, re-evaluated on this generation's fold, and its two local variants."""
        step = float(self._config.local_search_step)
        asked = []
        for elite, _ in self._population[: self._config.elite]:
            asked.append(self._new_candidate(elite.genes, Role.ELITE, (elite.id,)))
            gene = self._local_search_gene(elite.genes)
            delta = step * self._rng.uniform(-1.0, 1.0)
            for sign in (1.0, -1.0):
                genes = elite.genes.copy()
                genes[gene] = np.clip(genes[gene] + sign * delta, 0.0, 1.0)
                # A variant no repair brings within the budget falls back on the elite itself
                # (memoised by the runner, so it costs nothing).
                fitted = self._within_budget(genes)
                genes = elite.genes.copy() if fitted is None else fitted
                asked.append(self._new_candidate(genes, Role.LOCAL, (elite.id,)))
        return asked

    def _local_search_gene(self, genes: np.ndarray) -> int:
        """A random selected block gene; any block gene if an (invalid) elite selects none."""
        selected = np.flatnonzero(genes[:-1] > genes[-1])
        if selected.size == 0:
            selected = np.arange(self._num_blocks)
        return int(selected[self._rng.integers(selected.size)])

    def _tell_elite(self, told: list[tuple[Candidate, float]]) -> None:
        for start in range(0, len(told), 3):
            trio = told[start : start + 3]
            self._elite_fitness.append(trio[0][1])
            if self._config.objective == "pareto":
                # A variant replaces its elite only if it dominates it (the same fold's scores).
                original = self._point(*trio[0])
                better = [cf for cf in trio[1:] if dominates(self._point(*cf), original)]
                survivor = min(better, key=lambda cf: self._point(*cf)) if better else trio[0]
                self._survivors.append(survivor)
            else:
                # Strictly better only: on ties the re-evaluated original (listed first) is kept.
                self._survivors.append(min(trio, key=lambda cf: cf[1]))
        self._phase = "children"

    def _ask_children(self) -> list[Candidate]:
        remaining = self._config.population_size - self._config.elite - len(self._children)
        batch = self._config.children_batch
        count = remaining if batch is None else min(batch, remaining)
        return [self._make_child() for _ in range(count)]

    def _make_child(self) -> Candidate:
        """Crossover, mutation and adoption of three rank-selected pool members.

        The paper's newcomer rule, kept as what it now is: a guard for a pool too small to
        give two parents and a prototype. With our fold correction only elites can leave the
        pool (``_update_pool``), so it never holds fewer than ``population_size - elite``
        members, and only children told before the next one is made can shrink it (with
        ``children_batch=None`` all are made first). So a newcomer comes only when
        ``population_size - elite <= 2`` (e.g. population 4, elite 2, children one at a time;
        or population 2), never in the presets (6 - 2, 10 - 3). We do not make it fire more
        often: that needs the other parents scored on this generation's fold (more
        evaluations) or compared across folds (the defect we correct); and we do not remove
        it, since those small configurations are valid and could not breed without it.
        """
        if len(self._pool) <= 2:
            return self._new_candidate(self._random_valid_genes(), Role.IMMIGRANT)
        picks = _linear_ranking_draw(self._rng, len(self._pool), 3)
        index_a, index_b, index_proto = (self._pool[k] for k in picks)
        a = self._population[index_a][0]
        b = self._population[index_b][0]
        prototype = self._population[index_proto][0]
        extinction = 0.5 * (self._extinction[index_a] + self._extinction[index_b])
        genes = _crossover(self._rng, a.genes, b.genes)
        genes = _mutate(self._rng, genes, extinction)
        genes = _adopt(self._rng, genes, a.genes, b.genes, prototype.genes)
        fitted = self._within_budget(genes)
        if fitted is None:  # none of its blocks fits the budget: a random newcomer instead
            return self._new_candidate(self._random_valid_genes(), Role.IMMIGRANT)
        return self._new_candidate(fitted, Role.CHILD, (a.id, b.id, prototype.id))

    def _tell_children(self, told: list[tuple[Candidate, float]]) -> None:
        for child, fitness in told:
            self._children.append((child, fitness))
            if child.role == Role.CHILD:
                self._update_pool(child, fitness)
        if len(self._children) == self._config.population_size - self._config.elite:
            self._finish_generation(self._survivors + self._children)

    def _update_pool(self, child: Candidate, fitness: float) -> None:
        """A parent beaten by its child leaves the mating pool, if both were scored on one fold.

        Our correction of the authors' fold defect: only elites have a score on this
        generation's fold (their re-evaluation), so only they can be beaten; the other parents
        carry previous-fold scores, are never compared, and stay in the pool. The prototype is
        not a parent and is never removed.
        """
        index_of = {c.id: i for i, (c, _) in enumerate(self._population)}
        for parent_id in child.parents[:2]:
            index = index_of[parent_id]
            if (
                index < len(self._elite_fitness)
                and index in self._pool
                and self._beats(child, fitness, index)
            ):
                self._pool.remove(index)

    def _beats(self, child: Candidate, fitness: float, elite_index: int) -> bool:
        """Whether a child beats an elite scored on its fold: lower fitness, or with the
        pareto objective, domination in (fitness, cost)."""
        elite_fitness = self._elite_fitness[elite_index]
        if self._config.objective != "pareto":
            return fitness < elite_fitness
        elite = self._population[elite_index][0]
        return dominates(self._point(child, fitness), self._point(elite, elite_fitness))

    def _finish_generation(self, members: list[tuple[Candidate, float]]) -> None:
        # Only the initial generation can be larger than the population (``initial_size``).
        pareto = self._config.objective == "pareto"
        if pareto:
            points = [self._point(c, f) for c, f in members]
            order = pareto_order(points, [c.id for c, _ in members])
            ranked = [members[i] for i in order][: self._config.population_size]
        else:
            ranked = sorted(members, key=lambda cf: (cf[1], cf[0].id))
            ranked = ranked[: self._config.population_size]
        fitness = [f for _, f in ranked]
        self._population = ranked
        if pareto:  # by rank: the best 0 .. the worst 1, as the paper's formula gives by fitness
            self._extinction = np.linspace(0.0, 1.0, len(ranked)).tolist()
        else:
            self._extinction = _extinction_probabilities(fitness).tolist()
        best, best_fitness = self.best
        summary = {
            "generation": self._generation,
            "best": best_fitness,
            "mean": float(np.mean(fitness)),
            "fitness": fitness,
            "best_id": best.id,
        }
        if pareto:
            summary["front"] = [c.id for c, _ in self.front]
        self._history.append(summary)
        self._survivors, self._elite_fitness, self._children = [], [], []
        if self._generation >= self._config.generations:
            self._phase = "done"
            self._pool = []
            return
        self._generation += 1
        self._pool = list(range(len(ranked)))
        self._phase = "elite" if self._config.elite > 0 else "children"

    def _pool_ids(self) -> list[int]:
        """Candidate ids in the mating pool, best first (for tests and debugging)."""
        return [self._population[i][0].id for i in self._pool]


def anchor_genes(num_blocks: int, anchor_set: str = "basic") -> list[np.ndarray]:
    """The plans ``EvolutionConfig.anchors`` puts first, in this order: full fine-tuning, the top
    half of the blocks, linear probing, as genomes for ``num_blocks`` blocks (genes 0.5: base rate).
    ``anchor_set="wide"`` adds the practitioner's plans at other rates: full fine-tuning at x0.3
    and x3, layer-wise lr decay (the head at x1, each block below at 0.8 times the rate of the
    block above) and linear probing at x10 (a new head usually wants a higher rate).

    Frozen blocks get gene 0 and the threshold gene is half the lowest trained gene (0.25 for
    the basic set), so every anchor decodes exactly; duplicates (one block) are dropped.
    """
    names = [f"b{i}" for i in range(num_blocks)]
    plans = [
        FineTunePlan.full(names),
        FineTunePlan(tuple(BlockSetting(n, i >= num_blocks // 2) for i, n in enumerate(names))),
        FineTunePlan.head_only(names),
    ]
    if anchor_set == "wide":
        plans += [
            _scaled(FineTunePlan.full(names), 0.3),
            _scaled(FineTunePlan.full(names), 3.0),
            FineTunePlan.layer_decay(names, 0.8),
            _scaled(FineTunePlan.head_only(names), 10.0),
        ]
    out: list[np.ndarray] = []
    for plan in plans:
        genes = encode_plan(plan)
        if not any(np.array_equal(genes, g) for g in out):
            out.append(genes)
    return out


def _scaled(plan: FineTunePlan, factor: float) -> FineTunePlan:
    return FineTunePlan(
        tuple(BlockSetting(b.name, b.train, b.lr_mult * factor) for b in plan.blocks)
    )


def _repair(genes: np.ndarray, fits: Callable[[Genes], bool]) -> np.ndarray | None:
    """Keep the most important trained blocks that fit the budget together, freeze the others.

    Blocks are taken by gene, highest first (ties: the later block first, so full fine-tuning
    becomes its top blocks), each kept if the plan with it still fits. A frozen block's gene is
    set to the threshold, the least change that freezes it; the others keep theirs, learning
    rates included. None if not one of the trained blocks fits alone.
    """
    threshold = genes[-1]
    trained = [int(b) for b in np.flatnonzero(genes[:-1] > threshold)]
    order = sorted(trained, key=lambda b: (-genes[b], -b))

    def only(kept: list[int]) -> np.ndarray:
        out = genes.copy()
        for b in trained:
            if b not in kept:
                out[b] = threshold
        return out

    kept: list[int] = []
    for block in order:
        if fits(only([*kept, block])):
            kept.append(block)
    return only(kept) if kept else None


def _same_plan(a: np.ndarray, b: np.ndarray) -> bool:
    """Two genomes that train the same blocks at the same rates (the genes of frozen blocks
    and the threshold may differ)."""
    trained_a, trained_b = a[:-1] > a[-1], b[:-1] > b[-1]
    return bool(
        np.array_equal(trained_a, trained_b)
        and np.array_equal(a[:-1][trained_a], b[:-1][trained_b])
    )


def _checked_fitness(candidate_id: int, value: float) -> float:
    value = float(value)
    if math.isnan(value):
        return 1.0
    if not 0.0 <= value <= 1.0:
        raise BioTuneError(
            f"fitness must be in [0, 1] (1 - accuracy; got {value} for candidate {candidate_id})"
        )
    return value


def _linear_ranking_draw(rng: np.random.Generator, size: int, count: int) -> list[int]:
    """Distinct positions of a best-first list; rank r of N is drawn with weight N - r."""
    if not 0 < count <= size:
        raise BioTuneError(f"cannot draw {count} distinct members from {size}")
    weights = np.arange(size, 0, -1, dtype=np.float64)
    picks = []
    for _ in range(count):
        cumulative = np.cumsum(weights)
        pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        picks.append(pick)
        weights[pick] = 0.0
    return picks


def _crossover(rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per gene, a random convex combination of the two parents."""
    w = rng.random(a.size)
    return w * a + (1.0 - w) * b


def _mutate(rng: np.random.Generator, genes: np.ndarray, extinction: float) -> np.ndarray:
    """Parents likely to go extinct mutate their children more often and further."""
    n = genes.size
    probability = (extinction * (n - 1) + 1.0) / n
    hit = rng.random(n) < probability
    change = rng.uniform(-1.0, 1.0, n) * extinction
    return genes + np.where(hit, change, 0.0)


def _adopt(
    rng: np.random.Generator,
    child: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    prototype: np.ndarray,
) -> np.ndarray:
    """Pull the child part of the way toward its parents' mean and toward the prototype."""
    to_parents, to_prototype = rng.random(2)
    moved = child + to_parents * (0.5 * (a + b) - child) + to_prototype * (prototype - child)
    return np.clip(moved, 0.0, 1.0)


def _extinction_probabilities(sorted_fitness: list[float] | np.ndarray) -> np.ndarray:
    """p_i = (f_i + f_min * (i / (N - 1) - 1)) / f_max over a best-first population: 0 .. 1."""
    f = np.asarray(sorted_fitness, dtype=np.float64)
    if f.size < 2 or f.max() <= 0.0:
        return np.zeros(f.size)
    rank = np.arange(f.size) / (f.size - 1)
    return np.clip((f + f.min() * (rank - 1.0)) / f.max(), 0.0, 1.0)


def candidate_to_dict(candidate: Candidate) -> dict[str, Any]:
    """A candidate as stored in a saved state (JSON values)."""
    return {
        "id": candidate.id,
        "genes": candidate.genes.tolist(),
        "generation": candidate.generation,
        "role": candidate.role.value,
        "parents": list(candidate.parents),
    }


def candidate_from_dict(data: Mapping[str, Any]) -> Candidate:
    """The inverse of ``candidate_to_dict``."""
    return Candidate(
        int(data["id"]),
        np.asarray(data["genes"], dtype=np.float64),
        int(data["generation"]),
        str(data["role"]),
        tuple(int(p) for p in data["parents"]),
    )
