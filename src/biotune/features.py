"""Frozen-prefix feature caching: compute what the frozen first blocks output once, not every epoch.

When a plan freezes blocks 0..k-1 (and frozen blocks run in eval mode), their output for an image
never changes during training. The search then computes those features once per fold (and once
for the validation split), keeps them in memory within a byte budget, and trains only blocks
k..end on them. That needs the model as a chain of per-block stages, which this module builds from
the forward steps the model's family lists (``biotune.families``) and checks numerically; for a
family that lists none caching is simply off.

Exactness: the features are computed at the batch sizes training reads them in (full batches and
the smaller last one), as the frozen prefix would run in uncached training. That makes cached
training bit-identical to uncached training for most models; where a feature map is tiny (1x1,
2x2), some CPU kernels round by an image's place in its batch, and the two differ by float
rounding (1e-7), which training can amplify like any change of batch order or thread count.

On an accelerator (CUDA, MPS) an entry holds one table, read at every batch size: its kernels
are not bit-reproducible across batch sizes anyway, so a table per size would double the memory
and the building for nothing (``table_batch_sizes``).

Memory policy: entries live in memory, least recently used first out, and never add up to more
than the budget; an evaluation whose two entries (its fold and the validation split) would not fit
together trains uncached (``cached_prefix`` 0). Nothing spills to disk: at the sizes a search
uses, recomputing a prefix is cheaper than reading it back. The budget follows the memory free
when the cache is made (``cache_budget``) unless a number is given.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from biotune.blocks import BlockPartition
from biotune.core.plan import FineTunePlan
from biotune.errors import BioTuneError
from biotune.families import Op, Stage, family_of, module_op
from biotune.freezing import apply_plan
from biotune.training import (
    TrainConfig,
    TrainHooks,
    TrainResult,
    autocast,
    batches,
    device_of,
    fine_tune,
    loader_options,
    reinit_head,
    seed_everything,
    to_device,
    train_plan,
)

_ATOL = 1e-5


class _Chain:
    """Per-block lists of steps; ``run(x)`` over all of them equals the model's forward."""

    def __init__(self, stages: Sequence[Sequence[Stage]]) -> None:
        self.stages = [list(s) for s in stages]

    def __len__(self) -> int:
        return len(self.stages)

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for stage in self.stages[start:stop]:
            for fn in stage:
                x = fn(x)
        return x


def block_chain(
    model: nn.Module, partition: BlockPartition, sample: torch.Tensor | None = None
) -> list[Stage] | None:
    """One callable per block (partition order) whose composition is ``model.forward``, or None.

    With ``sample`` (a small input batch) the chain is checked against the model in eval mode and
    None is returned if they disagree; None as well for model families we cannot split.
    """
    chain = _build_chain(model, partition)
    if chain is None:
        return None
    if sample is not None and not _chain_matches(model, chain, sample):
        return None
    return [_stage_fn(chain, i) for i in range(len(chain))]


def _stage_fn(chain: _Chain, i: int) -> Stage:
    return lambda x: chain.run(x, i, i + 1)


def _chain_matches(model: nn.Module, chain: _Chain, sample: torch.Tensor) -> bool:
    was_training = model.training
    model.eval()
    sample = sample.to(device_of(model))
    try:
        with torch.no_grad():
            expected = model(sample)
            got = chain.run(sample)
    except Exception:  # a chain that cannot even run is just "no chain"
        return False
    finally:
        model.train(was_training)
    return (
        isinstance(got, torch.Tensor)
        and got.shape == expected.shape
        and torch.allclose(got, expected, rtol=1e-4, atol=_ATOL)
    )


# ----------------------------------------------------------------------------- grouping into blocks


