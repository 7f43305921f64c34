"""Random search and TPE: the evolution's ask / tell interface, anchors first, bit-identical
resumes, and as many evaluations as the evolution would make."""

from __future__ import annotations

import numpy as np
import pytest

from biotune.core.evolution import BioTuneEvolution, EvolutionConfig, anchor_genes
from biotune.core.plan import FineTunePlan, decode_genome
from biotune.core.samplers import SAMPLERS, RandomSearch, TPESearch
from biotune.errors import BioTuneError

CONFIG = EvolutionConfig(population_size=4, generations=2, elite=1, anchors=True, initial_size=5)


def _fitness(genes: np.ndarray) -> float:
    """A smooth toy objective: best when block 0 trains at gene 0.8 and block 3 is frozen."""
    return float(np.clip(abs(genes[0] - 0.8) + 0.5 * (genes[3] > genes[-1]), 0.0, 1.0))


def _run(search: BioTuneEvolution, stop_after: int | None = None) -> list[np.ndarray]:
    asked = []
    while not search.done:
        batch = search.ask()
        asked += [c.genes for c in batch]
        search.tell({c.id: _fitness(c.genes) for c in batch})
        if stop_after is not None and len(asked) >= stop_after:
            break
    return asked


@pytest.mark.parametrize("cls", [RandomSearch, TPESearch])
def test_a_sampler_asks_the_anchors_first_then_as_many_as_the_evolution(cls):
    asked = _run(cls(5, CONFIG, seed=1))
    assert len(asked) == CONFIG.total_evaluations
    anchors = anchor_genes(5)
    assert all(np.array_equal(a, b) for a, b in zip(asked, anchors, strict=False))
    assert all(np.any(g[:-1] > g[-1]) for g in asked)  # every genome selects a block
    assert len({tuple(g) for g in asked[len(anchors) :]}) == len(asked) - len(anchors)


@pytest.mark.parametrize("cls", [RandomSearch, TPESearch])
def test_a_resumed_sampler_proposes_what_the_uninterrupted_one_would(cls):
    whole = cls(5, CONFIG, seed=4)
    asked = _run(whole)
    first = cls(5, CONFIG, seed=4)
    head = _run(first, stop_after=8)
    resumed = cls.from_state_dict(first.state_dict())
    rest = _run(resumed)
    assert [g.tolist() for g in head + rest] == [g.tolist() for g in asked]
    assert resumed.state_dict() == whole.state_dict()


def test_population_and_history_rank_everything_seen():
    search = RandomSearch(5, CONFIG, seed=0)
    _run(search)
    seen = sorted(_fitness(c.genes) for c, _ in search._told)
    assert [f for _, f in search.population] == seen[: CONFIG.population_size]
    assert search.best[1] == seen[0]
    assert search.history[-1]["best_id"] == search.best[0].id
    assert len(search.history) == -(-CONFIG.total_evaluations // CONFIG.population_size)


def test_tpe_learns_more_than_random_on_a_smooth_objective():
    """TPE's proposals after its start-up draws concentrate near the optimum (a real model is
    used, not a stub): over three seeds its best is better than random search's."""
    config = EvolutionConfig(population_size=10, generations=4, elite=2)
    tpe = [TPESearch(5, config, seed=s) for s in range(3)]
    rnd = [RandomSearch(5, config, seed=s) for s in range(3)]
    for s in (*tpe, *rnd):
        _run(s)
    assert np.mean([s.best[1] for s in tpe]) < np.mean([s.best[1] for s in rnd])


def test_samplers_are_registered_and_refuse_the_pareto_objective_and_other_states():
    assert set(SAMPLERS) == {"evolution", "random", "tpe"}
    with pytest.raises(BioTuneError, match="accuracy only"):
        RandomSearch(3, EvolutionConfig(population_size=2, elite=0, objective="pareto"), cost=sum)
    with pytest.raises(BioTuneError, match="not the state of a tpe sampler"):
        TPESearch.from_state_dict(RandomSearch(3, CONFIG).state_dict())


def test_wide_anchors_hold_the_practitioners_plans_at_several_rates():
    names = [f"b{i}" for i in range(6)]
    plans = [decode_genome(g, names) for g in anchor_genes(6, "wide")]
    full = FineTunePlan.full(names)
    mults = {round(p.blocks[0].lr_mult, 6) for p in plans if p.trained == full.trained}
    assert {0.3, 1.0, 3.0} <= mults
    decay = next(p for p in plans if len({round(b.lr_mult, 6) for b in p.blocks}) == 6)
    assert decay.blocks[-1].lr_mult == pytest.approx(1.0)
    assert decay.blocks[0].lr_mult == pytest.approx(0.8**5)
    assert any(
        p.trained == (names[-1],) and p.blocks[-1].lr_mult == pytest.approx(10) for p in plans
    )
    assert [g.tolist() for g in anchor_genes(6, "wide")[:3]] == [
        g.tolist() for g in anchor_genes(6)
    ]
