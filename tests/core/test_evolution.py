"""The evolutionary search: the paper's operators, our fold corrections, and exact resume."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from biotune.core.evolution import (
    BioTuneEvolution,
    Candidate,
    EvolutionConfig,
    _crossover,
    _extinction_probabilities,
    _linear_ranking_draw,
    anchor_genes,
)
from biotune.core.plan import decode_genome
from biotune.errors import BioTuneError

NUM_BLOCKS = 5
TARGET = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.4])  # blocks 0, 2, 4 selected, threshold 0.4


def toy_fitness(candidate: Candidate) -> float:
    """Distance to a target genome; an invalid genome gets the worst fitness, as from the runner."""
    if not candidate.valid:
        return 1.0
    return float(np.mean(np.abs(candidate.genes - TARGET)))


def drive(
    evo: BioTuneEvolution, steps: int | None = None, reverse: bool = False, fitness=None
) -> list:
    """Run ask/tell rounds (all of them, or `steps`); return the asked batches."""
    fitness = fitness or (toy_fitness if evo.num_blocks == NUM_BLOCKS else budget_fitness)
    asked = []
    while steps is None or len(asked) < steps:
        batch = evo.ask()
        if not batch:
            break
        asked.append(batch)
        told = {c.id: fitness(c) for c in batch}
        if reverse:
            told = dict(reversed(list(told.items())))
        evo.tell(told)
    return asked


def finish_initial(evo: BioTuneEvolution) -> None:
    fitness = toy_fitness if evo.num_blocks == NUM_BLOCKS else budget_fitness
    evo.tell({c.id: fitness(c) for c in evo.ask()})


# -- genome and initial population ---------------------------------------------------------------


def test_genome_selecting_no_block_is_invalid():
    assert not Candidate(0, np.array([0.2, 0.3, 0.5]), 0, "initial").valid
    assert not Candidate(0, np.array([0.5, 0.5]), 0, "initial").valid  # equal is not above
    assert Candidate(0, np.array([0.2, 0.6, 0.5]), 0, "initial").valid


def test_candidate_rejects_genes_outside_unit_interval_and_unknown_roles():
    with pytest.raises(BioTuneError, match=r"\[0, 1\]"):
        Candidate(0, np.array([0.2, 1.1]), 0, "initial")
    with pytest.raises(BioTuneError, match="role"):
        Candidate(0, np.array([0.2, 0.1]), 0, "mutant")


def test_candidate_genes_are_read_only():
    candidate = Candidate(0, np.array([0.2, 0.1]), 0, "initial")
    with pytest.raises(ValueError):
        candidate.genes[0] = 0.5


def test_anchors_start_the_initial_population_with_the_textbook_plans():
    names = [f"b{i}" for i in range(6)]
    evo = BioTuneEvolution(len(names), EvolutionConfig(population_size=5, anchors=True), seed=3)
    asked = evo.ask()
    plans = [decode_genome(c.genes, names) for c in asked]
    assert [p.trained for p in plans[:3]] == [tuple(names), tuple(names[3:]), (names[-1],)]
    assert all(b.lr_mult == pytest.approx(1.0) for p in plans[:3] for b in p.blocks if b.train)
    assert all(c.valid for c in asked)
    random_genes = [c.genes for c in BioTuneEvolution(len(names), seed=3).ask()]
    assert not any(np.array_equal(asked[3].genes, g) for g in anchor_genes(len(names)))
    # The anchors take the first slots; the random draws follow, in the same order as without.
    assert [c.genes.tolist() for c in asked[3:]] == [g.tolist() for g in random_genes[:2]]


def test_anchors_fill_a_small_population_and_collapse_for_one_block():
    evo = BioTuneEvolution(4, EvolutionConfig(population_size=2, elite=1, anchors=True), seed=0)
    assert [c.genes.tolist() for c in evo.ask()] == [g.tolist() for g in anchor_genes(4)[:2]]
    assert len(anchor_genes(1)) == 1


def test_a_larger_initial_sample_keeps_the_best_population_size_genomes():
    config = EvolutionConfig(population_size=4, elite=1, generations=1, initial_size=9)
    evo = BioTuneEvolution(NUM_BLOCKS, config, seed=2)
    initial = evo.ask()
    assert len(initial) == 9 and config.total_evaluations == 9 + (3 + 3)
    fitness = {c.id: toy_fitness(c) for c in initial}
    evo.tell(fitness)
    kept = [c.id for c, _ in evo.population]
    assert kept == sorted(fitness, key=lambda i: (fitness[i], i))[:4]
    # The same draws start the sample as a population_size initial generation would.
    plain = BioTuneEvolution(NUM_BLOCKS, replace(config, initial_size=None), seed=2).ask()
    assert [c.genes.tolist() for c in plain] == [c.genes.tolist() for c in initial[:4]]
    # The elites of generation 1 come from the kept four, and the children fill only those.
    assert len(drive(evo)) == 2 and len(evo.population) == 4


def test_an_unset_initial_size_is_left_out_of_stored_settings_so_old_runs_resume():
    assert "initial_size" not in EvolutionConfig().to_dict()
    for config in (EvolutionConfig(), EvolutionConfig(population_size=4, initial_size=7)):
        assert EvolutionConfig(**config.to_dict()) == config


@pytest.mark.parametrize("seed", range(5))
def test_initial_population_is_valid_and_in_unit_interval(seed):
    # One block: half of all uniform genomes select nothing, so resampling is exercised.
    evo = BioTuneEvolution(1, EvolutionConfig(population_size=30), seed=seed)
    initial = evo.ask()
    assert len(initial) == 30
    for candidate in initial:
        assert candidate.valid
        assert candidate.genes.shape == (2,)
        assert candidate.genes.dtype == np.float64
        assert np.all((candidate.genes >= 0) & (candidate.genes <= 1))
        assert (candidate.generation, candidate.role, candidate.parents) == (0, "initial", ())


def test_candidate_ids_are_unique_and_increase_in_order_of_creation():
    ids = [c.id for batch in drive(BioTuneEvolution(NUM_BLOCKS, seed=1)) for c in batch]
    assert ids == list(range(len(ids)))


def test_ask_twice_without_tell_returns_the_same_pending_list():
    evo = BioTuneEvolution(NUM_BLOCKS, seed=2)
    assert evo.ask() == evo.ask()
    finish_initial(evo)
    first = evo.ask()
    assert evo.ask() == first


# -- generation structure ------------------------------------------------------------------------


@pytest.mark.parametrize("children_batch", [None, 1, 3])
def test_each_generation_asks_three_per_elite_then_fills_the_population(children_batch):
    config = EvolutionConfig(
        population_size=7, generations=4, elite=2, children_batch=children_batch
    )
    evo = BioTuneEvolution(NUM_BLOCKS, config, seed=3)
    per_generation: dict[int, list[Candidate]] = {}
    for batch in drive(evo):
        for candidate in batch:
            per_generation.setdefault(candidate.generation, []).append(candidate)
    assert sorted(per_generation) == list(range(5))
    assert len(per_generation[0]) == 7
    for generation in range(1, 5):
        roles = [c.role for c in per_generation[generation]]
        assert roles[:6] == ["elite", "local", "local"] * 2
        assert len(roles) == 3 * 2 + 7 - 2
        assert set(roles[6:]) <= {"child", "immigrant"}
    total = sum(len(batch) for batch in per_generation.values())
    assert total == config.total_evaluations == 7 + 4 * (3 * 2 + 7 - 2)
    assert evo.done and evo.ask() == []
    assert len(evo.population) == 7


def test_paper_defaults_cost_matches_the_protocol():
    assert EvolutionConfig().total_evaluations == 10 + 10 * (3 * 3 + 10 - 3)


def test_zero_generations_is_done_after_the_initial_population():
    evo = BioTuneEvolution(NUM_BLOCKS, EvolutionConfig(generations=0), seed=4)
    assert not evo.done
    finish_initial(evo)
    assert evo.done and evo.ask() == []
    assert evo.generation == 0
    assert len(evo.history) == 1


def test_elite_phase_reevaluates_elites_and_perturbs_one_selected_block_gene():
    config = EvolutionConfig(population_size=8, generations=3, elite=3, local_search_step=0.25)
    evo = BioTuneEvolution(NUM_BLOCKS, config, seed=5)
    finish_initial(evo)
    for _ in range(config.generations):
        elites = [c for c, _ in evo.population[:3]]
        asked = evo.ask()
        assert len(asked) == 9
        for elite, trio in zip(elites, (asked[0:3], asked[3:6], asked[6:9]), strict=True):
            same, plus, minus = trio
            assert same.role == "elite" and plus.role == "local" and minus.role == "local"
            assert same.parents == plus.parents == minus.parents == (elite.id,)
            assert np.array_equal(same.genes, elite.genes)
            changed = np.flatnonzero((plus.genes != elite.genes) | (minus.genes != elite.genes))
            # Exactly one gene moves (no budget here, so no variant falls back to its elite).
            assert changed.size == 1
            gene = changed[0]
            assert gene < NUM_BLOCKS  # never the threshold
            if np.any(elite.genes[:-1] > elite.genes[-1]):
                assert elite.genes[gene] > elite.genes[-1]  # a selected block
            up = plus.genes[gene] - elite.genes[gene]
            down = minus.genes[gene] - elite.genes[gene]
            assert abs(up) <= 0.25 and abs(down) <= 0.25 and up * down <= 0
            if 0 < plus.genes[gene] < 1 and 0 < minus.genes[gene] < 1:
                assert up == pytest.approx(-down)
        evo.tell({c.id: toy_fitness(c) for c in asked})
        drive(evo, steps=1)  # the children


def test_local_search_keeps_the_best_of_three_and_the_original_on_ties():
    config = EvolutionConfig(population_size=5, generations=1, elite=2)
    evo = BioTuneEvolution(NUM_BLOCKS, config, seed=6)
    finish_initial(evo)
    asked = evo.ask()
    # Elite 0: a tie with its local variants keeps the original; elite 1: minus variant wins.
    told = {asked[0].id: 0.3, asked[1].id: 0.3, asked[2].id: 0.3}
    told |= {asked[3].id: 0.4, asked[4].id: 0.5, asked[5].id: 0.2}
    evo.tell(told)
    children = evo.ask()
    evo.tell({c.id: 0.9 for c in children})
    members = {c.id: f for c, f in evo.population}
    assert members[asked[0].id] == 0.3 and members[asked[5].id] == 0.2
    for dropped in (asked[1], asked[2], asked[3], asked[4]):
        assert dropped.id not in members
    assert evo.best[0] == asked[5]


# -- operators -----------------------------------------------------------------------------------


def test_extinction_probabilities_are_zero_for_the_best_one_for_the_worst_and_monotone():
    rng = np.random.default_rng(0)
    for _ in range(50):
        fitness = np.sort(rng.uniform(0, 1, size=rng.integers(2, 15)))
        p = _extinction_probabilities(fitness)
        assert p[0] == 0.0 and p[-1] == pytest.approx(1.0)
        assert np.all(np.diff(p) >= 0)
    assert np.array_equal(_extinction_probabilities([0.0, 0.0, 0.0]), np.zeros(3))
    assert np.allclose(_extinction_probabilities([0.5, 0.5, 0.5]), [0.0, 0.5, 1.0])


def test_extinction_starts_at_zero_then_follows_the_population():
    evo = BioTuneEvolution(NUM_BLOCKS, seed=7)
    assert evo._extinction == []
    finish_initial(evo)
    assert evo._extinction[0] == 0.0 and evo._extinction[-1] == pytest.approx(1.0)


def test_linear_ranking_prefers_better_ranks():
    rng = np.random.default_rng(123)
    size, draws = 5, 30_000
    first = np.zeros(size)
    for _ in range(draws):
        picks = _linear_ranking_draw(rng, size, 3)
        assert len(set(picks)) == 3
        first[picks[0]] += 1
    expected = (size - np.arange(size)) / (size * (size + 1) / 2)
    assert np.all(np.diff(first) < 0)
    assert np.allclose(first / draws, expected, atol=0.01)


def test_crossover_lies_between_the_parents_gene_wise():
    rng = np.random.default_rng(9)
    for _ in range(200):
        a, b = rng.random(6), rng.random(6)
        child = _crossover(rng, a, b)
        assert np.all(child >= np.minimum(a, b) - 1e-12)
        assert np.all(child <= np.maximum(a, b) + 1e-12)


def test_children_record_two_distinct_parents_and_a_distinct_prototype():
    evo = BioTuneEvolution(NUM_BLOCKS, EvolutionConfig(generations=3), seed=10)
    finish_initial(evo)
    children = 0
    while not evo.done:
        previous_ids = {c.id for c, _ in evo.population}
        for child in (c for c in evo.ask() if c.role == "child"):
            children += 1
            assert len(set(child.parents)) == 3
            assert set(child.parents) <= previous_ids
            assert np.all((child.genes >= 0) & (child.genes <= 1))
        drive(evo, steps=1)
    assert children > 0


# -- mating pool ---------------------------------------------------------------------------------


def _to_first_child(seed: int, elite_fitness: float) -> tuple[BioTuneEvolution, list[int], set]:
    config = EvolutionConfig(population_size=6, generations=2, elite=3, children_batch=1)
    evo = BioTuneEvolution(NUM_BLOCKS, config, seed=seed)
    finish_initial(evo)
    elite_ids = {c.id for c, _ in evo.population[:3]}
    evo.tell({c.id: elite_fitness for c in evo.ask()})
    return evo, evo._pool_ids(), elite_ids


def test_child_that_beats_an_elite_parent_removes_it_from_the_mating_pool():
    removals = 0
    for seed in range(10):
        evo, pool_before, elite_ids = _to_first_child(seed, elite_fitness=0.5)
        (child,) = evo.ask()
        evo.tell({child.id: 0.1})
        beaten = {p for p in child.parents[:2] if p in elite_ids}
        assert evo._pool_ids() == [i for i in pool_before if i not in beaten]
        removals += len(beaten)
    assert removals > 0


def test_non_elite_parents_and_the_prototype_are_never_compared():
    """Non-elite parents only have a score from the previous fold: they always stay."""
    for seed in range(10):
        evo, pool_before, elite_ids = _to_first_child(seed, elite_fitness=0.5)
        (child,) = evo.ask()
        evo.tell({child.id: 0.0})
        kept = [p for p in child.parents[:2] if p not in elite_ids] + [child.parents[2]]
        assert set(kept) <= set(evo._pool_ids())


def test_child_that_does_not_beat_its_elite_parents_removes_nothing():
    for seed in range(5):
        evo, pool_before, _ = _to_first_child(seed, elite_fitness=0.5)
        (child,) = evo.ask()
        evo.tell({child.id: 0.5})  # a tie does not beat
        assert evo._pool_ids() == pool_before


def test_pool_is_refilled_with_the_whole_population_each_generation():
    evo, _, _ = _to_first_child(0, elite_fitness=0.5)
    for _ in range(3):
        (child,) = evo.ask()
        evo.tell({child.id: 0.0})
    assert evo.generation == 2
    assert evo._pool_ids() == [c.id for c, _ in evo.population]


def test_immigrants_replace_children_when_the_pool_has_two_or_fewer_members():
    evo = BioTuneEvolution(NUM_BLOCKS, EvolutionConfig(population_size=2, elite=1), seed=11)
    children = [c for batch in drive(evo) for c in batch if c.generation > 0]
    produced = [c for c in children if c.role not in ("elite", "local")]
    assert produced and all(c.role == "immigrant" and c.valid for c in produced)
    assert all(c.parents == () for c in produced)


def test_pool_shrinking_to_two_switches_to_immigrants():
    config = EvolutionConfig(population_size=4, generations=30, elite=2, children_batch=1)
    evo = BioTuneEvolution(NUM_BLOCKS, config, seed=12)
    finish_initial(evo)
    seen_immigrant = False
    while not evo.done:
        asked = evo.ask()
        if asked[0].role == "elite":
            evo.tell({c.id: 0.5 for c in asked})
            continue
        (candidate,) = asked
        assert candidate.role == ("immigrant" if len(evo._pool) <= 2 else "child")
        seen_immigrant |= candidate.role == "immigrant"
        evo.tell({candidate.id: 0.1})
    assert seen_immigrant


@pytest.mark.parametrize("name", ["default", "paper"])
def test_newcomers_never_come_in_the_presets_even_when_every_child_wins(name):
    """Only elites can leave the pool, so it keeps population - elite >= 3 members: the
    newcomer rule is a guard for smaller configurations (see ``_make_child``)."""
    from biotune.presets import preset

    config = preset(name).evolution
    evo = BioTuneEvolution(NUM_BLOCKS, config, seed=4)
    finish_initial(evo)
    smallest = config.population_size
    while not evo.done:
        asked = evo.ask()
        assert all(c.role != "immigrant" for c in asked)
        smallest = min(smallest, len(evo._pool))
        evo.tell({c.id: 0.5 if c.role in ("elite", "local") else 0.0 for c in asked})
    assert smallest >= config.population_size - config.elite >= 3


# -- determinism and resume ----------------------------------------------------------------------


def test_same_seed_gives_the_same_asks_and_another_seed_does_not():
    config = EvolutionConfig(generations=3)
    first = drive(BioTuneEvolution(NUM_BLOCKS, config, seed=13))
    again = drive(BioTuneEvolution(NUM_BLOCKS, config, seed=13))
    other = drive(BioTuneEvolution(NUM_BLOCKS, config, seed=14))
    assert first == again
    assert first != other


@pytest.mark.parametrize("children_batch", [None, 1, 2])
def test_order_of_the_told_fitness_does_not_change_the_search(children_batch):
    config = EvolutionConfig(generations=3, children_batch=children_batch)
    forward = BioTuneEvolution(NUM_BLOCKS, config, seed=15)
    backward = BioTuneEvolution(NUM_BLOCKS, config, seed=15)
    assert drive(forward) == drive(backward, reverse=True)
    assert forward.history == backward.history


@pytest.mark.parametrize(
    ("children_batch", "steps", "leave_pending"),
    [
        (None, 3, False),  # between generations 1 and 2
        (None, 4, False),  # generation 2, after the elite phase
        (None, 4, True),  # generation 2, children asked but not told
        (1, 5, False),  # generation 1, in the middle of the children
        (1, 5, True),
        (2, 0, True),  # initial population asked, not told
    ],
)
def test_state_round_trip_through_json_resumes_bit_identically(
    children_batch, steps, leave_pending
):
    config = EvolutionConfig(generations=4, children_batch=children_batch)
    original = BioTuneEvolution(NUM_BLOCKS, config, seed=16)
    drive(original, steps=steps)
    if leave_pending:
        assert original.ask()
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))
    resumed = BioTuneEvolution.from_state_dict(state)
    assert resumed.state_dict() == original.state_dict()
    assert drive(resumed) == drive(original)
    assert resumed.best == original.best
    assert resumed.history == original.history


def test_from_state_dict_rejects_foreign_data():
    with pytest.raises(BioTuneError):
        BioTuneEvolution.from_state_dict({"format": 99})
    state = BioTuneEvolution(NUM_BLOCKS).state_dict()
    del state["pool"]
    with pytest.raises(BioTuneError):
        BioTuneEvolution.from_state_dict(state)


@pytest.mark.parametrize("children_batch", [None, 1])
def test_sequential_and_parallel_children_both_complete(children_batch):
    config = EvolutionConfig(generations=3, children_batch=children_batch)
    evo = BioTuneEvolution(NUM_BLOCKS, config, seed=17)
    asked = drive(evo)
    children_asks = 1 if children_batch is None else config.population_size - config.elite
    assert len(asked) == 1 + config.generations * (1 + children_asks)
    assert evo.done and len(evo.history) == config.generations + 1


# -- tell ----------------------------------------------------------------------------------------


def test_nan_fitness_counts_as_the_worst():
    evo = BioTuneEvolution(NUM_BLOCKS, EvolutionConfig(generations=1), seed=18)
    initial = evo.ask()
    evo.tell({c.id: float("nan") if i == 0 else 0.5 for i, c in enumerate(initial)})
    candidate, fitness = evo.population[-1]
    assert candidate.id == initial[0].id and fitness == 1.0


def test_tell_rejects_missing_unknown_and_out_of_range_fitness():
    evo = BioTuneEvolution(NUM_BLOCKS, seed=19)
    with pytest.raises(BioTuneError, match="ask"):
        evo.tell({0: 0.5})
    initial = evo.ask()
    told = {c.id: 0.5 for c in initial}
    with pytest.raises(BioTuneError, match="missing"):
        evo.tell({c.id: 0.5 for c in initial[1:]})
    with pytest.raises(BioTuneError, match="not pending"):
        evo.tell(told | {999: 0.5})
    with pytest.raises(BioTuneError, match=r"\[0, 1\]"):
        evo.tell(told | {initial[0].id: 1.5})
    evo.tell(told)  # nothing was consumed by the rejected calls
    assert evo.generation == 1


def test_best_before_any_generation_is_an_error():
    with pytest.raises(BioTuneError, match="no generation"):
        _ = BioTuneEvolution(NUM_BLOCKS).best


def test_history_summarises_each_finished_generation():
    evo = BioTuneEvolution(NUM_BLOCKS, EvolutionConfig(generations=2), seed=20)
    drive(evo)
    history = evo.history
    assert [h["generation"] for h in history] == [0, 1, 2]
    for entry in history:
        assert entry["best"] == min(entry["fitness"]) == entry["fitness"][0]
        assert entry["mean"] == pytest.approx(np.mean(entry["fitness"]))
    assert history[-1]["best_id"] == evo.best[0].id
    assert history[-1]["fitness"] == [f for _, f in evo.population]
    json.dumps(history, allow_nan=False)


def test_search_improves_on_the_initial_population():
    evo = BioTuneEvolution(NUM_BLOCKS, EvolutionConfig(generations=15), seed=21)
    drive(evo)
    history = evo.history
    assert history[-1]["best"] < 0.5 * history[0]["best"]
    assert history[-1]["mean"] < history[0]["mean"]


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"population_size": 1}, "population_size"),
        ({"generations": -1}, "generations"),
        ({"elite": -1}, "elite"),
        ({"elite": 10, "population_size": 10}, r"elite must be smaller than population_size"),
        ({"local_search_step": 0.0}, "local_search_step"),
        ({"local_search_step": 1.5}, "local_search_step"),
        ({"local_search_step": float("nan")}, "local_search_step"),
        ({"children_batch": 0}, "children_batch"),
        ({"population_size": 2.5}, "population_size"),
        ({"anchors": 1}, "anchors"),
        ({"initial_size": 3, "population_size": 4}, "initial_size"),
        ({"initial_size": 5.0}, "initial_size"),
    ],
)
def test_bad_configs_raise_a_one_line_error_naming_the_setting(settings, message):
    with pytest.raises(BioTuneError, match=message) as error:
        EvolutionConfig(**settings)
    assert "\n" not in str(error.value)


def test_bad_search_arguments_raise():
    with pytest.raises(BioTuneError, match="num_blocks"):
        BioTuneEvolution(0)
    with pytest.raises(BioTuneError, match="seed"):
        BioTuneEvolution(NUM_BLOCKS, seed=-1)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], True),
        (["--preset", "paper"], False),
        (["--no-anchors"], False),
        (["--preset", "paper", "--anchors"], True),
    ],
)
def test_cli_anchors_follow_the_preset_unless_asked(argv, expected):
    from biotune.cli import build_parser
    from biotune.cli.search import search_config
    from biotune.presets import preset

    args = build_parser().parse_args(["search", *argv])
    assert search_config(args, preset(args.preset or "default")).evolution.anchors is expected


def test_cli_initial_size_reaches_the_evolution_and_a_too_small_one_is_refused():
    from biotune.cli import build_parser
    from biotune.cli.search import search_config
    from biotune.presets import preset

    args = build_parser().parse_args(["search", "--initial-size", "9"])
    assert search_config(args, preset(args.preset or "default")).evolution.initial_size == 9
    args = build_parser().parse_args(["search", "--initial-size", "3"])
    with pytest.raises(BioTuneError, match="initial_size must be None or an integer >= "):
        search_config(args, preset(args.preset or "default"))


# -- budgets and the pareto objective (beyond the paper) -----------------------------------------

# Parameters per block of a toy model (6 blocks), and a memory-like cost that is not additive:
# activations are kept from the first trained block on, so freezing a later block saves little.
BLOCK_PARAMS = np.array([2.0, 30.0, 25.0, 20.0, 18.0, 5.0])
BLOCK_ACTIVATIONS = np.array([50.0, 30.0, 20.0, 10.0, 5.0, 1.0])


def trained(genes: np.ndarray) -> np.ndarray:
    return genes[:-1] > genes[-1]


def share(genes: np.ndarray) -> float:
    return float(BLOCK_PARAMS[trained(genes)].sum() / BLOCK_PARAMS.sum())


def memory_like(genes: np.ndarray) -> float:
    mask = trained(genes)
    if not mask.any():
        return 0.0
    first = int(np.argmax(mask))
    return float(BLOCK_ACTIVATIONS[first:].sum() + 3 * BLOCK_PARAMS[mask].sum())


def budget_fitness(candidate: Candidate) -> float:
    """Training more parameters scores better, so the budget binds; the genes break ties."""
    if not candidate.valid:
        return 1.0
    genes = candidate.genes
    return float(0.9 - 0.6 * share(genes) + 0.05 * abs(genes[-1] - 0.5))


def within(limit: float, cost=share):  # noqa: ANN001, ANN201
    return lambda genes: not trained(genes).any() or cost(genes) <= limit


@pytest.mark.parametrize("anchors", [False, True])
@pytest.mark.parametrize("children_batch", [None, 1])
@pytest.mark.parametrize("objective", ["accuracy", "pareto"])
@pytest.mark.parametrize(("limit", "cost"), [(0.3, share), (0.05, share), (120.0, memory_like)])
def test_the_budget_is_never_violated_by_any_proposal(
    anchors, children_batch, objective, limit, cost
):
    fits = within(limit, cost)
    for seed in range(4):
        config = EvolutionConfig(
            population_size=5,
            generations=4,
            elite=2,
            anchors=anchors,
            children_batch=children_batch,
            objective=objective,
        )
        evo = BioTuneEvolution(len(BLOCK_PARAMS), config, seed=seed, fits=fits, cost=share)
        asked = [c for batch in drive(evo) for c in batch]
        assert len(asked) == config.total_evaluations
        assert all(fits(c.genes) for c in asked)
        assert all(0.0 <= g <= 1.0 for c in asked for g in c.genes)


def test_small_pools_immigrants_and_wide_initial_samples_respect_the_budget_too():
    fits = within(0.1)
    config = EvolutionConfig(
        population_size=4, generations=3, elite=2, children_batch=1, initial_size=7
    )
    evo = BioTuneEvolution(len(BLOCK_PARAMS), config, seed=3, fits=fits)
    asked = [c for batch in drive(evo) for c in batch]
    assert any(c.role == "immigrant" for c in asked)
    assert all(fits(c.genes) for c in asked)


@pytest.mark.parametrize(
    "config",
    [
        EvolutionConfig(generations=3),
        EvolutionConfig(population_size=6, generations=3, elite=2, anchors=True),
        EvolutionConfig(population_size=4, generations=3, elite=2, children_batch=1),
    ],
)
def test_a_budget_every_genome_fits_changes_nothing_random_stream_included(config):
    plain = BioTuneEvolution(NUM_BLOCKS, config, seed=5)
    loose = BioTuneEvolution(NUM_BLOCKS, config, seed=5, fits=lambda genes: True)
    assert drive(loose) == drive(plain)
    assert loose.state_dict() == plain.state_dict()


def test_repair_keeps_the_most_important_trained_blocks_that_fit_and_their_rates():
    from biotune.core.evolution import _repair

    #               blocks 0    1    2    3    4    5   threshold
    genes = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.95, 0.3])
    fixed = _repair(genes, within(0.25))
    # By importance: block 5 (5%), then 0 (2%), then 1 (30%: over), 2 (25%: over), 4 (18%: fits).
    assert trained(fixed).tolist() == [True, False, False, False, True, True]
    assert fixed[[0, 4, 5]].tolist() == [0.9, 0.6, 0.95]  # learning rates kept
    assert fixed[1] == fixed[2] == fixed[-1] == 0.3  # frozen at the threshold: the least change
    assert _repair(genes, lambda g: False) is None


def test_anchors_over_budget_become_the_top_blocks_that_fit_without_duplicates():
    config = EvolutionConfig(population_size=5, generations=0, anchors=True)
    evo = BioTuneEvolution(len(BLOCK_PARAMS), config, seed=0, fits=within(0.44))
    initial = evo.ask()
    plans = [tuple(int(b) for b in np.flatnonzero(trained(c.genes))) for c in initial]
    # Full fine-tuning keeps the head, then blocks 4 and 3 (43% in all; 2, 1, and even 0 at
    # 2%, would take it past 44%): the top half, which fits as it is. The duplicate is left out,
    # so linear probing comes second and three random genomes follow.
    assert plans[0] == (3, 4, 5) and plans[1] == (5,)
    assert len(plans) == 5 and [c.role for c in initial] == ["initial"] * 5


def test_the_pareto_objective_needs_a_cost_and_is_stored_only_when_chosen():
    with pytest.raises(BioTuneError, match="cost"):
        BioTuneEvolution(NUM_BLOCKS, EvolutionConfig(objective="pareto"))
    with pytest.raises(BioTuneError, match="objective"):
        EvolutionConfig(objective="speed")
    assert "objective" not in EvolutionConfig().to_dict()
    assert EvolutionConfig(objective="pareto").to_dict()["objective"] == "pareto"


def _pareto(seed: int = 0, **settings) -> BioTuneEvolution:
    config = EvolutionConfig(
        population_size=6, generations=3, elite=2, objective="pareto", **settings
    )
    return BioTuneEvolution(len(BLOCK_PARAMS), config, seed=seed, cost=share)


def test_pareto_generations_rank_the_front_first_with_its_ends_as_elites():
    from biotune.core.pareto import dominates

    evo = _pareto()
    finish_initial(evo)
    population = evo.population
    points = [(f, share(c.genes)) for c, f in population]
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    assert points[: len(front)] == sorted(front, key=points.index)  # the front comes first
    ends = {min(front, key=lambda p: (p[0], p[1])), min(front, key=lambda p: (p[1], p[0]))}
    assert set(points[:2]) == ends  # elites: the most accurate and the cheapest of the front
    assert evo.best[1] == min(f for _, f in population)  # best: the most accurate
    assert evo.history[-1]["front"] == [c.id for c, _ in evo.front]
    assert evo.history[-1]["best_id"] == evo.best[0].id


def test_pareto_local_variant_replaces_its_elite_only_if_it_dominates_it():
    evo = _pareto()
    finish_initial(evo)
    trios = evo.ask()
    elite, up, down = trios[:3]
    # Same cost, higher fitness: dominated, the elite stays; lower fitness: it dominates.
    told = {c.id: 0.5 for c in trios}
    told[up.id], told[down.id] = 0.6, 0.6
    evo.tell(told)
    assert np.array_equal(evo._survivors[0][0].genes, elite.genes)
    evo = _pareto()
    finish_initial(evo)
    trios = evo.ask()
    told = {c.id: 0.5 for c in trios}
    cheaper = [c for c in trios[1:3] if share(c.genes) <= share(trios[0].genes)]
    told[cheaper[0].id] = 0.4
    evo.tell(told)
    assert evo._survivors[0][0].id == cheaper[0].id


def _first_child_of_an_elite(dearer: bool) -> tuple[BioTuneEvolution, Candidate, Candidate]:
    """A Pareto search at its first child, one of whose parents is an elite that costs less
    (``dearer``: the child costs more) or at least as much as the child."""
    for seed in range(100):
        evo = _pareto(seed=seed, children_batch=1)
        finish_initial(evo)
        evo.tell({c.id: 0.5 for c in evo.ask()})
        child = evo.ask()[0]
        elites = {c.id: c for c, _ in evo.population[:2]}
        for parent in (elites[p] for p in child.parents[:2] if p in elites):
            if (share(child.genes) > share(parent.genes)) == dearer:
                return evo, child, parent
    raise AssertionError("no such child in 100 seeds")


@pytest.mark.parametrize("dearer", [False, True])
def test_pareto_child_removes_an_elite_parent_only_by_dominating_it(dearer):
    evo, child, parent = _first_child_of_an_elite(dearer)
    assert parent.id in evo._pool_ids()
    evo.tell({child.id: 0.1})  # more accurate than the elite's 0.5 on this fold
    # Dearer and more accurate: no domination, the elite stays in the pool; no dearer: it leaves.
    assert (parent.id in evo._pool_ids()) == dearer


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_pareto_and_budget_state_round_trips_and_resumes_bit_identically(steps):
    config = EvolutionConfig(
        population_size=5, generations=3, elite=2, objective="pareto", children_batch=1
    )
    fits = within(0.5)
    original = BioTuneEvolution(len(BLOCK_PARAMS), config, seed=9, fits=fits, cost=share)
    drive(original, steps=steps)
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))
    resumed = BioTuneEvolution.from_state_dict(state, fits=fits, cost=share)
    assert resumed.state_dict() == original.state_dict()
    assert drive(resumed) == drive(original)
    assert resumed.history == original.history
    assert [c.id for c, _ in resumed.front] == [c.id for c, _ in original.front]
