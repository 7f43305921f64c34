"""Throughput at the size users train at: a folder of JPEG photos at 224 px (benchmarks.md, §4).

For each model, in images per second: (a) the data path alone (decode, resize, batch: one pass
over the training split in batches of 64), (b) a training step (forward, backward, Adam, batch
32, the images already in memory: what the data path must outpace), (c) one search evaluation
(full fine-tuning of half the training split for one epoch, validation included). Each is run
with the code before and after a change (``--before``: the ``src`` folder of the old code, e.g.
from ``git worktree add /tmp/before HEAD``), in fresh processes, alternating, in one invocation,
so the ratios share the machine's load. ``--search`` also times a small ``biotune search`` on the
folder both ways (wall, CPU, peak RSS, same scores). A third variant, "after+malloc", runs the
new code with glibc's malloc told never to return memory to the system (``MALLOC_MMAP_MAX_=0``,
``MALLOC_TRIM_THRESHOLD_``): at 224 px every training step otherwise maps and faults in gigabytes
of fresh pages. With ``--device cuda`` the GPU's utilisation is sampled during (b) and (c).

    python benchmarks/throughput/native.py --before /tmp/before/src --search
    python benchmarks/throughput/native.py --before /tmp/before/src --device cuda

Writes results/native-<device>.{json,md} next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, help="src folder of the code to compare against")
    p.add_argument("--after", type=Path, default=SRC, help="src folder of the new code")
    p.add_argument("--images", type=int, default=200, help="photos in the generated folder")
    p.add_argument("--folder", type=Path, help="photo folder (default: generated in /tmp)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--models", default="efficientnet_lite0,tv:resnet50")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds (the best kept)")
    p.add_argument("--search", action="store_true", help="also time a small search both ways")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: one measurement as JSON
    return p


# ------------------------------------------------------------------------ child: one measurement


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Utilisation:
    """GPU utilisation sampled every 0.1 s in a thread (nvidia-smi's figure, via NVML)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.on = device.type == "cuda"
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._read = lambda: float(torch.cuda.utilization(device))

    def __enter__(self) -> _Utilisation:
        if self.on:
            try:
                self._read()
            except Exception:  # no NVML (pynvml): try nvidia-smi
                self._read = _nvidia_smi_utilisation
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.samples.append(self._read())
            except Exception:
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _nvidia_smi_utilisation() -> float:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[0])


