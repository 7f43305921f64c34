"""Model families: each claims its models, and its blocks, classifier and forward steps agree."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import timm
import torch
import torchvision.models as tv
from conftest import make_tiny_cnn
from test_blocks import TokenNet
from torch import nn

import biotune.families as families
from biotune.blocks import partition_blocks
from biotune.errors import BioTuneError
from biotune.families import Family, family_of, get_family, list_families, module_op, register
from biotune.features import block_chain
from biotune.modules import under


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _tiny_tv_vit() -> nn.Module:
    size = {"num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
    return tv.VisionTransformer(image_size=32, patch_size=16, num_classes=10, **size)


# model -> (builder, the family that must claim it, whether the feature cache gets a chain)
MODELS: dict[str, tuple[Callable[[], nn.Module], str, bool]] = {
    "tv-resnet18": (lambda: tv.resnet18(num_classes=10), "tv-resnet", True),
    "tv-densenet121": (lambda: tv.densenet121(num_classes=10), "tv-densenet", True),
    "tv-vgg11": (lambda: tv.vgg11(num_classes=10), "tv-vgg", True),
    "tv-alexnet": (lambda: tv.alexnet(num_classes=10), "tv-vgg", True),
    "tv-mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), "tv-mobile", True),
    "tv-mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), "tv-mobile", True),
    "tv-efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=10), "tv-mobile", True),
    "tv-convnext_tiny": (lambda: tv.convnext_tiny(num_classes=10), "tv-convnext", True),
    "tv-swin_t": (lambda: tv.swin_t(num_classes=10), "tv-swin", False),
    "tv-vit": (_tiny_tv_vit, "tv-vit", False),
    "tv-squeezenet": (lambda: tv.squeezenet1_0(num_classes=10), "auto", False),
    "timm-resnet18": (_timm("resnet18"), "timm-resnet", True),
    "timm-tf_efficientnet_lite0": (_timm("tf_efficientnet_lite0"), "timm-efficientnet", True),
    "timm-efficientnet_b0": (_timm("efficientnet_b0"), "timm-efficientnet", True),
    "timm-vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32), "timm", False),
    "timm-convnext_atto": (_timm("convnext_atto"), "timm", False),
    "sequential": (make_tiny_cnn, "auto", True),
    "custom-module": (TokenNet, "auto", False),
}


@cache
def _model(name: str) -> nn.Module:
    """On the meta device: families read names, shapes and types, never values."""
    with torch.device("meta"):
        return MODELS[name][0]()


all_models = pytest.mark.parametrize("name", list(MODELS))


def test_every_family_is_listed_once_with_auto_last_and_has_a_model_here() -> None:
    names = list_families()
    assert len(names) == len(set(names))
    assert names[-1] == "auto"
    assert names.index("timm") > max(i for i, n in enumerate(names) if n.startswith("timm-"))
    tested = {family for _, family, _ in MODELS.values()}
    tested.add("tv-regnet")  # test_regnet_family: RegNet cannot be built on the meta device
    assert set(names) == tested, "a family needs a model in this test"


@all_models
def test_each_model_is_claimed_by_its_family_and_by_no_other_of_that_scope(name: str) -> None:
    model, expected = _model(name), MODELS[name][1]
    assert family_of(model).name == expected
    family = get_family(expected)
    rivals = [
        f.name
        for f in map(get_family, list_families())
        if f.scope == family.scope and f is not family and f.matches(model)
    ]
    assert rivals == []


@all_models
def test_the_head_block_holds_exactly_the_family_classifier(name: str) -> None:
    model = _model(name)
    classifier = family_of(model).classifier(model)
    params = [n for n, _ in model.named_parameters()]
    assert classifier
    assert list(partition_blocks(model)["head"].param_names) == under(params, classifier)


@all_models
def test_a_forward_chain_exists_exactly_for_the_families_that_list_steps(name: str) -> None:
    model = _model(name)
    partition = partition_blocks(model)
    stages = block_chain(model, partition)
    assert (stages is not None) == MODELS[name][2]
    if stages is not None:
        assert len(stages) == len(partition)


def test_regnet_family() -> None:
    """The example family (families/regnet.py): blocks, classifier and a chain equal to forward."""
    torch.manual_seed(0)
    model = tv.regnet_y_400mf(num_classes=10).eval()
    assert family_of(model).name == "tv-regnet"
    assert family_of(model).classifier(model) == ["fc"]
    partition = partition_blocks(model)
    assert partition.names == ("stem", "block1", "block2", "block3", "block4", "head")
    assert partition["head"].param_names == ("fc.weight", "fc.bias")
    x = torch.randn(2, 3, 32, 32)
    stages = block_chain(model, partition, x)
    assert stages is not None
    out = x
    with torch.no_grad():
        for stage in stages:
            out = stage(out)
        assert torch.allclose(out, model(x), atol=1e-5)


# --------------------------------------------------------------------------------- the registry


class _TwoTower(nn.Module):
    """A model no family knows: the automatic partition would not split it this way."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(self.tower(x)).flatten(1))


def _two_tower_family() -> Family:
    return Family(
        "two-tower",
        matches=lambda model: isinstance(model, _TwoTower),
        blocks=lambda model: [("first", ["tower.0"]), ("second", ["tower.2"]), ("head", ["out"])],
        classifier=lambda model: ["out"],
        forward_ops=lambda model: [
            module_op(model, "tower"),
            module_op(model, "pool"),
            families.Op(None, lambda x: x.flatten(1)),
            module_op(model, "out"),
        ],
    )


def test_a_registered_family_decides_blocks_chain_and_classifier(monkeypatch) -> None:
    list_families()  # load every family before swapping the registry out
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))
    register(_two_tower_family())
    torch.manual_seed(0)
    model = _TwoTower().eval()
    assert list_families()[-2:] == ["timm", "auto"]
    partition = partition_blocks(model)
    assert partition.names == ("first", "second", "head")
    x = torch.randn(2, 3, 8, 8)
    stages = block_chain(model, partition, x)
    assert stages is not None
    with torch.no_grad():
        assert torch.allclose(stages[2](stages[1](stages[0](x))), model(x))

    from biotune.models import reset_head

    reset_head(model, 5)
    assert model.out.out_features == 5


def test_two_families_of_one_name_are_refused(monkeypatch) -> None:
    list_families()
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))
    with pytest.raises(BioTuneError, match="two model families are called 'tv-resnet'"):
        register(Family("tv-resnet", lambda m: False, lambda m: [], lambda m: []))


def test_an_unknown_family_name_lists_the_known_ones() -> None:
    with pytest.raises(BioTuneError, match="unknown model family 'nope'; families are: .*auto"):
        get_family("nope")


def test_a_family_scope_is_checked() -> None:
    with pytest.raises(ValueError, match="scope"):
        Family("x", lambda m: False, lambda m: [], lambda m: [], scope="everything")
