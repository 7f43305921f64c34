"""The fine-tuned model a user keeps: its weights (safetensors) and what is needed to use them.

A search's final training (the seed with the best validation score) and ``biotune train --save``
write a folder with ``model.safetensors`` and ``finetuned.json``: the architecture, the classes in
index order, the preprocessing, the plan and base learning rate, the data and the scores.
:func:`load_finetuned` turns the folder back into an ``nn.Module`` in eval mode plus the
preprocessing its inputs need; ``biotune predict`` uses it on image files.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from biotune.errors import BioTuneError

FORMAT = "biotune-finetuned/1"
WEIGHTS = "model.safetensors"
META = "finetuned.json"
#: How an image file is brought to the model's input size: "crop" resizes its short side to
#: size * 232 / 224 and crops the centre (folder and torchvision datasets, the paper's
#: evaluation); "squash" resizes the whole image to size x size (the offline datasets' arrays).
RESIZE_MODES = ("crop", "squash")
_USER_TENSORS = (
    "this model was trained on tensors you prepared: call finetuned.model on "
    "tensors prepared the same way"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass(frozen=True)
class Preprocess:
    """Image file or PIL image -> the normalised tensor (C x size x size) the model expects."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "crop"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise BioTuneError(
                f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}"
            )

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        from biotune.data import arrays_to_tensor, to_rgb, unreadable_reason

        if isinstance(image, (str, os.PathLike)):
            try:
                with Image.open(image) as opened:
                    opened.load()
                    image = opened.copy()
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
                raise BioTuneError(f"cannot read image {image}: {unreadable_reason(exc)}") from None
        image = to_rgb(image)
        if self.resize == "squash":  # exactly as the offline datasets' arrays are prepared
            pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None]
            return arrays_to_tensor(pixels, self.size, self.mean, self.std)[0]
        image = TF.center_crop(TF.resize(image, int(self.size * 232 / 224)), self.size)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }


@dataclass
class FineTuned:
    """A loaded fine-tuned model (eval mode), its preprocessing and its classes."""

    model: nn.Module
    preprocess: Preprocess | None  # None: trained on tensors the user prepared
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def probabilities(
        self, images: Any, batch_size: int = 64, prepared: bool = False
    ) -> torch.Tensor:
        """Class probabilities (N x classes) for image files or PIL images, or one of them
        (1 x classes); ``prepared``: tensors that went through ``preprocess`` already."""
        if self.preprocess is None and not prepared:
            raise BioTuneError(_USER_TENSORS)
        if _is_one_image(images, prepared):
            images = [images]
        prepare = (lambda im: im) if prepared else self.preprocess
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.stack([prepare(im) for im in images[start : start + batch_size]])
            out.append(torch.softmax(self.model(x.to(device)).float(), dim=1).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.classes))