def measure(what: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process, with whichever biotune is on the path."""
    import inspect

    import numpy as np
    import torch

    from biotune.blocks import partition_blocks
    from biotune.core.plan import BlockSetting, FineTunePlan, encode_plan
    from biotune.data import load_dataset
    from biotune.models import load_model
    from biotune.runner.fitness import Evaluator, SearchProtocol
    from biotune.training import TrainConfig, batches, loader_options, resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model_name = args.models  # one model per child
    probe = load_model(model_name, 2, pretrained=False)
    start = time.perf_counter()
    splits = load_dataset(str(args.folder), args.image_size, probe.mean, probe.std)
    load_s = time.perf_counter() - start
    n = len(splits.train)
    row: dict[str, Any] = {"load_seconds": load_s, "train_images": n}
    on_device = "device" in inspect.signature(batches).parameters
    options = {"device": device} if on_device else loader_options(device)

    def one_pass() -> None:
        for x, _ in batches(splits.train, 64, shuffle=True, **options):
            x.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if what == "data":
        one_pass()  # the first pass builds what a later one reuses (e.g. a GPU copy)
        start, cpu = time.perf_counter(), _cpu_seconds()
        passes = 3
        for _ in range(passes):
            one_pass()
        row["images_per_s"] = passes * n / (time.perf_counter() - start)
        row["cpu_ms_per_image"] = 1000 * (_cpu_seconds() - cpu) / (passes * n)
    loaded = load_model(model_name, len(splits.classes), pretrained=False)
    model = loaded.model
    if what == "step":
        model.to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), 1e-4)
        x, y = next(iter(batches(splits.train, 32, **options)))
        x, y = x.to(device), y.to(device)
        steps = 4

        def step() -> torch.Tensor:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss

        step()  # warm-up
        with _Utilisation(device) as gpu:
            start, cpu = time.perf_counter(), _cpu_seconds()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        row["images_per_s"] = steps * len(x) / seconds
        row["cpu_ms_per_image"] = 1000 * (_cpu_seconds() - cpu) / (steps * len(x))
        row["gpu_utilisation"] = gpu.mean
    if what == "eval":
        partition = partition_blocks(model, None)
        full = FineTunePlan(tuple(BlockSetting(b, True, 1.0) for b in partition.names))
        train = TrainConfig(epochs=1, patience=1, batch_size=32, eval_batch_size=64)
        protocol = SearchProtocol(
            data_fraction=0.5, seeds=(0,), train=train, cache_features=False, cpu_threads=None
        )
        evaluator = Evaluator(model, partition, splits, protocol, device=device)
        with _Utilisation(device) as gpu:
            start, cpu = time.perf_counter(), _cpu_seconds()
            record = evaluator.evaluate(0, encode_plan(full), 0)
            seconds = time.perf_counter() - start
        images = record.train_images + record.eval_images
        row["images_per_s"] = images / seconds
        row["cpu_ms_per_image"] = 1000 * (_cpu_seconds() - cpu) / images
        row["seconds"] = seconds
        row["scores"] = [float(np.float64(s)) for s in record.scores]
        row["gpu_utilisation"] = gpu.mean
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


# ---------------------------------------------------------------------------- parent: the table


#: glibc malloc settings (read from the environment at start-up) of the "after+malloc" variant.
KEEP_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _env(src: Path, code: str, args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    return {**env, **KEEP_MEMORY} if code.endswith("+malloc") else env


def _child(src: Path, code: str, what: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    env = _env(src, code, args)
    cmd = [sys.executable, __file__, "--measure", what, "--models", model]
    cmd += ["--folder", str(args.folder), "--image-size", str(args.image_size)]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{what} {model} ({src}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _search(src: Path, code: str, args: argparse.Namespace) -> dict[str, Any]:
    """A small search on the folder, timed by GNU time (wall, CPU, peak RSS)."""
    run_dir = Path(tempfile.mkdtemp(prefix="biotune-native-")) / "run"
    env = _env(src, code, args)
    search = [sys.executable, "-m", "biotune", "search", "--dataset", str(args.folder)]
    search += ["--image-size", str(args.image_size), "--population", "3", "--generations", "1"]
    search += ["--no-final", "--rerank", "0", "--quiet", "--run-dir", str(run_dir)]
    search += ["--device", args.device]
    out = subprocess.run(["/usr/bin/time", "-v", *search], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"search ({src}) failed:\n{out.stderr[-3000:]}")
    stats = dict(line.strip().rsplit(": ", 1) for line in out.stderr.splitlines() if ": " in line)
    wall = stats["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    records = [json.loads(line) for line in (run_dir / "evaluations.jsonl").open()]
    return {
        "wall_seconds": sum(float(v) * 60**i for i, v in enumerate(reversed(wall))),
        "user_seconds": float(stats["User time (seconds)"]),
        "system_seconds": float(stats["System time (seconds)"]),
        "peak_rss_mb": int(stats["Maximum resident set size (kbytes)"]) / 1024,
        "minor_faults": int(stats["Minor (reclaiming a frame) page faults"]),
        "evaluations": len(records),
        "scores": [r["scores"] for r in records],
        "best_plan": json.loads((run_dir / "best_plan.json").read_text()).get("plan"),
    }


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args)), flush=True)
        return 0
    if args.folder is None:
        sys.path.insert(0, str(HERE))
        from photos import make_photo_folder

        args.folder = make_photo_folder(Path(f"/tmp/biotune-photos-{args.images}"), args.images)
    after = args.after.resolve()
    trees = {**({"before": args.before.resolve()} if args.before else {}), "after": after}
    trees["after+malloc"] = after
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        for what in ("data", "step", "eval"):
            best: dict[str, dict[str, Any]] = {}
            for _ in range(args.repeats):
                for code, src in trees.items():  # before, after, after+malloc, alternating
                    if what == "data" and code.endswith("+malloc"):
                        continue
                    got = _child(src, code, what, model, args)
                    if code not in best or got["images_per_s"] > best[code]["images_per_s"]:
                        best[code] = got
            rows.append({"model": model, "measure": what, **best})
            print(json.dumps(rows[-1]), flush=True)
    searches = {}
    if args.search:
        for code, src in trees.items():
            searches[code] = _search(src, code, args)
            print(json.dumps({code: searches[code]}), flush=True)
    from biotune.runner.final import machine_description

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_description(),
        "load": os.getloadavg(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "measure"},
        "rows": rows,
        "search": searches,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"native-{args.device.split(':')[0]}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


LOADING = {"before": "scan", "after": "scan, then decode once"}


def _ratio(row: dict[str, Any], key: str = "images_per_s") -> str:
    if "before" not in row:
        return "-"
    return f"{row['after'][key] / row['before'][key]:.2f}x"


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        f"# Throughput at {s['image_size']} px ({r['date']})",
        "",
        f"Machine: {r['machine']}; load average at the end {r['load'][0]:.1f}  ",
        f"Command: `{r['command']}`  ",
        f"Folder: {s['folder']}; device {s['device']}, {s['threads']} thread(s); each figure the "
        f"best of {s['repeats']} alternating runs.",
        "",
        "| model | measure | before img/s | after img/s | after / before | after+malloc img/s "
        "| CPU ms/img before | after | after+malloc | peak RSS MiB before | after "
        "| after+malloc | GPU util % after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = {"images_per_s": float("nan"), "cpu_ms_per_image": float("nan"), "peak_rss_mb": 0}
    for row in r["rows"]:
        b, a, m = row.get("before", nan), row["after"], row.get("after+malloc", nan)
        util = a.get("gpu_utilisation")
        lines.append(
            f"| {row['model']} | {row['measure']} | {b['images_per_s']:.1f} "
            f"| {a['images_per_s']:.1f} | {_ratio(row)} | {m['images_per_s']:.1f} "
            f"| {b['cpu_ms_per_image']:.1f} | {a['cpu_ms_per_image']:.1f} "
            f"| {m['cpu_ms_per_image']:.1f} | {b['peak_rss_mb']:.0f} | {a['peak_rss_mb']:.0f} "
            f"| {m['peak_rss_mb']:.0f} | {'-' if util is None else f'{util:.0f}'} |"
        )
    rates = {(row["model"], row["measure"]): row for row in r["rows"]}
    lines.append("")
    for model in dict.fromkeys(row["model"] for row in r["rows"]):
        data, step = rates[(model, "data")], rates[(model, "step")]
        for code in ("before", "after"):
            if code in data:
                lines.append(
                    f"{model}, {code}: the data path delivers "
                    f"{data[code]['images_per_s'] / step[code]['images_per_s']:.1f}x the images a "
                    f"training step consumes; loading the folder took "
                    f"{data[code]['load_seconds']:.1f} s ({LOADING[code]}).  "
                )
    for code, run in r["search"].items():
        lines.append(
            f"\nSearch ({code}): {run['wall_seconds']:.0f} s wall, {run['user_seconds']:.0f} s "
            f"user + {run['system_seconds']:.0f} s system CPU, peak RSS {run['peak_rss_mb']:.0f} "
            f"MiB, {run['minor_faults'] / 1e6:.1f} M minor page faults, "
            f"{run['evaluations']} evaluations."
        )
    runs = list(r["search"].values())
    if len(runs) > 1:
        same = all(run["scores"] == runs[0]["scores"] for run in runs)
        same = same and all(run["best_plan"] == runs[0]["best_plan"] for run in runs)
        lines.append(f"\nSame scores and plan in every variant: {'yes' if same else 'NO'}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
