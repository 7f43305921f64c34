"""Why a search's plan tests as it does: two checks behind benchmarks/search_cost/README.md.

``plans`` scores given plans by the default side's short evaluation (its protocol, early
termination off) on both folds of one search seed and, with ``--final``, by the final recipe
(validation and test balanced accuracy, final seeds 0, 1, 2): is the search failing to find good
plans, or does its short evaluation rank them wrongly?

``rerank`` re-scores the best distinct plans of finished searches with three seeds on the last
generation's fold: would more seeds at the end have picked another plan?

    python benchmarks/search_cost/diagnose.py plans --search-seed 2 --final "top-half x1" "neck x10"
    python benchmarks/search_cost/diagnose.py rerank runs/search_cost/default-649502ff5c

A plan is written as its trained blocks, ``"blocks.6 x10, neck x10"``, or ``"top-half xM"`` (the
upper half of the blocks, all at multiplier M) or ``"all xM"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from run import configs, parse_args  # run.py beside this script

from biotune.core.plan import BlockSetting, FineTunePlan, decode_genome, encode_plan
from biotune.errors import BioTuneError
from biotune.runner.config import SearchConfig
from biotune.runner.final import final_training_run, summarize_final
from biotune.runner.workbench import Workbench, evaluator_for, prepare

HERE = Path(__file__).resolve().parent


def parse_plan(text: str, names: tuple[str, ...]) -> FineTunePlan:
    """``"neck x10, head x2"`` or ``"top-half x3.16"`` -> a plan over ``names``."""
    groups = {"all": names, "top-half": names[len(names) // 2 :]}
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, mult = part.rpartition(" x")
        if not name:
            raise BioTuneError(f"plan {text!r}: expected 'BLOCK xMULT' parts (got {part!r})")
        for block in groups.get(name, (name,)):
            if block not in names:
                raise BioTuneError(f"plan {text!r}: unknown block {block!r}; blocks: {names}")
            rates[block] = float(mult)
    return FineTunePlan(tuple(BlockSetting(n, n in rates, rates.get(n, 1.0)) for n in names))


def final_scores(bench: Workbench, plan: FineTunePlan, config: SearchConfig) -> dict:
    runs = [final_training_run(bench, plan, config.final, s) for s in config.final_seeds]
    summary = summarize_final(runs, plan, bench)
    return {k: summary[k]["mean"] for k in ("val_balanced", "test_balanced")}


def cmd_plans(args: argparse.Namespace) -> None:
    config = configs(parse_args([]), args.search_seed)["default"]
    bench = prepare(config.data)
    names = bench.partition.names
    evaluator = evaluator_for(bench, replace(config, protocol=replace(config.protocol, prune=None)))
    for text in args.plan:
        plan = parse_plan(text, names)
        genes = encode_plan(plan)
        scores = [evaluator.evaluate(0, genes, fold).scores[0] for fold in (0, 1)]
        line = f"{text:28s} short evaluation: fold 0 {scores[0]:.3f}, fold 1 {scores[1]:.3f}"
        if args.final:
            final = final_scores(bench, plan, config)
            line += (
                f" | final recipe: val {final['val_balanced']:.4f},"
                f" test {final['test_balanced']:.4f}"
            )
        print(line, flush=True)


def cmd_rerank(args: argparse.Namespace) -> None:
    for run_dir in args.run_dir:
        config = SearchConfig.from_dict(json.loads((run_dir / "config.json").read_text())["search"])
        state = json.loads((run_dir / "state.json").read_text())
        if state["phase"] != "done":
            raise BioTuneError(f"{run_dir}: the search has not finished")
        bench = prepare(config.data)
        names = bench.partition.names
        protocol = replace(config.protocol, seeds=(0, 1, 2), prune=None)
        evaluator = evaluator_for(bench, replace(config, protocol=protocol))
        best: list[tuple[float, FineTunePlan, list[float]]] = []
        seen = set()
        for candidate, _ in state["population"]:  # best first
            genes = np.array(candidate["genes"])
            plan = decode_genome(genes, names)
            if plan.key() in seen:
                continue
            seen.add(plan.key())
            scores = evaluator.evaluate(0, genes, state["generation"]).scores
            best.append((float(np.mean(scores)), plan, scores))
            if len(best) == args.top:
                break
        pick = max(range(len(best)), key=lambda i: best[i][0])
        print(
            f"{run_dir} (search seed {config.seed}): "
            + ("same pick" if pick == 0 else f"the plan ranked {pick + 1} wins"),
            flush=True,
        )
        for mean, plan, scores in best:
            print(f"    3 seeds {mean:.3f} {[round(s, 3) for s in scores]}  {plan.describe()}")
        if pick and args.final:
            final = final_scores(bench, best[pick][1], config)
            print(
                f"    its final recipe: val {final['val_balanced']:.4f},"
                f" test {final['test_balanced']:.4f}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="command", required=True)
    plans = sub.add_parser("plans", help="score given plans on one search seed's folds")
    plans.add_argument("--search-seed", type=int, default=0)
    plans.add_argument("--final", action="store_true", help="also train each by the final recipe")
    plans.add_argument("plan", nargs="+")
    rerank = sub.add_parser("rerank", help="re-score finished searches' best plans, 3 seeds")
    rerank.add_argument("--top", type=int, default=3)
    rerank.add_argument("--final", action="store_true", help="train a changed pick finally")
    rerank.add_argument("run_dir", type=Path, nargs="+")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        (cmd_plans if args.command == "plans" else cmd_rerank)(args)
    except BioTuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
