"""Your model and data in: a user's ``nn.Module`` and Datasets made ready for a search.

The named route (``model="efficientnet_lite0"``, ``dataset="animal-shape"``) loads both from
their sources; this module takes objects instead. Fingerprints of the model (class, parameter
names and shapes), of its weights (a hash of the state dict, the new head excepted) and of the
data (sizes, classes, labels, files) go into the run directory, so a resumed search notices that
any of them changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from biotune.blocks import BlockPartition
from biotune.data import DatasetSplits, split_dataset, with_targets
from biotune.errors import BioTuneError
from biotune.models import LoadedModel
from biotune.training import device_of


def fingerprint(data: Any) -> str:
    """A sha256 of JSON data (keys sorted): equal exactly when the data are equal."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """What makes two architectures interchangeable for a search: class, parameter names and
    shapes (``weights_fingerprint`` covers the values)."""
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    return fingerprint([kind, [[n, list(p.shape)] for n, p in model.named_parameters()]])


def weights_fingerprint(model: nn.Module, partition: BlockPartition) -> str:
    """A sha256 of the model's state dict (parameters and buffers, names, dtypes and values),
    the new head's excepted: it is re-drawn per seed, so its initial values never matter. The
    same architecture with other weights is another starting point for every evaluation."""
    head = set(partition.blocks[-1].module_names)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] in head:
            continue
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def data_fingerprint(splits: DatasetSplits) -> str:
    """Sizes, class names, every split's labels and, for image folders, its file list."""
    parts: list[Any] = [splits.classes, splits.image_size]
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        if ds is None:
            parts.append(None)
            continue
        labels = np.asarray(ds.targets, dtype=np.int64)
        files = [str(f) for f in getattr(ds, "files", [])]
        parts.append([len(labels), hashlib.sha256(labels.tobytes()).hexdigest(), files])
    return fingerprint(parts)


def user_splits(
    train: Dataset,
    val: Dataset | None = None,
    test: Dataset | None = None,
    *,
    classes: Sequence[str] | None = None,
    name: str = "user-data",
    seed: int = 0,
) -> DatasetSplits:
    """Datasets of (image tensor, label) pairs as splits; without ``val``, ``train`` is split
    60 / 20 / 20 into train / val / test (stratified, ``seed``). Labels are read once and kept."""
    if val is None:
        if test is not None:
            raise BioTuneError("give val as well as test, or neither (then train is split)")
        train, val, test = split_dataset(train, seed)
    train, val = with_targets(train), with_targets(val)
    test = with_targets(test) if test is not None else None
    labels = np.concatenate([np.asarray(d.targets) for d in (train, val, test) if d is not None])
    if len(labels) == 0 or labels.min() < 0:
        raise BioTuneError("labels must be integers 0 .. classes - 1")
    count = int(labels.max()) + 1
    names = [str(c) for c in classes] if classes is not None else [str(c) for c in range(count)]
    if len(names) < count:
        raise BioTuneError(f"{len(names)} class names for labels up to {count - 1}")
    sample, _ = train[0]
    if not isinstance(sample, torch.Tensor) or sample.ndim != 3:
        raise BioTuneError(
            "dataset items must be (image tensor C x H x W, label) pairs, got "
            f"{type(sample).__name__}"
        )
    return DatasetSplits(name, names, train, val, test, int(sample.shape[-1]))


def user_model(
    model: nn.Module,
    num_classes: int,
    sample: torch.Tensor,
    *,
    name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LoadedModel:
    """A user's classifier, checked to give ``num_classes`` outputs for ``sample`` (one image).

    Its last layer is the new head and must already have that many outputs; it is re-drawn per
    seed, parameters frozen in it included (they stay frozen).
    """
    if not isinstance(model, nn.Module):
        raise BioTuneError(f"model must be a name or an nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample.unsqueeze(0).to(device_of(model)))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward: one line
        raise BioTuneError(
            f"{type(model).__name__} cannot run on a {tuple(sample.shape)} "
            f"image from the data: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BioTuneError(
            f"{type(model).__name__} gives outputs of shape {shape} for one "
            f"image; the data has {num_classes} classes: give it a head with "
            f"{num_classes} outputs"
        )
    return LoadedModel(
        model=model,
        name=name or f"user:{type(model).__qualname__}",
        input_size=int(sample.shape[-1]),
        mean=tuple(mean) if mean is not None else (0.0, 0.0, 0.0),  # type: ignore[arg-type]
        std=tuple(std) if std is not None else (1.0, 1.0, 1.0),  # type: ignore[arg-type]
        pretrained="given by the user",
    )


def read_blocks(path: str) -> dict[str, list[str]]:
    """A ``--blocks FILE.json``: {"block name": ["module prefix or regex", ...], ...} in order."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise BioTuneError(f"cannot read blocks file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise BioTuneError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    return check_blocks(data, path)


def check_blocks(data: Any, source: str = "blocks") -> dict[str, list[str]]:
    """Validate a block override: a non-empty mapping of names to lists of pattern strings."""
    if not isinstance(data, Mapping) or not data:
        raise BioTuneError(f'{source}: expected {{"block name": ["module prefix", ...], ...}}')
    out: dict[str, list[str]] = {}
    for key, patterns in data.items():
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise BioTuneError(f"{source}: block {key!r} needs a list of pattern strings")
        out[str(key)] = list(patterns)
    return out