def _build_chain(model: nn.Module, partition: BlockPartition) -> _Chain | None:
    """Group the model's steps into one stage per block; None if the blocks do not line up."""
    try:
        ops = family_of(model).forward_ops(model)
    except AttributeError:
        return None
    if not ops:
        return None
    index = {name: i for i, name in enumerate(partition.names)}
    block_of = {p: index[b.name] for b in partition for p in b.param_names}
    ops = _expand(model, ops, block_of)
    if ops is None:
        return None
    stages: list[list[Stage]] = [[] for _ in partition.names]
    covered: set[str] = set()
    current, waiting = -1, []
    for op in ops:
        blocks = _blocks_of(model, op, block_of)
        if not blocks:
            if op.attach == "next" or current < 0:
                waiting.append(op.fn)
            else:
                stages[current].append(op.fn)
            continue
        if len(blocks) != 1 or -1 in blocks:
            return None  # a step outside the partition, or one spanning blocks
        (block,) = blocks
        if block < current or (block > current and stages[block]):
            return None  # blocks out of order, or one block in two places
        current = block
        stages[block] += [*waiting, op.fn]
        waiting = []
        covered.update(_param_names(model, op.path))
    if current < 0:
        return None
    stages[current] += waiting
    if any(not s for s in stages) or covered != set(block_of):
        return None
    return _Chain(stages)


def _expand(model: nn.Module, ops: list[Op], block_of: dict[str, int]) -> list[Op] | None:
    """Open Sequential steps whose parameters span several blocks into their children."""
    out: list[Op] = []
    for op in ops:
        if len(_blocks_of(model, op, block_of)) <= 1:
            out.append(op)
            continue
        module = model.get_submodule(op.path)  # type: ignore[arg-type]
        if not isinstance(module, nn.Sequential):
            return None
        children = [module_op(model, f"{op.path}.{name}") for name, _ in module.named_children()]
        expanded = _expand(model, children, block_of)
        if expanded is None:
            return None
        out += expanded
    return out


def _param_names(model: nn.Module, path: str | None) -> list[str]:
    if path is None:
        return []
    return [f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()]


def _blocks_of(model: nn.Module, op: Op, block_of: dict[str, int]) -> set[int]:
    return {block_of.get(p, -1) for p in _param_names(model, op.path)}


# ----------------------------------------------------------------------------------- the budget

#: ``cache_memory="auto"``: the share of the memory available when a cache is made that it may
#: fill, split between the workers that share that memory. The rest is left to what training
#: allocates after the cache is made (activations, gradients, optimizer state, the model's
#: copies), which the cache cannot see. A budget is a ceiling: tables are allocated as entries
#: are built, so a budget larger than a search needs costs nothing.
AUTO_SHARE = 0.5

#: ``cache_memory="auto"`` where the available memory cannot be read (MB).
AUTO_FALLBACK_MB = 1024.0

_MIB = 2**20


def check_cache_memory(value: object, name: str = "cache_memory") -> None:
    """Refuse a ``cache_memory`` setting other than "auto" or a number of MB >= 0, in one line."""
    if value == "auto":
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise BioTuneError(f"{name} must be 'auto' or a number of MB >= 0 (got {value!r})")


def cache_budget(
    memory: str | float, device: torch.device | str = "cpu", workers: int = 1, per_gpu: int = 1
) -> tuple[int, str]:
    """The feature cache's budget in bytes for a ``cache_memory`` setting, and where it came from
    (for ``FeatureCache.summary``).

    A number is that many MB. "auto" is ``AUTO_SHARE`` of the memory available now, divided by
    the ``workers`` that share this machine's memory (each builds its own cache). A CUDA cache
    takes that share of its GPU's free memory divided by the ``per_gpu`` workers that share the
    GPU, but no more than the host's share, since a table too large for the GPU lives in host
    memory.
    """
    check_cache_memory(memory)
    if memory != "auto":
        return int(float(memory) * _MIB), "as given"
    device = torch.device(device)
    workers = max(1, int(workers))
    host = host_available_bytes()
    host_share = None if host is None else int(AUTO_SHARE * host / workers)
    per = f" / {workers} workers" if workers > 1 else ""
    host_text = f"{AUTO_SHARE:.0%} of {_gib(host)} available{per}"
    if device.type == "cuda":
        per_gpu = max(1, int(per_gpu))
        free, _ = torch.cuda.mem_get_info(device)
        gpu_share = int(AUTO_SHARE * free / per_gpu)
        sharing = f" / {per_gpu} workers per GPU" if per_gpu > 1 else ""
        gpu_text = f"{AUTO_SHARE:.0%} of {_gib(free)} free on {device}{sharing}"
        if host_share is None or gpu_share <= host_share:
            return gpu_share, f"auto: {gpu_text}"
        return host_share, f"auto: {host_text} (host memory, less than {gpu_text})"
    if host_share is None:
        return int(AUTO_FALLBACK_MB * _MIB), (
            f"auto: {AUTO_FALLBACK_MB:g} MB, the available memory being unknown"
        )
    return host_share, f"auto: {host_text}"


