"""What a model's blocks and a plan's training step cost, measured on the model (torch).

Every block's forward FLOPs on one image are measured once (``block_flops``,
``torch.utils.flop_counter``; convs and matmuls); ``biotune.core.cost`` turns them into the work
of a run and a search. What one plan costs to fine-tune (``PlanCosts``): the parameters it
trains, its training FLOPs per image, and the peak memory of one training step, measured
(``training_memory``).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from biotune.blocks import BlockPartition
from biotune.core.cost import image_work
from biotune.core.plan import BlockSetting, FineTunePlan, trained_mask
from biotune.errors import BioTuneError
from biotune.training import device_of


def block_flops(model: nn.Module, partition: BlockPartition, sample: torch.Tensor) -> list[float]:
    """Forward FLOPs per image of each block, measured on ``sample`` (one image, C x H x W).

    Each counted op goes to the block owning the innermost module that ran it; ops no block owns
    (functional code in a container's forward) are spread over the blocks by parameter count. If
    counting fails, parameter counts stand in (a proxy, proportional to FLOPs for dense layers).
    """
    params = [float(b.num_params) for b in partition]
    try:
        counts = _flop_counts(model, sample.unsqueeze(0) if sample.ndim == 3 else sample[:1])
    except Exception:  # an op the counter cannot trace: fall back to the proxy
        return params
    owner = {m: i for i, b in enumerate(partition) for m in b.module_names}
    per_block = [0.0] * len(partition)
    orphan = 0.0
    for module, flops in counts.items():
        block = _nearest_owner(module, owner)
        if block is None:
            orphan += flops
        else:
            per_block[block] += flops
    if sum(per_block) + orphan <= 0:
        return params
    total_params = sum(params) or 1.0
    return [f + orphan * p / total_params for f, p in zip(per_block, params, strict=True)]


def _flop_counts(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """FLOPs done directly inside each module (not in its children), by module path."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x.to(device_of(model)))
    finally:
        model.train(was_training)
    inclusive: dict[str, float] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        path = name.split(".", 1)[1] if "." in name else ""
        inclusive[path] = float(sum(ops.values()))
    exclusive = dict(inclusive)
    for path, flops in inclusive.items():
        if path:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            while parent not in inclusive and parent:
                parent = parent.rsplit(".", 1)[0] if "." in parent else ""
            if parent in exclusive:
                exclusive[parent] -= flops
    return exclusive


def _nearest_owner(path: str, owner: dict[str, int]) -> int | None:
    while path:
        if path in owner:
            return owner[path]
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return None


# -- what one plan costs ----------------------------------------------------------------------

MB = 2**20
#: The two small batch sizes a step is measured at; peak memory is extrapolated from them.
_PROBE_BATCHES = (2, 4)


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one float32 training step holds at its peak, in four parts.

    ``weights``: every parameter and buffer (the whole model is on the device); ``optimizer``:
    the optimizer's state for the trained parameters (Adam: two tensors of their size);
    ``batch``: the input images and labels; ``step``: the most bytes the step's own tensors hold
    at once (activations saved for the backward pass, gradients, temporaries), measured.
    """

    weights: int
    optimizer: int
    batch: int
    step: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.batch + self.step

    @property
    def total_mb(self) -> float:
        return self.total / MB

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created by the ops it sees while they live.

    Storages that existed before (``known``: weights, optimizer state, the batch) are not
    counted, nor in-place writes to them. A storage is counted when an op first returns it and
    uncounted when it is freed (Python storage objects live as long as their storage), so the
    bytes after each op form the step's allocation timeline.
    """

    def __init__(self, known: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.known = {id(t.untyped_storage()) for t in known}
        self.sizes: dict[int, int] = {}
        self.now = 0
        self.timeline: list[int] = []

    def _freed(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self.known:
                continue
            size = storage.nbytes()
            if key not in self.sizes:
                self.sizes[key] = 0
                weakref.finalize(storage, self._freed, key)
            self.now += size - self.sizes[key]  # a storage an op resized counts at its new size
            self.sizes[key] = size
        self.timeline.append(self.now)
        return out


def _step_timeline(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> list[int]:
    """Bytes held by the step's own tensors after each op of forward, backward and update."""
    known = [*model.parameters(), *model.buffers(), x, y]
    known += [
        v
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ]
    with _LiveBytes(known) as live:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    return live.timeline


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def training_memory(
    model: nn.Module,
    partition: BlockPartition,
    plan: FineTunePlan,
    sample: torch.Tensor,
    batch_size: int,
    optimizer: str = "adam",
    *,
    work_copy: bool = True,
) -> TrainingMemory:
    """Peak memory of one float32 training step under ``plan`` at ``batch_size``, measured.

    One step (forward, cross-entropy, backward, optimizer update, gradients released as the
    trainer does) runs on the CPU at batch sizes 2 and 4 (``sample``'s images, repeated) after a
    first step that creates the optimizer state; every tensor the step allocates is tracked
    while it lives (``_LiveBytes``). Each tensor's size is a fixed part plus a part per image, so
    the bytes after each op at ``batch_size`` follow from the two timelines op by op, and the
    peak is their largest (exact where the two runs execute the same ops, else the step is
    measured at ``batch_size``). Frozen blocks run in eval mode, as ``apply_plan`` holds them;
    learning rates are zero, so the model does not change. Device-independent, so one measure
    per trained set serves every machine; a GPU adds its kernels' workspaces, a mixed-precision
    step holds less. ``work_copy=False`` measures ``model`` itself (a copy kept for this).
    """
    from biotune.freezing import apply_plan
    from biotune.training import TrainConfig, make_optimizer

    if sample.ndim == 3:
        sample = sample.unsqueeze(0)
    net = copy.deepcopy(model) if work_copy else model
    net = net.cpu().float().train()
    groups = apply_plan(net, partition, plan, base_lr=0.0)
    opt = make_optimizer(groups, TrainConfig(optimizer=optimizer))
    for group in opt.param_groups:
        group["lr"] = 0.0
    with torch.random.fork_rng(devices=[]):
        x2, x4 = _probe(sample, 2), _probe(sample, 4)
        y2, y4 = torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long)
        loss = nn.functional.cross_entropy(net(x2), y2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        small, large = _step_timeline(net, opt, x2, y2), _step_timeline(net, opt, x4, y4)
        low, high = _PROBE_BATCHES
        if len(small) == len(large):
            per_image = [(b - a) / (high - low) for a, b in zip(small, large, strict=True)]
            step = max(a + (batch_size - low) * p for a, p in zip(small, per_image, strict=True))
        else:  # the two runs took different ops: measure at the batch size itself
            x = _probe(sample, batch_size)
            step = max(_step_timeline(net, opt, x, torch.zeros(batch_size, dtype=torch.long)))
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    image = sample[0].numel() * sample.element_size() + 8  # float32 pixels and an int64 label
    return TrainingMemory(
        weights=_tensor_bytes([*net.parameters(), *net.buffers()]),
        optimizer=_tensor_bytes(state),
        batch=image * batch_size,
        step=int(round(max(step, 0.0))),
    )


def _probe(sample: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` images from ``sample``, repeated as needed, as float32 on the CPU."""
    reps = -(-n // sample.shape[0])
    return sample.detach().float().cpu().repeat(reps, 1, 1, 1)[:n].contiguous()


class PlanCosts:
    """What fine-tuning under a plan costs on one model, by the set of blocks it trains.

    Parameters trained and FLOPs per training image come from per-block tables (parameters the
    user froze never count); peak training memory is measured once per trained set
    (``training_memory``, at the final recipe's batch size and optimizer) and cached, so a
    search's budget checks cost a few milliseconds each after the first.
    """

    def __init__(
        self,
        model: nn.Module,
        partition: BlockPartition,
        sample: torch.Tensor,
        flops: Sequence[float],
        batch_size: int,
        optimizer: str = "adam",
    ) -> None:
        from biotune.freezing import user_frozen

        held = user_frozen(model)
        self.partition = partition
        self.block_params = [
            sum(p.numel() for p in partition.parameters(model, b.name) if id(p) not in held)
            for b in partition
        ]
        self.total_params = sum(p.numel() for p in model.parameters())
        self.flops = [float(f) for f in flops]
        self.batch_size = int(batch_size)
        self.optimizer = optimizer
        self._model = model
        self._sample = sample.detach().cpu()[:4]
        self._work: nn.Module | None = None
        self._memory: dict[tuple[bool, ...], TrainingMemory] = {}

    def mask(self, plan_or_genes: Any) -> tuple[bool, ...]:
        """The trained set of a ``FineTunePlan``, a genome, or a mask itself."""
        if hasattr(plan_or_genes, "blocks"):
            return tuple(b.train for b in plan_or_genes.blocks)
        values = tuple(plan_or_genes)
        if len(values) == len(self.partition) and all(isinstance(v, bool) for v in values):
            return values
        return trained_mask(values)

    def trainable_params(self, mask: tuple[bool, ...]) -> int:
        return sum(n for n, t in zip(self.block_params, mask, strict=True) if t)

    def trainable_share(self, mask: tuple[bool, ...]) -> float:
        return self.trainable_params(mask) / self.total_params if self.total_params else 0.0

    def train_flops(self, mask: tuple[bool, ...], cached: bool = False) -> float:
        """Forward + backward FLOPs per training image; ``cached``: the frozen leading blocks'
        output comes from the feature cache, as biotune trains such a plan."""
        if not any(mask):
            return 0.0
        first = mask.index(True)
        return image_work(self.flops, first if cached else 0, first)[0]

    def memory(self, mask: tuple[bool, ...]) -> TrainingMemory:
        if mask not in self._memory:
            if not any(mask):
                raise BioTuneError("a plan that trains no block has no training step to measure")
            plan = FineTunePlan(
                tuple(
                    BlockSetting(name, train)
                    for name, train in zip(self.partition.names, mask, strict=True)
                )
            )
            if self._work is None:
                self._work = copy.deepcopy(self._model).cpu().float()
            self._memory[mask] = training_memory(
                self._work,
                self.partition,
                plan,
                self._sample,
                self.batch_size,
                self.optimizer,
                work_copy=False,
            )
        return self._memory[mask]

    def memory_mb(self, mask: tuple[bool, ...]) -> float:
        return self.memory(mask).total_mb

    def record(self, plan_or_genes: Any) -> dict[str, Any]:
        """A plan's costs as stored with its evaluation record and in ``pareto.json``."""
        mask = self.mask(plan_or_genes)
        if not any(mask):
            return {
                "trainable_params": 0,
                "trainable_share": 0.0,
                "memory_mb": None,
                "train_gflops": 0.0,
                "train_gflops_cached": 0.0,
            }
        return {
            "trainable_params": self.trainable_params(mask),
            "trainable_share": self.trainable_share(mask),
            "memory_mb": self.memory_mb(mask),
            "train_gflops": self.train_flops(mask) / 1e9,
            "train_gflops_cached": self.train_flops(mask, cached=True) / 1e9,
        }
