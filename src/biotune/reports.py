"""``biotune report RUN_DIR``: what a search did, in three plots.

* ``fitness.png``: best and mean validation score (1 - fitness: balanced accuracy by default)
  of the population per generation, over every evaluation's score;
* ``blocks.png``: per generation, the share of evaluated candidates that fine-tuned each block;
* ``plan.png``: the winning plan's learning-rate multiplier per block (frozen blocks hatched),
  with its validation score and, once the final training has run, its test result;
* ``pareto.png`` (a search with ``--objective pareto``): the front of validation score against
  cost with every evaluated plan behind it, and the front's and the anchors' test scores after
  the final training; ``pareto_table`` is the same as a table.

The winner is the search's (``best_plan.json``, ``BioTuneEvolution.best``): the best of the
latest finished generation, never a score of an older fold. Only the run directory's files are
read (no model, no data), so a report works anywhere.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from biotune.errors import BioTuneError
from biotune.runner.rundir import GENERATIONS, RunDirectory

REPORT_FILES = ("fitness.png", "blocks.png", "plan.png")
_SCORE_NAMES = {
    "balanced": "balanced accuracy",
    "top1": "top-1 accuracy",
    "likelihood": "likelihood",
}


def score_name(metric: str) -> str:
    """What 1 - fitness is, for a protocol's ``metric``: 'balanced accuracy', ..."""
    return _SCORE_NAMES.get(metric, metric)


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The parts of a run directory a report needs; a clear error if it is not one."""
    path = Path(run_dir)
    if not path.is_dir():
        raise BioTuneError(f"{path} is not a directory")
    run = RunDirectory(path)
    config = run.read("config.json")
    evaluations = run.records("evaluations.jsonl")
    if config is None or "search" not in config:
        raise BioTuneError(
            f"{path} is not a biotune search run directory (no config.json from 'biotune search')"
        )
    if not evaluations:
        raise BioTuneError(f"{path}: the search has no finished evaluation yet")
    generations = run.read(GENERATIONS)
    if generations is None:
        generations = run.records("generations.jsonl") or None
    blocks = run.read("blocks.json")
    names = (
        [b["name"] for b in blocks]
        if blocks
        else [b["name"] for b in evaluations[0]["plan"]["blocks"]]
    )
    return {
        "path": path,
        "config": config["search"],
        "evaluations": evaluations,
        "generations": generations or _generations_from(evaluations),
        "blocks": blocks,
        "names": names,
        "best_plan": run.read("best_plan.json"),
        "final": run.read("final.json"),
        "pareto": run.read("pareto.json"),
        "rerank": run.records("rerank.jsonl"),
    }


def _generations_from(evaluations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-generation best and mean of the evaluated scores, for a run without its history."""
    by_gen: dict[int, list[float]] = defaultdict(list)
    for e in evaluations:
        if e.get("status") != "invalid":
            by_gen[int(e["generation"])].append(float(e["fitness"]))
    return [
        {"generation": g, "best": min(f), "mean": sum(f) / len(f), "fitness": sorted(f)}
        for g, f in sorted(by_gen.items())
    ]


def selection_shares(
    evaluations: Sequence[Mapping[str, Any]], names: Sequence[str]
) -> tuple[list[int], list[list[float]]]:
    """(generations, share[g][b]): of each generation's trained candidates, how many train b."""
    counts: dict[int, list[int]] = {}
    totals: dict[int, int] = defaultdict(int)
    index = {n: i for i, n in enumerate(names)}
    for e in evaluations:
        if e.get("status") == "invalid":
            continue
        g = int(e["generation"])
        row = counts.setdefault(g, [0] * len(names))
        totals[g] += 1
        for b in e["plan"]["blocks"]:
            if b["train"] and b["name"] in index:
                row[index[b["name"]]] += 1
    gens = sorted(counts)
    return gens, [[c / totals[g] for c in counts[g]] for g in gens]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metric(run: Mapping[str, Any]) -> str:
    return run["config"].get("protocol", {}).get("train", {}).get("metric", "balanced")


