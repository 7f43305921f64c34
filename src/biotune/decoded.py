"""Images decoded once: uint8 pixels that every training of a search reads in batches.

Decoding a JPEG photo and resizing it to 224 px costs about 7 ms, more than a training step
spends on the image on a small machine, and a search reads each image in every epoch of every
evaluation. So the images of a folder or a torchvision dataset go through the PIL part of the
preprocessing (RGB, resize, centre crop) once, into one N x 3 x S x S uint8 store (a quarter of
float32): in memory when it is small, else in a memory-mapped file in a cache folder, which other
processes of the search (workers, a resumed run) open instead of decoding again. Batches are
gathered from the store and normalised as ``ToTensor`` and ``Normalize`` would, element by
element, so training from the store is bit-identical to reading the images lazily. On a GPU the
store moves to the device once where it fits, and batches are gathered and normalised there (no
host work per step).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from biotune.errors import BioTuneError

#: Stores up to this size stay in process memory; larger ones live in a memory-mapped file, which
#: the operating system pages in and out and every process of a search shares.
IN_MEMORY_BYTES = 512 * 2**20
#: Where file-backed stores go (``BIOTUNE_DECODED_DIR`` overrides it).
DEFAULT_DECODED_DIR = Path.home() / ".cache" / "biotune" / "decoded"
#: A store is copied to a GPU when it takes at most this share of the GPU's free memory.
DEVICE_SHARE = 0.25
#: Disk a file-backed store leaves free: writing a memory map on a full disk kills the process
#: (SIGBUS) rather than raising an error.
DISK_HEADROOM = 2**30
#: Bump when the pixels a file decodes to change, so old store files are not reused.
_FORMAT = 1


class NoRoomForStore(BioTuneError):
    """A file-backed store would not fit the free disk (the caller may read lazily instead)."""


class PixelStore:
    """uint8 pixels N x 3 x S x S (an array or a read-only memmap), plus copies on devices.

    Pickles as its file path when it has one, so a worker process maps the same file."""

    def __init__(self, pixels: np.ndarray, path: Path | None = None) -> None:
        self.pixels = pixels
        self.path = path
        self._on_device: dict[torch.device, torch.Tensor | None] = {}

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def gather(self, rows: np.ndarray, device: torch.device | None) -> torch.Tensor:
        """The uint8 pixels of ``rows``, on ``device`` (the CPU if None)."""
        device = torch.device("cpu") if device is None else device
        if device.type != "cpu":
            whole = self._device_copy(device)
            if whole is not None:
                return whole[torch.from_numpy(rows).to(device, non_blocking=True)]
        batch = torch.from_numpy(self.pixels[rows])
        if device.type == "cuda":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)

    def _device_copy(self, device: torch.device) -> torch.Tensor | None:
        if device not in self._on_device:
            fits = device.type != "cuda"
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                fits = self.nbytes <= DEVICE_SHARE * free
            self._on_device[device] = _read_only(self.pixels).to(device) if fits else None
        return self._on_device[device]

    def __getstate__(self) -> dict[str, Any]:
        if self.path is not None:
            return {"path": self.path, "shape": self.pixels.shape}
        return {"pixels": np.asarray(self.pixels)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "path" in state:
            pixels = np.memmap(state["path"], np.uint8, "r", shape=tuple(state["shape"]))
            self.__init__(pixels, state["path"])  # type: ignore[misc]
        else:
            self.__init__(state["pixels"])  # type: ignore[misc]


class DecodedImages(Dataset):
    """Some rows of a ``PixelStore`` with their labels, normalised per batch on the way out.

    ``batch(idx, device)`` is what ``training.BatchReader`` reads; ``take`` makes a subset that
    shares the store (a search's folds copy no pixels). ``files``: where each image came from."""

    def __init__(
        self,
        store: PixelStore,
        rows: np.ndarray,
        targets: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        files: Sequence[Path] | None = None,
    ) -> None:
        self.store = store
        self.files = list(files) if files is not None else None
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if len(self.rows) != len(self.targets):
            raise ValueError(f"{len(self.rows)} rows but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.batch(torch.tensor([index]))[0], int(self.targets[index])

    def take(self, indices: np.ndarray) -> DecodedImages:
        files = None if self.files is None else [self.files[i] for i in indices]
        return DecodedImages(
            self.store, self.rows[indices], self.targets[indices], self.mean, self.std, files
        )

    def batch(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Images ``index`` as float32, normalised on ``device`` with ``ToTensor`` and
        ``Normalize``'s arithmetic (divide by 255, subtract the mean, divide by the std)."""
        pixels = self.store.gather(self.rows[index.numpy()], device)
        if pixels.device not in self._stats:
            stats = torch.tensor([self.mean, self.std], dtype=torch.float32).view(2, -1, 1, 1)
            self._stats[pixels.device] = tuple(stats.to(pixels.device))  # type: ignore[assignment]
        mean, std = self._stats[pixels.device]
        return pixels.float().div_(255).sub_(mean).div_(std)


def decode_images(
    items: Sequence[Any],
    size: int,
    to_pixels: Callable[[Any], Any],
    folder: Path | None = None,
    workers: int | None = None,
    identity: Any = None,
) -> PixelStore:
    """Decode ``items`` once into a store; ``to_pixels(item)`` gives one H x W x 3 uint8 image
    of side ``size`` (a PIL image or an array).

    In memory up to ``IN_MEMORY_BYTES``, else a file in ``folder`` (``decoded_dir()`` if None)
    named by ``identity`` (a JSON value; None: the items are files, named by their paths, sizes
    and times, ``file_stats``) and the image size: an existing one is mapped, not decoded again;
    ``NoRoomForStore`` if a new one would not fit the disk. ``workers``: decoding processes
    (None: one per spare core)."""
    shape = (len(items), 3, size, size)
    nbytes = int(np.prod(shape))
    path = None
    if nbytes > IN_MEMORY_BYTES or folder is not None:
        key = store_key(file_stats(items) if identity is None else identity, size)
        path = (folder or decoded_dir()) / f"{key}-{size}px.u8"
        if path.exists() and path.stat().st_size == nbytes:
            return PixelStore(np.memmap(path, np.uint8, "r", shape=shape), path)
    if path is None:
        pixels = np.empty(shape, dtype=np.uint8)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < nbytes + DISK_HEADROOM:
            raise NoRoomForStore(
                f"the decoded images need {_gib(nbytes)} under '{path.parent}', which has "
                f"{_gib(free)} free (BIOTUNE_DECODED_DIR moves them to a larger disk)"
            )
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        pixels = np.memmap(partial, np.uint8, "w+", shape=shape)
    loader = DataLoader(
        _Pixels(items, to_pixels),
        batch_size=None,
        num_workers=_decode_workers(len(items)) if workers is None else workers,
    )
    for i, image in enumerate(loader):
        if isinstance(image, str):  # a worker's error, as one line rather than its traceback
            raise BioTuneError(image)
        pixels[i] = image.permute(2, 0, 1)
    if path is None:
        return PixelStore(pixels)
    pixels.flush()
    del pixels
    os.replace(partial, path)  # whole or absent: a crash leaves no half-written store
    return PixelStore(np.memmap(path, np.uint8, "r", shape=shape), path)


def _read_only(pixels: np.ndarray) -> torch.Tensor:
    """A tensor on a read-only memmap, without a copy (it is only ever read: copied to a device),
    and without torch's warning that the array is not writable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels)


def decoded_dir() -> Path:
    """Where file-backed stores are kept: ``BIOTUNE_DECODED_DIR``, else the user's cache."""
    given = os.environ.get("BIOTUNE_DECODED_DIR")
    return Path(given).expanduser() if given else DEFAULT_DECODED_DIR


class _Pixels(Dataset):
    """One item -> H x W x 3 uint8 tensor (what a decoding worker returns), or the one-line
    error that names a file that could not be read."""

    def __init__(self, items: Sequence[Any], to_pixels: Callable[[Any], Any]) -> None:
        self.items = list(items)
        self.to_pixels = to_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        try:
            image = self.to_pixels(self.items[index])
        except BioTuneError as error:
            return str(error)
        return torch.from_numpy(np.array(image, dtype=np.uint8))


def file_stats(files: Sequence[str | Path]) -> list[list[Any]]:
    """Each file's resolved path, size and modification time: a store of files is named by
    these, so that a changed file is decoded again."""
    stats = []
    for f in files:
        st = Path(f).stat()
        stats.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return stats


def store_key(identity: Any, size: int) -> str:
    """A store file's name: what its pixels are (``identity``, a JSON value) at side ``size``."""
    text = json.dumps([_FORMAT, size, identity], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _decode_workers(n: int) -> int:
    """A decoding process per spare core (none for a few images, none inside a daemon)."""
    if n < 64 or multiprocessing.current_process().daemon:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 0 if (cores or 1) < 3 else min(8, cores - 1)  # one worker alone only adds overhead
