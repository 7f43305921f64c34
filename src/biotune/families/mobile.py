"""EfficientNet and MobileNet: stem, stages, the 1x1 conv neck, the classifier.

torchvision's EfficientNet, MobileNetV2 and MobileNetV3, and timm's EfficientNet class (which
also builds timm's EfficientNet-Lite and MobileNetV2); timm's blocks are its own groups.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from biotune.families import register
from biotune.families._base import (
    BlockSpec,
    Family,
    Op,
    dropout_op,
    flatten_op,
    function_op,
    module_ops,
)
from biotune.families._torchvision import (
    classifier_spec,
    is_instance,
    last_layer,
    torchvision_family,
)
from biotune.families.timm_generic import is_timm_class, timm_blocks, timm_classifier
from biotune.modules import param_children


def _blocks(model: nn.Module) -> BlockSpec:
    """features[0] is the stem, features[-1] the neck. EfficientNet's features hold one
    Sequential per stage; MobileNet's hold single inverted residuals, grouped here into stages
    by their output width."""
    layers = param_children(model.features)
    (first, _), (last, _), middle = layers[0], layers[-1], layers[1:-1]
    if all(isinstance(m, nn.Sequential) for _, m in middle):
        stages = [(f"features.{name}", [f"features.{name}"]) for name, _ in middle]
    else:
        widths: list[tuple[int | None, list[str]]] = []
        for name, module in middle:
            width = _out_channels(module)
            if not widths or widths[-1][0] != width:
                widths.append((width, []))
            widths[-1][1].append(f"features.{name}")
        stages = [(f"stage{i}", prefixes) for i, (_, prefixes) in enumerate(widths, 1)]
    return [
        ("stem", [f"features.{first}"]),
        *stages,
        ("neck", [f"features.{last}"]),
        *classifier_spec(model, "classifier", hidden="classifier"),
    ]


def _out_channels(module: nn.Module) -> int | None:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else getattr(module, "out_channels", None)


def _forward_ops(model: nn.Module) -> list[Op]:
    if is_instance(model, "MobileNetV2"):  # pools functionally
        pool = function_op(lambda x: F.adaptive_avg_pool2d(x, (1, 1)))
    else:
        (pool,) = module_ops(model, "avgpool")
    return [*module_ops(model, "features"), pool, flatten_op(), *module_ops(model, "classifier")]


def _timm_forward_ops(model: nn.Module) -> list[Op]:
    steps = module_ops(model, "conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")
    return [*steps, dropout_op(model), *module_ops(model, "classifier")]


register(
    torchvision_family(
        "tv-mobile",
        ("EfficientNet", "MobileNetV2", "MobileNetV3"),
        _blocks,
        last_layer("classifier"),
        _forward_ops,
    )
)
register(
    Family(
        "timm-efficientnet",
        matches=lambda model: is_timm_class(model, "efficientnet", "EfficientNet"),
        blocks=timm_blocks,
        classifier=timm_classifier,
        forward_ops=_timm_forward_ops,
    )
)