def winner(run: Mapping[str, Any]) -> dict[str, Any]:
    """The search's answer: ``best_plan.json``, or while the search runs, the best of the latest
    finished generation (what ``BioTuneEvolution.best`` holds); ``generation`` is None when the
    plan comes from ``best_plan.json``, else the generation it is the best of."""
    if run["best_plan"] is not None:
        return {**run["best_plan"], "generation": None}
    scored = [e for e in run["evaluations"] if e.get("status") != "invalid"]
    last = run["generations"][-1] if run["generations"] else None
    by_id = {e["candidate"]: e for e in scored}
    if last is not None and last.get("best_id") in by_id:
        best = by_id[last["best_id"]]
    else:  # no summary to go by: the best of the latest generation's evaluations so far
        latest = max(e["generation"] for e in scored)
        best = min((e for e in scored if e["generation"] == latest), key=lambda e: e["fitness"])
    return {
        **best["plan"],
        "fitness": best["fitness"],
        "candidate": best["candidate"],
        "generation": best["generation"],
    }


def plot_fitness(run: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    metric = _metric(run)
    gens = run["generations"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    scored = [e for e in run["evaluations"] if e.get("status") != "invalid"]
    ax.scatter(
        [e["generation"] for e in scored],
        [1 - e["fitness"] for e in scored],
        s=12,
        color="0.6",
        alpha=0.6,
        label="each evaluation",
    )
    x = [g["generation"] for g in gens]
    ax.plot(x, [1 - g["best"] for g in gens], "o-", label="population best")
    ax.plot(x, [1 - g["mean"] for g in gens], "s--", label="population mean")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"validation {score_name(metric)} (1 - fitness)")
    ax.set_xticks(x)
    ax.set_title("search progress (each generation scored on its own fold)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_block_selection(run: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    names = run["names"]
    gens, shares = selection_shares(run["evaluations"], names)
    size = (max(5.0, 0.6 * len(names) + 2), max(3.0, 0.45 * len(gens) + 1.5))
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(gens)), [str(g) for g in gens])
    ax.set_xlabel("block (input -> output)")
    ax.set_ylabel("generation")
    if len(names) * len(gens) <= 300:
        for i, row in enumerate(shares):
            for j, v in enumerate(row):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v < 0.5 else "black",
                )
    fig.colorbar(image, ax=ax, label="share fine-tuning the block")
    ax.set_title("which blocks the evaluated candidates fine-tuned", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_plan(run: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    plan = winner(run)
    blocks = plan["blocks"]
    names = [b["name"] for b in blocks]
    floor = 0.05  # bars start here on the log axis; frozen blocks are drawn as hatched stubs
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 2), 4.2))
    for i, b in enumerate(blocks):
        if b["train"]:
            ax.bar(i, b["lr_mult"] - floor, bottom=floor, color="tab:blue")
            ax.text(i, b["lr_mult"] * 1.1, f"x{b['lr_mult']:.2g}", ha="center", fontsize=7)
        else:  # the whole column hatched: a frozen block has no learning rate at all
            ax.axvspan(i - 0.4, i + 0.4, facecolor="none", edgecolor="0.6", hatch="//")
            ax.text(
                i,
                0.5,
                "frozen",
                ha="center",
                va="center",
                rotation=90,
                fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none"},
            )
    ax.set_yscale("log")
    ax.set_ylim(floor, 20)
    ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("learning-rate multiplier (x base lr, log)")
    share = ""
    if run["blocks"]:
        params = {b["name"]: b["params"] for b in run["blocks"]}
        total = sum(params.values())
        trained = sum(params.get(b["name"], 0) for b in blocks if b["train"])
        share = f"; {100 * trained / total:.1f}% of parameters trained" if total else ""
    lines = _plan_lines(run, plan)
    lines[0] += share
    ax.set_title("\n".join(lines), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plan_lines(run: Mapping[str, Any], plan: Mapping[str, Any]) -> list[str]:
    """The winner's title: which plan, its validation score, its final test result if any."""
    head = (
        "winning plan"
        if plan["generation"] is None
        else f"best plan so far (generation {plan['generation']}; the search is not done)"
    )
    lines = [head]
    reranked = (run.get("rerank") or []) if plan["generation"] is None else []
    if plan.get("fitness") is not None or reranked:
        lines.append(validation_text(reranked, _metric(run), plan.get("fitness")))
    final = run["final"]
    if final is not None and plan["generation"] is None:
        lines.append(final_text(final))
    return lines


def validation_text(
    reranked: Sequence[Mapping[str, Any]], metric: str, fitness: float | None
) -> str:
    """The winner's validation score, the same words at the end of a search and in its report:
    after the final recipe when plans were re-ranked (``rerank.jsonl``), else the search's."""
    search = (
        f"{score_name(metric)} {1 - fitness:.4f} in the search's short evaluation"
        if fitness is not None
        else ""
    )
    if not reranked:
        return f"validation {search}"
    from biotune.runner.rerank import choose

    won = choose(list(reranked))
    return (
        f"validation balanced accuracy {won['val_balanced']:.4f} after the final recipe (the "
        f"best of {len(reranked)} re-ranked plans)" + (f"; {search}" if search else "")
    )


def final_text(final: Mapping[str, Any]) -> str:
    """'test top-1 0.9231 +- 0.0035, balanced ... over 3 seeds' from ``final.json``."""
    t1, bal = final["test_top1"], final["test_balanced"]
    return (
        f"test top-1 {t1['mean']:.4f} +- {t1['std']:.4f}, balanced {bal['mean']:.4f} +- "
        f"{bal['std']:.4f} ({len(final['runs'])} seed{'s' if len(final['runs']) != 1 else ''})"
    )


def summary_lines(run_dir: str | Path) -> list[str]:
    """What ``biotune report`` prints: the winner, its validation score, its test result."""
    run = load_run(run_dir)
    plan = winner(run)
    lines = _plan_lines(run, plan)
    trained = [f"{b['name']} x{b['lr_mult']:.3g}" for b in plan["blocks"] if b["train"]]
    lines.insert(1, "blocks: " + ", ".join(trained))
    if run["final"] is None:
        lines.append("final training: not run yet (final.json is absent)")
    if run["pareto"] is not None:
        lines += ["", pareto_table(run["pareto"])]
    return lines


def report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write fitness.png, blocks.png and plan.png for a search; returns their paths."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run["path"] / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BioTuneError(f"cannot create {out}: {exc.strerror}") from None
    paths = [out / name for name in REPORT_FILES]
    plot_fitness(run, paths[0])
    plot_block_selection(run, paths[1])
    plot_plan(run, paths[2])
    if run["pareto"] is not None:
        paths.append(out / "pareto.png")
        plot_pareto(run["pareto"], paths[-1])
    return paths


# -- the Pareto objective ---------------------------------------------------------------------

_ANCHOR_STYLE = {
    "full fine-tuning": ("s", "tab:red"),
    "top half": ("^", "tab:orange"),
    "linear probing": ("D", "tab:green"),
}


def _cost_value(pareto: Mapping[str, Any], cost: Mapping[str, Any]) -> float:
    """A plan's cost on the plot's axis: percent of parameters, or MB."""
    value = cost[pareto["cost_key"]]
    return 100 * value if pareto["cost"] == "params" else value


def _log_cost_axis(ax: Any) -> None:
    """A log axis labelled in plain numbers (0.3, 1, 3, 10, ...), without minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _cost_label(pareto: Mapping[str, Any]) -> str:
    if pareto["cost"] == "params":
        return "trainable parameters (% of the model, log)"
    return "peak training memory (MB, float32 step, log)"


def plot_pareto(pareto: Mapping[str, Any], path: Path) -> None:
    """Left: validation score (the search's short training, one fold) against cost, every
    evaluated plan behind the front; right, once the final training ran: test scores of the
    front's plans and of the anchors (mean +- std over the final seeds)."""
    plt = _pyplot()
    finals = any(e.get("final") for e in [*pareto["front"], *pareto["anchors"]])
    fig, axes = plt.subplots(
        1, 2 if finals else 1, figsize=(12.0 if finals else 6.4, 4.8), squeeze=False
    )
    ax = axes[0][0]
    fold, name = pareto["fold"], score_name(pareto["metric"])
    same = [e for e in pareto["evaluated"] if e["fold"] == fold]
    other = [e for e in pareto["evaluated"] if e["fold"] != fold]
    if other:
        ax.scatter(
            [_cost_value(pareto, e["cost"]) for e in other],
            [e["val_score"] for e in other],
            s=14,
            facecolors="none",
            edgecolors="0.75",
            label="evaluated, other folds (not compared)",
        )
    ax.scatter(
        [_cost_value(pareto, e["cost"]) for e in same],
        [e["val_score"] for e in same],
        s=14,
        color="0.55",
        label=f"evaluated, fold {fold}",
    )
    front = pareto["front"]
    ax.step(
        [_cost_value(pareto, e["cost"]) for e in front],
        [e["val_score"] for e in front],
        where="post",
        color="tab:blue",
        lw=1.2,
    )
    ax.scatter(
        [_cost_value(pareto, e["cost"]) for e in front],
        [e["val_score"] for e in front],
        s=36,
        color="tab:blue",
        zorder=3,
        label=f"front (fold {fold})",
    )
    for anchor in pareto["anchors"]:
        if anchor["search"] is None:
            continue
        marker, color = _ANCHOR_STYLE.get(anchor["name"], ("o", "k"))
        where = anchor["search"]["fold"]
        ax.scatter(
            _cost_value(pareto, anchor["cost"]),
            anchor["search"]["val_score"],
            s=110,
            marker=marker,
            facecolors="none",
            edgecolors=color,
            linewidths=1.8,
            zorder=4,
            label=f"{anchor['name']} (fold {where})",
        )
    _log_cost_axis(ax)
    ax.set_xlabel(_cost_label(pareto))
    ax.set_ylabel(f"validation {name} (search: short training, one fold)")
    ax.set_title("the search: every evaluated plan and the front", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    if finals:
        _plot_final(pareto, axes[0][1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_final(pareto: Mapping[str, Any], ax: Any) -> None:
    trained = [e for e in pareto["front"] if e.get("final") and e["final"]["test_top1"]]
    x = [_cost_value(pareto, e["cost"]) for e in trained]
    y = [100 * e["final"]["test_top1"]["mean"] for e in trained]
    err = [100 * e["final"]["test_top1"]["std"] for e in trained]
    ax.step(x, y, where="post", color="tab:blue", lw=1.0, alpha=0.6)
    ax.errorbar(x, y, yerr=err, fmt="o", color="tab:blue", capsize=3, label="front plans")
    for i, (xi, yi) in enumerate(zip(x, y, strict=True), 1):  # "front k" as in the table
        ax.annotate(
            f"front {i}",
            (xi, yi),
            textcoords="offset points",
            xytext=(6, -12),
            fontsize=7,
            color="tab:blue",
        )
    for anchor in pareto["anchors"]:
        final = anchor.get("final")
        if not final or not final["test_top1"]:
            continue
        marker, color = _ANCHOR_STYLE.get(anchor["name"], ("o", "k"))
        ax.errorbar(
            _cost_value(pareto, anchor["cost"]),
            100 * final["test_top1"]["mean"],
            yerr=100 * final["test_top1"]["std"],
            fmt=marker,
            color=color,
            capsize=3,
            markersize=11,
            markerfacecolor="none",
            markeredgewidth=1.8,
            label=anchor["name"],
            zorder=4,
        )
    _log_cost_axis(ax)
    ax.set_xlabel(_cost_label(pareto))
    ax.set_ylabel("test top-1 % (final training, mean +- std over seeds)")
    seeds = len(pareto.get("final_seeds", []))
    plural = "" if seeds == 1 else "s"
    ax.set_title(f"after the final training ({seeds} seed{plural}): front and anchors", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")


def _percent(stat: Mapping[str, float] | None) -> str:
    return "" if not stat else f"{100 * stat['mean']:.2f} +- {100 * stat['std']:.2f}"


def pareto_table(pareto: Mapping[str, Any]) -> str:
    """The front and the anchors as a markdown table: costs, validation and test scores, and
    which anchors dominate a front plan on test (top-1 at its cost)."""
    name = score_name(pareto["metric"])
    head = (
        "| plan | blocks trained | trainable % | memory MB | train GFLOPs/image "
        f"| val {name} (fold {pareto['fold']}) | test top-1 % | test balanced % "
        "| dominated by (test top-1) |"
    )
    lines = [head, "|" + "---|" * 9]

    def row(label: str, entry: Mapping[str, Any], val: str, dominated: str) -> str:
        cost = entry["cost"]
        final = entry.get("final") or {}
        memory = "" if cost.get("memory_mb") is None else f"{cost['memory_mb']:.4g}"
        return (
            f"| {label} | {entry['plan_text']} | {100 * cost['trainable_share']:.2f} "
            f"| {memory} | {cost['train_gflops']:.3g} | {val} "
            f"| {_percent(final.get('test_top1'))} | {_percent(final.get('test_balanced'))} "
            f"| {dominated} |"
        )

    for i, entry in enumerate(pareto["front"], 1):
        dominated = entry.get("dominated_by")
        text = "" if dominated is None else ", ".join(dominated.get("test_top1", [])) or "none"
        lines.append(row(f"front {i}", entry, f"{entry['val_score']:.4f}", text))
    for anchor in pareto["anchors"]:
        search = anchor["search"]
        val = "" if search is None else f"{search['val_score']:.4f} (fold {search['fold']})"
        label = anchor["name"] + ("" if anchor["within_budget"] else " (over budget)")
        lines.append(row(label, anchor, val, ""))
    return "\n".join(lines)