def host_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """Host memory this process could use now, or None where it cannot be read.

    Linux's MemAvailable (free memory plus what the kernel can reclaim, page cache included),
    else the free pages ``os.sysconf`` reports; lowered to what a container's memory limit leaves
    (cgroups), which /proc/meminfo does not show.
    """
    available = _meminfo(meminfo).get("MemAvailable")
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            available = None
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return available


def _meminfo(path: str | Path) -> dict[str, int]:
    """A file of "key value" lines (/proc/meminfo's "MemAvailable:  21529396 kB", a cgroup's
    memory.stat) as bytes by key; empty where it cannot be read."""
    out = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[1].isdigit():
            out[words[0].rstrip(":")] = int(words[1]) * (1024 if words[2:] == ["kB"] else 1)
    return out


#: A cgroup's memory files, v2 then v1: its limit, its usage, and its reclaimable page cache.
_CGROUP_FILES = (
    ("memory.max", "memory.current", "inactive_file"),
    ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
)


def _cgroup_headroom(
    proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup"
) -> int | None:
    """What the memory limits of this process's cgroup and its parents (a container's limit,
    which /proc/meminfo does not show) still leave: the tightest limit less the usage the kernel
    cannot simply drop (page cache excluded, as ``docker stats`` counts it); None without one."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    folders = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" or "memory" in controllers.split(","):
            base = Path(root) if controllers == "" else Path(root) / "memory"
            folder = base / path.strip().lstrip("/")
            folders += [folder, *(p for p in folder.parents if p.is_relative_to(base))]
    headrooms = []
    for folder in folders:
        for limit_name, usage_name, inactive in _CGROUP_FILES:
            try:
                limit_text = (folder / limit_name).read_text().strip()
                usage = int((folder / usage_name).read_text())
            except (OSError, ValueError):
                continue
            if limit_text.isdigit() and int(limit_text) < 2**62:  # "max", or v1's "no limit"
                reclaimable = _meminfo(folder / "memory.stat").get(inactive, 0)
                headrooms.append(max(0, int(limit_text) - usage + reclaimable))
    return min(headrooms, default=None)


def _gib(nbytes: int | None) -> str:
    return f"{(nbytes or 0) / 2**30:.1f} GiB"


def table_batch_sizes(
    device: torch.device | str, read_sizes: Sequence[int], build_size: int
) -> tuple[int, ...]:
    """The batch sizes the tables of one cache entry are computed at.

    On the CPU, each size training reads the features in (``read_sizes``): CPU kernels round
    differently at different batch sizes, and a table per size keeps cached training
    bit-identical to uncached training. On an accelerator, one table computed at ``build_size``
    (the cache's own batch size) and read at every size: its kernels are not bit-reproducible
    across batch sizes anyway, and a second table would double the memory and the building.
    """
    if torch.device(device).type == "cpu":
        return tuple(read_sizes)
    return (build_size,)


# ------------------------------------------------------------------------------------ the cache


class FeatureDataset(Dataset):
    """Cached features with ``.images`` and ``.targets`` (``training.batches`` slices them).

    CPU kernels round differently at different batch sizes, so features are computed at the batch
    sizes training will use: ``by_batch_size[b]`` holds every image's features computed in batches
    of b, and ``training.batches`` serves a batch of b images from that table (``images`` for
    any other size). That keeps cached training bit-identical to running the frozen prefix.
    On an accelerator there is one table, read at every size (``table_batch_sizes``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: np.ndarray,
        by_batch_size: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.by_batch_size = dict(by_batch_size or {})

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    @property
    def nbytes(self) -> int:
        tables = {id(t): t for t in (self.images, *self.by_batch_size.values())}
        return sum(_nbytes(t) for t in tables.values())


def batch_sizes_for(n: int, batch_size: int) -> tuple[int, ...]:
    """The batch sizes an epoch over n items in batches of ``batch_size`` runs: full and last."""
    full = min(batch_size, n)
    rest = n % batch_size if n > batch_size else 0
    return (full, rest) if rest else (full,)


class FeatureCache:
    """Features of datasets after the first k blocks, for one pretrained model, within a budget.

    Entries are keyed (dataset key, k, batch sizes). A request for k starts from the deepest
    cached j < k of the same dataset and batch sizes (or from the images), so a deeper prefix
    costs only the blocks in between. ``stage_images[i]`` counts images pushed through block i
    (the cache's own forward work). ``precision`` and ``channels_last`` are those of the trainings
    it serves: the frozen blocks run as they would in those trainings, so caching stays exact.
    ``budget_origin`` says where ``budget_bytes`` came from (``cache_budget``), for the summary.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[Stage],
        budget_bytes: int,
        batch_size: int = 256,
        device: torch.device | None = None,
        precision: str = "auto",
        channels_last: bool = False,
        budget_origin: str = "",
    ) -> None:
        self.model = model
        self.stages = list(stages)
        self.budget_bytes = int(budget_bytes)
        self.budget_origin = budget_origin
        self.batch_size = batch_size
        self.device = device or torch.device("cpu")
        self.precision = precision
        self.channels_last = channels_last
        self._store: OrderedDict[tuple[Hashable, int, tuple[int, ...]], FeatureDataset] = (
            OrderedDict()
        )
        self._shapes: dict[int, tuple[int, ...]] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        self.stage_images = [0] * len(self.stages)
        self.peak_bytes = 0
        self.skipped = 0  # requests refused because one entry would exceed the budget
        self.built = 0  # entries computed
        self.evicted = 0  # entries dropped to make room for others
        self.largest_refused = 0  # bytes of the largest request refused

    @property
    def used_bytes(self) -> int:
        return sum(d.nbytes for d in self._store.values())

    def table_sizes(self, batch_sizes: Sequence[int] | None = None) -> tuple[int, ...]:
        """The batch sizes an entry read in ``batch_sizes`` (default: this cache's batch size)
        is computed at, one table each: all of them on the CPU, one on an accelerator
        (``table_batch_sizes``)."""
        return table_batch_sizes(self.device, batch_sizes or (self.batch_size,), self.batch_size)

    def entry_bytes(
        self, dataset: Dataset, k: int, batch_sizes: Sequence[int] | None = None
    ) -> int:
        """Bytes the features of ``dataset`` after k blocks take when read in ``batch_sizes``
        (its tables together, ``table_sizes``)."""
        n = len(dataset)  # type: ignore[arg-type]
        size = math.prod(self._shape(dataset, k)) * self._dtypes[k].itemsize
        return size * n * len(self.table_sizes(batch_sizes))

    def _shape(self, dataset: Dataset, k: int) -> tuple[int, ...]:
        """One image's feature shape after k blocks (run once per k on one image), and their
        dtype: the prefix's own output (bfloat16 or float16 under a GPU's autocast), kept as it
        is, which halves the memory there and is what the suffix gets in uncached training."""
        if k not in self._shapes:
            x, _ = next(batches(dataset, 1))
            with torch.no_grad(), self._eval():
                out = self._run(x, 0, k)
            self._shapes[k], self._dtypes[k] = tuple(out.shape[1:]), out.dtype
        return self._shapes[k]

    def features(
        self, key: Hashable, dataset: Dataset, k: int, batch_sizes: tuple[int, ...] | None = None
    ) -> FeatureDataset | None:
        """``dataset`` after blocks 0..k-1 (eval mode), or None if it cannot fit the budget.

        ``batch_sizes``: the sizes of the batches the features will be read in (default: this
        cache's batch size, in order, as evaluation reads them); on the CPU one table is computed
        per size, on an accelerator one in all (``table_sizes``). A dataset read lazily is read
        with the device's loader workers (``loader_options``), as training reads it.
        """
        if k < 1:
            raise ValueError("a cached prefix holds at least one block")
        sizes = self.table_sizes(batch_sizes)
        hit = self._store.get((key, k, sizes))
        if hit is not None:
            self._store.move_to_end((key, k, sizes))
            return hit
        size = self.entry_bytes(dataset, k, sizes)
        if size > self.budget_bytes:
            self.refuse(size)
            return None
        while self._store and self.used_bytes + size > self.budget_bytes:
            self._store.popitem(last=False)
            self.evicted += 1
        start = max(
            (j for (kk, j, ss) in self._store if kk == key and ss == sizes and j < k), default=0
        )
        source = self._store[(key, start, sizes)] if start else None
        n = len(dataset)  # type: ignore[arg-type]
        tables: dict[int, torch.Tensor] = {}
        where = self._home(size // len(sizes))
        for b in sizes:
            images = torch.empty(
                (n, *self._shape(dataset, k)),
                dtype=self._dtypes[k],
                device=where,
                pin_memory=where.type == "cpu" and self.device.type == "cuda",
            )
            inputs = (
                dataset
                if source is None
                else FeatureDataset(source.by_batch_size[b], source.targets)
            )
            done = 0
            with torch.no_grad(), self._eval():
                passes = batches(inputs, b, device=self.device, **loader_options(self.device))
                for x, _ in passes:
                    images[done : done + len(x)] = self._run(x, start, k)
                    done += len(x)
            tables[b] = images
            for i in range(start, k):
                self.stage_images[i] += n
        targets = np.asarray(dataset.targets)  # type: ignore[attr-defined]
        entry = FeatureDataset(tables[sizes[0]], targets, tables)
        self._store[(key, k, sizes)] = entry
        self.built += 1
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return entry

    def refuse(self, nbytes: int) -> None:
        """Count a request of ``nbytes`` that cannot fit the budget (it trains uncached)."""
        self.skipped += 1
        self.largest_refused = max(self.largest_refused, nbytes)

    def summary(self) -> str:
        """One line for the console and logs: what was cached, where, and what was refused and
        why, so that a search that trained mostly uncached says so."""
        mib = 2**20
        where = ", ".join(
            sorted({f"{t.dtype} on {t.device}" for e in self._store.values() for t in [e.images]})
        )
        notes = "; ".join(n for n in (self.budget_origin, where) if n)
        line = (
            f"feature cache: {self.built} entries built, {self.evicted} evicted, peak "
            f"{self.peak_bytes / mib:.0f} MiB of a {self.budget_bytes / mib:.0f} MiB budget"
            f"{f' ({notes})' if notes else ''}"
        )
        if self.skipped:
            largest = self.largest_refused / mib
            size = f", up to {largest:.0f} MiB each," if largest else ""
            line += (
                f"; {self.skipped} refused{size} over the budget (those evaluations trained "
                "uncached; raise the budget to cache them)"
            )
        return line

    def _home(self, nbytes: int) -> torch.device:
        """Where a table of ``nbytes`` lives: on the GPU it serves when it takes at most a
        quarter of the GPU's free memory (batches are then sliced there, with no copy), else in
        the CPU's memory (pinned for a GPU, so its batches copy without blocking)."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes <= free // 4:
                return self.device
        return torch.device("cpu")

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        with autocast(self.device, self.precision):
            x = to_device(x, self.device, self.channels_last)
            for stage in self.stages[start:stop]:
                x = stage(x)
        return x

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        """The pretrained model in eval mode on the cache's device (and memory format), as
        frozen blocks run in the training they stand in for; put back as it was afterwards (it is
        the workbench's model, which others copy from)."""
        was_training = self.model.training
        home = device_of(self.model)
        self.model.to(self.device).eval()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            if self.channels_last:
                self.model.to(memory_format=torch.contiguous_format)
            self.model.to(home).train(was_training)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------- training the suffix


class _Suffix(nn.Module):
    """Blocks k..end of ``model`` as a module: trains and saves the whole model's state."""

    def __init__(self, model: nn.Module, stages: Sequence[Stage], start: int) -> None:
        super().__init__()
        self.model = model
        self._stages = list(stages)[start:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self._stages:
            x = stage(x)
        return x


def train_plan_cached(
    model: nn.Module,
    partition: BlockPartition,
    plan: FineTunePlan,
    train_features: FeatureDataset,
    val_features: FeatureDataset,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    hooks: TrainHooks | None = None,
) -> tuple[nn.Module, TrainResult]:
    """``training.train_plan`` on features cached after the plan's frozen prefix.

    The same steps in the same order (copy, seed, new head, apply the plan), so for one seed the
    trained suffix sees the same batches and random numbers as uncached training would.
    Augmentation needs the images, so an augmented config is refused here.
    """
    if config.augment:
        raise ValueError("augmentation needs the images: train an augmented plan uncached")
    k = plan.frozen_prefix
    model = copy.deepcopy(model)
    seed_everything(seed)
    reinit_head(model, partition, seed)
    groups = apply_plan(model, partition, plan, config.base_lr, frozen_eval=config.frozen_eval)
    stages = block_chain(model, partition)
    if stages is None:
        raise RuntimeError("the model's block chain disappeared after copying")
    suffix = _Suffix(model, stages, k)
    result = fine_tune(suffix, groups, train_features, val_features, config, seed, device, hooks)
    return model, result


def train_plan_fast(
    model: nn.Module,
    partition: BlockPartition,
    plan: FineTunePlan,
    train_data: Dataset,
    val_data: Dataset,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | None = None,
    cache: FeatureCache | None = None,
    keys: tuple[Hashable, Hashable] = ("train", "val"),
    hooks: TrainHooks | None = None,
) -> tuple[nn.Module, TrainResult, int]:
    """``training.train_plan``, on cached features of the plan's frozen prefix when it can.

    Returns the trained model, its result and how many leading blocks were served from ``cache``
    (0: trained uncached, because there is no cache, nothing frozen in front, no room, or the
    training augments its images).
    """
    usable = cache is not None and config.frozen_eval and not config.augment
    k = plan.frozen_prefix if usable else 0
    if k:
        sizes = batch_sizes_for(len(train_data), config.batch_size)  # type: ignore[arg-type]
        room = cache.entry_bytes(train_data, k, sizes) + cache.entry_bytes(val_data, k)
        fits = room <= cache.budget_bytes
        train_f = cache.features(keys[0], train_data, k, sizes) if fits else None
        val_f = cache.features(keys[1], val_data, k) if train_f is not None else None
        if train_f is not None and val_f is not None:
            trained, result = train_plan_cached(
                model, partition, plan, train_f, val_f, config, seed, device, hooks
            )
            return trained, result, k
    trained, result = train_plan(
        model,
        partition,
        plan,
        train_data,
        val_data,
        config,
        seed=seed,
        device=device,
        hooks=hooks,
    )
    return trained, result, 0
