"""Shared fixtures: a tiny CNN with BatchNorm and a tiny in-memory dataset."""

from __future__ import annotations

import os

# Tiny models on a shared 2-core machine run fastest on one thread (no OpenMP spin-waits);
# set before torch is imported so that subprocesses started by tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class TinyData(torch.utils.data.Dataset):
    """In-memory images with ``.images`` and ``.targets``, like biotune's offline datasets."""

    def __init__(self, images: torch.Tensor, targets: np.ndarray) -> None:
        self.images = images
        self.targets = np.asarray(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


def make_tiny_data(n: int = 96, classes: int = 3, size: int = 8, seed: int = 0) -> TinyData:
    """Learnable toy images: class c has a bright patch in a class-specific place."""
    g = torch.Generator().manual_seed(seed)
    targets = np.arange(n) % classes
    images = torch.randn(n, 3, size, size, generator=g) * 0.3
    for i, c in enumerate(targets):
        images[i, :, c * 2 : c * 2 + 3, 1:4] += 2.0
    return TinyData(images, targets)


def make_tiny_cnn(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        nn.Linear(16, classes),
    )


def tiny_search_args(
    population: int = 4,
    generations: int = 1,
    final_epochs: int = 1,
    final_seeds: str = "1",
    train_size: int = 40,
) -> list[str]:
    """``biotune search`` options for a search of seconds on the offline default data (Animal-
    Shape, 32 px): ``population`` x ``generations`` one-epoch evaluations, then the final runs."""
    val = max(train_size // 2, 10)
    return [
        *("--image-size", "32", "--train-size", str(train_size)),
        *("--val-size", str(val), "--test-size", str(val)),
        *("--population", str(population), "--initial-size", str(population)),
        *("--generations", str(generations)),
        *("--elite", "1", "--seeds", "1", "--epochs", "1"),
        *("--final-epochs", str(final_epochs), "--final-seeds", final_seeds),
    ]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other work shares the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return make_tiny_cnn()


@pytest.fixture
def tiny_data() -> TinyData:
    return make_tiny_data()
