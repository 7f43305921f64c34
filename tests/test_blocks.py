"""Block partitions: every parameter in exactly one block, input -> output, classifier last."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache

import pytest
import timm
import torch
import torchvision.models as tv
from torch import nn

from biotune.blocks import BlockPartition, describe_blocks, partition_blocks
from biotune.errors import BioTuneError


class TokenNet(nn.Module):
    """A model unknown to every rule, holding a tensor on its root (like a class token)."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 8))
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.Sequential(
            *[nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(depth)]
        )
        self.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _small_sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.BatchNorm2d(16, affine=False),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _tiny_tv_vit() -> nn.Module:
    size = {"num_layers": 4, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
    return tv.VisionTransformer(image_size=32, patch_size=16, num_classes=10, **size)


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _stages(prefix: str, ids: range) -> list[str]:
    return [f"{prefix}{i}" for i in ids]


# arch -> (builder, expected block names or None where only the invariants are pinned down)
ARCHS: dict[str, tuple[Callable[[], nn.Module], list[str] | None]] = {
    "timm-tf_efficientnet_lite0": (
        _timm("tf_efficientnet_lite0"),
        ["stem", *_stages("blocks.", range(7)), "neck", "head"],
    ),
    "timm-resnet18": (_timm("resnet18"), ["stem", *_stages("layer", range(1, 5)), "head"]),
    "timm-convnext_atto": (
        _timm("convnext_atto"),
        ["stem", *_stages("stages.", range(4)), "neck", "head"],
    ),
    "timm-vit_tiny": (
        _timm("vit_tiny_patch16_224", img_size=32),
        ["stem", *_stages("blocks.", range(12)), "neck", "head"],
    ),
    "timm-deit_tiny_distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=32), None),
    "timm-swin_tiny": (
        _timm("swin_tiny_patch4_window7_224"),
        ["stem", *_stages("layers.", range(4)), "neck", "head"],
    ),
    "tv-resnet18": (
        lambda: tv.resnet18(num_classes=10),
        ["stem", *_stages("layer", range(1, 5)), "head"],
    ),
    "tv-resnet50": (
        lambda: tv.resnet50(num_classes=10),
        ["stem", *_stages("layer", range(1, 5)), "head"],
    ),
    "tv-densenet121": (
        lambda: tv.densenet121(num_classes=10),
        # the paper's nine DenseNet-121 blocks
        ["stem", "denseblock1", "transition1", "denseblock2", "transition2"]
        + ["denseblock3", "transition3", "denseblock4", "head"],
    ),
    "tv-vgg11": (
        lambda: tv.vgg11(num_classes=10),
        [*_stages("conv", range(1, 6)), "classifier", "head"],
    ),
    "tv-efficientnet_b0": (
        lambda: tv.efficientnet_b0(num_classes=10),
        ["stem", *_stages("features.", range(1, 8)), "neck", "head"],
    ),
    "tv-mobilenet_v2": (
        lambda: tv.mobilenet_v2(num_classes=10),
        ["stem", *_stages("stage", range(1, 8)), "neck", "head"],
    ),
    "tv-mobilenet_v3_small": (
        lambda: tv.mobilenet_v3_small(num_classes=10),
        ["stem", *_stages("stage", range(1, 6)), "neck", "classifier", "head"],
    ),
    "tv-convnext_tiny": (
        lambda: tv.convnext_tiny(num_classes=10),
        ["stem", *_stages("features.", range(1, 8)), "neck", "head"],
    ),
    "tv-vit": (_tiny_tv_vit, ["stem", *_stages("encoder_layer_", range(4)), "neck", "head"]),
    "tv-swin_t": (
        lambda: tv.swin_t(num_classes=10),
        ["stem", *_stages("features.", range(1, 8)), "neck", "head"],
    ),
    "custom-sequential": (_small_sequential, ["0+1", "3", "6+7", "head"]),
    "custom-module": (TokenNet, None),
}


@cache
def _model(arch: str) -> nn.Module:
    """Models live on the meta device: partitioning reads names and shapes, never values."""
    with torch.device("meta"):
        return ARCHS[arch][0]()


@cache
def _partition(arch: str) -> BlockPartition:
    return partition_blocks(_model(arch))


def _final_linear(model: nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


all_archs = pytest.mark.parametrize("arch", list(ARCHS))


@all_archs
def test_every_parameter_lies_in_exactly_one_block(arch: str) -> None:
    partition = _partition(arch)
    in_blocks = [p for block in partition for p in block.param_names]
    assert sorted(in_blocks) == sorted(n for n, _ in _model(arch).named_parameters())
    assert all(block.param_names for block in partition)


@all_archs
def test_blocks_run_from_input_to_output_with_head_last(arch: str) -> None:
    partition = _partition(arch)
    names = [n for n, _ in _model(arch).named_parameters()]
    order = [partition.names.index(partition.block_of(n)) for n in names]
    assert order == sorted(order)
    assert order[0] == 0
    assert partition.names[-1] == "head"


@all_archs
def test_head_holds_exactly_the_final_classifier(arch: str) -> None:
    model, head = _model(arch), _partition(arch)["head"]
    classifier = _final_linear(model)
    own = {f"{classifier}.{n}" for n, _ in model.get_submodule(classifier).named_parameters()}
    assert f"{classifier}.weight" in head.param_names
    if not arch.endswith("distilled"):  # a distilled ViT has two classifiers, both in the head
        assert set(head.param_names) == own


@pytest.mark.parametrize("arch", [a for a, (_, names) in ARCHS.items() if names])
def test_block_names_follow_the_architecture(arch: str) -> None:
    assert list(_partition(arch).names) == ARCHS[arch][1]


def test_default_model_has_ten_blocks_with_conv_head_as_neck() -> None:
    partition = _partition("timm-tf_efficientnet_lite0")
    assert len(partition) == 10
    assert partition["neck"].module_names == ("conv_head", "bn2")
    assert partition["head"].param_names == ("classifier.weight", "classifier.bias")


@all_archs
def test_summary_counts_every_parameter_once(arch: str) -> None:
    summary = _partition(arch).summary()
    total = sum(p.numel() for p in _model(arch).parameters())
    assert sum(count for _, count, _ in summary) == total
    assert sum(share for _, _, share in summary) == pytest.approx(1.0)
    assert [name for name, _, _ in summary] == list(_partition(arch).names)


@all_archs
def test_every_batchnorm_lies_in_exactly_one_block(arch: str) -> None:
    model, partition = _model(arch), _partition(arch)
    listed = [m for block in partition for m in block.module_names]
    assert len(listed) == len(set(listed))
    holders = {
        name
        for name, m in model.named_modules()
        if name and (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)))
    }
    assert set(listed) == holders
    batchnorm = nn.modules.batchnorm._NormBase
    assert {n for n, m in model.named_modules() if isinstance(m, batchnorm)} <= set(listed)