def save_finetuned(
    directory: str | Path,
    model: nn.Module,
    *,
    architecture: str,
    classes: Sequence[str],
    preprocess: Preprocess | None,
    details: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``finetuned.json`` into ``directory`` (atomically each).

    ``architecture`` is a name :func:`biotune.load_model` rebuilds (``efficientnet_lite0``,
    ``tv:resnet50``, ``timm:...``) or ``user:<class>`` for a model only its author can rebuild
    (load it with ``load_finetuned(path, model=...)``). ``details``: plan, base lr, data, scores.
    """
    from safetensors.torch import save_model

    from biotune.runner.rundir import write_json_atomic

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{WEIGHTS}.tmp"
        save_model(_plain(model), str(tmp))
        os.replace(tmp, directory / WEIGHTS)
    except OSError as exc:
        raise BioTuneError(
            f"cannot write the fine-tuned model to {directory}: {exc.strerror or exc}"
        ) from None
    from biotune import __version__

    meta = {
        "format": FORMAT,
        "biotune": __version__,
        "architecture": architecture,
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocess": preprocess.to_dict() if preprocess is not None else None,
        **(details or {}),
    }
    write_json_atomic(directory / META, meta)
    return directory


def load_finetuned(
    path: str | Path, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> FineTuned:
    """Load a saved fine-tuned model, ready to predict (eval mode), with its preprocessing.

    ``path``: the folder (or its ``finetuned.json``). ``model``: the architecture, required for a
    user's own module (``user:`` architectures); otherwise rebuilt from the stored name.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_weights

    folder = Path(path)
    if folder.name == META:
        folder = folder.parent
    meta_file = folder / META
    try:
        meta = json.loads(meta_file.read_text())
    except OSError as exc:
        raise BioTuneError(
            f"cannot read {meta_file}: {exc.strerror or exc}; is {folder} a "
            "folder written by biotune (search run directory or train --save)?"
        ) from None
    except json.JSONDecodeError as exc:
        raise BioTuneError(f"{meta_file}: malformed JSON at line {exc.lineno}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BioTuneError(f"{meta_file}: not a biotune fine-tuned model (format {FORMAT})")
    architecture = str(meta["architecture"])
    if model is None:
        if architecture.startswith("user:"):
            raise BioTuneError(
                f"{folder} holds a user model ({architecture[5:]}): pass the "
                "module to load it into, load_finetuned(path, model=...)"
            )
        from biotune.models import load_model

        model = load_model(
            architecture, num_classes=int(meta["num_classes"]), pretrained=False
        ).model
    try:
        missing, unexpected = load_weights(_plain(model), str(folder / WEIGHTS), strict=False)
    except (OSError, RuntimeError, SafetensorError) as exc:  # missing, damaged or not weights
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BioTuneError(
            f"cannot load {folder / WEIGHTS}: {reason}; is the file complete? (save the "
            "model again: biotune train --save, or a search's final training)"
        ) from None
    if missing or unexpected:
        raise BioTuneError(
            f"{folder / WEIGHTS} does not fit the model: missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    p = meta.get("preprocess")
    preprocess = (
        Preprocess(int(p["size"]), tuple(p["mean"]), tuple(p["std"]), p.get("resize", "crop"))
        if p
        else None
    )
    return FineTuned(model.to(device).eval(), preprocess, list(meta["classes"]), meta)


def _is_one_image(images: Any, prepared: bool) -> bool:
    """One path, PIL image or prepared C x H x W tensor rather than a batch of them (a string
    is a sequence too, of letters)."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        return True
    return prepared and isinstance(images, torch.Tensor) and images.ndim == 3


def _plain(model: nn.Module) -> nn.Module:
    """Drop the eval-mode hooks ``apply_plan`` left: the saved model is an ordinary module."""
    for handle in getattr(model, "_biotune_eval_hooks", []):
        handle.remove()
    model._biotune_eval_hooks = []  # type: ignore[attr-defined]
    return model


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named, or found (recursively, sorted) in folders named; errors for none."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise BioTuneError(f"no such image file or folder: {p}")
    if not found:
        raise BioTuneError("no image files found in " + ", ".join(str(p) for p in paths))
    return found


def predict_files(
    finetuned: FineTuned, files: Sequence[Path], batch_size: int = 64, bad_images: str = "skip"
) -> list[dict[str, Any]]:
    """Per file: the predicted class (name and index) and its probability. Files are read one
    batch at a time, so a folder of any size fits in memory. A file that cannot be read
    (corrupt, or over PIL's decompression-bomb limit) is skipped with a warning naming it and
    why, or with ``bad_images="error"`` stops it; if none can be read, a one-line error."""
    if finetuned.preprocess is None:
        raise BioTuneError(_USER_TENSORS)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        readable, images = [], []
        for f in files[start : start + batch_size]:
            try:
                images.append(finetuned.preprocess(f))
            except BioTuneError as exc:
                if bad_images == "error":
                    raise
                warnings.warn(f"skipped {exc}", stacklevel=2)
                continue
            readable.append(f)
        if not readable:
            continue
        probs = finetuned.probabilities(images, batch_size=batch_size, prepared=True)
        best = probs.argmax(1)
        rows += [
            {
                "file": str(f),
                "class": finetuned.classes[int(i)],
                "index": int(i),
                "probability": float(probs[k, i]),
            }
            for k, (f, i) in enumerate(zip(readable, best, strict=True))
        ]
    if not rows:
        raise BioTuneError(f"none of the {len(files)} image file(s) could be read")
    return rows