def test_module_of_a_block_holds_that_blocks_parameters() -> None:
    model, partition = _model("tv-resnet18"), _partition("tv-resnet18")
    stem = partition.modules(model, "stem")
    assert stem == [model.conv1, model.bn1]
    params = partition.parameters(model, "head")
    assert [id(p) for p in params] == [id(model.fc.weight), id(model.fc.bias)]


def test_batchnorm_without_affine_goes_with_the_layer_it_normalises() -> None:
    partition = _partition("custom-sequential")
    assert partition["3"].module_names == ("3", "4")


def test_root_tensors_join_the_first_block() -> None:
    partition = _partition("custom-module")
    assert partition[0].param_names[0] == "cls_token"
    assert partition.names[-1] == "head"
    assert partition["head"].param_names == ("classifier.2.weight", "classifier.2.bias")


def test_automatic_partition_keeps_to_twelve_blocks() -> None:
    with torch.device("meta"):
        partition = partition_blocks(TokenNet(depth=30))
    assert 3 <= len(partition) <= 12
    assert partition.names[-1] == "head"


def test_lora_wrapped_model_keeps_the_blocks_of_the_bare_model() -> None:
    peft = pytest.importorskip("peft")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    config = peft.LoraConfig(target_modules=["conv1", "conv2"], modules_to_save=["fc"], r=2)
    wrapped = peft.get_peft_model(model, config)
    partition = partition_blocks(wrapped)
    assert partition.names == ("stem", "layer1", "layer2", "layer3", "layer4", "head")
    assert sorted(p for b in partition for p in b.param_names) == sorted(
        n for n, _ in wrapped.named_parameters()
    )
    assert all(".fc." in p for p in partition["head"].param_names)
    assert any("lora_A" in p for p in partition["layer1"].param_names)


def test_override_sets_blocks_in_mapping_order() -> None:
    model = _model("tv-resnet18")
    partition = partition_blocks(
        model,
        {"early": ["conv1", "bn1", r"layer[12]"], "late": [r"layer[34]"], "head": ["fc"]},
    )
    assert partition.names == ("early", "late", "head")
    assert partition.block_of("layer2.0.conv1.weight") == "early"
    assert partition.block_of("layer4.1.bn2.bias") == "late"
    assert "bn1" in partition["early"].module_names


def test_override_prefix_matches_whole_module_names_only() -> None:
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    override = {"first": ["1"], "rest": [r"0|[2-9]|1[01]"]}
    partition = partition_blocks(model, override)
    assert partition["first"].param_names == ("1.weight", "1.bias")


def test_override_rejects_a_parameter_in_no_block() -> None:
    override = {"a": ["conv1", "bn1", "layer1"], "b": ["fc"]}
    message = r"no block for layer2\.0\.conv1\.weight, .*\(45 in all\)"
    with pytest.raises(BioTuneError, match=message):
        partition_blocks(_model("tv-resnet18"), override)


def test_override_rejects_a_parameter_in_two_blocks() -> None:
    override = {"a": ["conv1", "bn1", "layer1", "layer2"], "b": [r"layer[2-4]"], "head": ["fc"]}
    with pytest.raises(BioTuneError, match=r"more than one block.*\(a & b\)") as err:
        partition_blocks(_model("tv-resnet18"), override)
    assert "\n" not in str(err.value)


def test_override_rejects_a_block_that_matches_nothing() -> None:
    override = {"all": [r".*"], "ghost": ["nonexistent"]}
    with pytest.raises(BioTuneError, match="ghost"):
        partition_blocks(_model("tv-resnet18"), override)


def test_partition_survives_a_json_round_trip() -> None:
    partition = _partition("timm-tf_efficientnet_lite0")
    again = BlockPartition.from_dict(json.loads(json.dumps(partition.to_dict())))
    assert again == partition
    assert again.block_of("blocks.3.0.conv_pw.weight") == "blocks.3"


def test_blocks_are_found_by_name_or_index() -> None:
    partition = _partition("tv-resnet50")
    assert partition["layer2"] is partition[2]
    assert "layer2" in partition and "layer9" not in partition
    with pytest.raises(BioTuneError, match="unknown block 'layer9'"):
        partition["layer9"]


def test_describe_blocks_shows_every_block_with_its_size() -> None:
    text = describe_blocks(_partition("tv-densenet121"))
    for name in _partition("tv-densenet121").names:
        assert f" {name} " in text
    assert "features.denseblock1" in text
    assert text.splitlines()[-1].split()[0] == "total"


# --------------------------------------------------------------------- where the head is (16.1)


class _HeadFirst(nn.Module):
    """Registers its classifier before the body, and ends with a layer that is not the head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(self.proj(self.body(x)).mean((2, 3)))


class _Untraceable(nn.Module):
    """Data-dependent control flow (no fx trace); the classifier is the ``fc`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.conv = nn.Conv2d(3, 8, 3)
        self.extra = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = self.extra(x)
        return self.fc(x.mean((2, 3)))


class _HeadNamedBody(nn.Module):
    """A body layer called ``head`` and the classifier ``out``: block names must stay unique."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3)
        self.mid = nn.Conv2d(8, 8, 3)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.mid(self.head(x)).mean((2, 3)))


@pytest.mark.parametrize(
    "build, classifier",
    [(_HeadFirst, "head"), (_Untraceable, "fc"), (_HeadNamedBody, "out")],
    ids=["registered-first", "untraceable-attribute", "body-named-head"],
)
def test_the_head_is_the_classifier_the_forward_ends_with(build, classifier):
    model = build()
    partition = partition_blocks(model)
    assert len(set(partition.names)) == len(partition.names)
    assert partition.names[-1] == "head"
    assert set(partition[-1].param_names) == {f"{classifier}.weight", f"{classifier}.bias"}


def test_reinit_head_redraws_only_the_classifier_of_a_head_first_model():
    from biotune.training import reinit_head

    torch.manual_seed(0)
    model = _HeadFirst()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinit_head(model, partition_blocks(model), seed=5)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
