"""``model.weights: default`` for torchvision backbones: its ImageNet weights from torch hub's cache.

torch hub's cache is faked in a temporary TORCH_HOME holding a state dict written here under the
file name torchvision's weight enum gives; every download is replaced, so nothing is fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from retrieval.compare import load_compare_config
from retrieval.config import load_config
from retrieval.conse import imagenet_class_names
from retrieval.data import list_shards
from retrieval.embed import feature_cache_path
from retrieval.errors import DataError
from retrieval.models import BACKBONES, create_backbone
from retrieval.models.backbones import (
    TORCHVISION_BACKBONES,
    torchvision_default_weights,
    torchvision_weights_file,
    weights_identity,
)
from tests.conftest import PROJECT_ROOT, demo_config
from tests.test_checkpoint import RunsShellCommand
from tests.test_refusals import one_line_error, run_options

SMALLEST = "mobilenet_v3_small"  # 2.5 M parameters: a 10 MB file in the fake cache
SMALLEST_FILE = "mobilenet_v3_small-047dcff4.pth"  # the file name of torchvision's URL for its DEFAULT weights


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME: torch hub's cache is ``<it>/hub/checkpoints``."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


@pytest.fixture
def downloads(monkeypatch) -> list[tuple]:
    """Every call of torch hub's download is recorded and fails as it does offline."""
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return calls


def distinctive_state(name: str) -> dict[str, torch.Tensor]:
    """A full state dict of torchvision's ``name`` in which every tensor differs from a fresh initialisation."""
    torch.manual_seed(1234)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    def changed(key: str, value: torch.Tensor) -> torch.Tensor:
        if not value.is_floating_point():
            return value + 7  # num_batches_tracked
        if key.endswith("running_var"):
            return value * (0.5 + torch.rand_like(value))  # stays positive
        return value + 0.1 * torch.randn_like(value)

    return {key: changed(key, value) for key, value in state.items()}


def loaded_state(backbone) -> dict[str, torch.Tensor]:
    """The backbone's tensors under the whole model's names (the head sits in ``classifier``)."""
    trunk = backbone.module.state_dict()
    head = {f"classifier.{key}": value for key, value in backbone.classifier.state_dict().items()}
    return {**trunk, **head}


def test_default_means_torchvision_weights_named_default():
    assert str(torchvision_default_weights("resnet18")) == "ResNet18_Weights.IMAGENET1K_V1"
    assert str(torchvision_default_weights("resnet50")) == "ResNet50_Weights.IMAGENET1K_V2"
    assert torchvision_weights_file(torchvision_default_weights(SMALLEST)).name == SMALLEST_FILE


def test_default_loads_exactly_the_cached_file(torch_home, downloads):
    state = distinctive_state(SMALLEST)
    file = torch_home / "hub" / "checkpoints" / SMALLEST_FILE
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    backbone = create_backbone(SMALLEST, "default")
    assert downloads == []
    assert backbone.weights == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    loaded = loaded_state(backbone)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    # pooled features through the head give the whole model's logits: ConSE's classifier is ImageNet's head
    reference = torchvision.models.get_model(SMALLEST, weights=None)
    reference.load_state_dict(state)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = backbone.classifier.eval()(backbone.module.eval()(images))
        assert torch.allclose(logits, reference.eval()(images), atol=1e-5)


def test_missing_file_is_downloaded_into_the_cache_once(torch_home, monkeypatch):
    state = distinctive_state(SMALLEST)
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    weights = torchvision_default_weights(SMALLEST)
    first = create_backbone(SMALLEST, "default")
    second = create_backbone(SMALLEST, "default")
    target = torch_home / "hub" / "checkpoints" / SMALLEST_FILE
    assert calls == [(weights.url, str(target), "047dcff4")]  # checked against the sha256 prefix in its name
    for backbone in (first, second):
        assert all(torch.equal(loaded_state(backbone)[key], value) for key, value in state.items())


def test_missing_file_without_network_is_one_line_naming_file_folder_and_url(torch_home, downloads):
    weights = torchvision_default_weights(SMALLEST)
    folder = torch_home / "hub" / "checkpoints"
    with pytest.raises(DataError) as raised:
        create_backbone(SMALLEST, "default")
    message = str(raised.value)
    assert downloads == [(weights.url, str(folder / SMALLEST_FILE), "047dcff4")]
    assert len(message.splitlines()) == 1
    assert f"weights file {folder / SMALLEST_FILE} is missing" in message
    assert f"put {weights.url} in {folder} as {SMALLEST_FILE}" in message
    assert "Temporary failure in name resolution" in message
    assert "model.weights: random or a path to a state dict file" in message


def test_training_without_the_weights_is_one_line(sample_shards, torch_home, downloads, capsys, tmp_path):
    line = one_line_error(capsys, "train", *run_options(tmp_path / "run", sample_shards,
                                                        "model.backbone=resnet18", "model.weights=default"))
    assert str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in line
    assert downloads and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("content", ["garbage", "truncated", "pickle-running-code"])
def test_a_damaged_cached_file_is_one_line_naming_it(torch_home, downloads, content, tmp_path):
    file = torch_home / "hub" / "checkpoints" / SMALLEST_FILE
    file.parent.mkdir(parents=True)
    marker = tmp_path / "MARKER"
    if content == "garbage":
        file.write_bytes(b"\x00not a state dict")
    elif content == "truncated":
        torch.save(distinctive_state(SMALLEST), file)
        file.write_bytes(file.read_bytes()[:100_000])
    else:
        torch.save({"features.0.0.weight": RunsShellCommand(marker)}, file)
    with pytest.raises(DataError) as raised:
        create_backbone(SMALLEST, "default")
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and f"weights file {file} is not a PyTorch state dict" in message
    assert "delete it to download it again" in message and torchvision_default_weights(SMALLEST).url in message
    assert downloads == [] and not marker.exists()


def test_a_cached_file_of_another_model_is_one_line_naming_it(torch_home, downloads):
    file = torch_home / "hub" / "checkpoints" / SMALLEST_FILE
    file.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(3, 4)}, file)
    with pytest.raises(DataError, match=f"weights file {file} does not fit this backbone") as raised:
        create_backbone(SMALLEST, "default")
    assert len(str(raised.value).splitlines()) == 1


def test_random_and_file_weights_are_recorded(tmp_path, downloads):
    assert create_backbone("resnet18", "random").weights == "random"
    file = tmp_path / "mine.pt"
    torch.save(distinctive_state(SMALLEST), file)
    assert create_backbone(SMALLEST, str(file)).weights == str(file)
    assert downloads == []


@pytest.mark.parametrize("name", TORCHVISION_BACKBONES)
def test_torchvision_default_weights_fit_the_model_and_conse_class_order(name: str):
    """Offline checks against the enum's metadata: the built model has its parameter count, its 1000
    outputs follow the ImageNet class order ConSE names them by, and its inputs are normalised as ours."""
    weights = torchvision_default_weights(name)
    backbone = create_backbone(name, "random")
    parameters = [*backbone.module.parameters(), *backbone.classifier.parameters()]
    assert sum(p.numel() for p in parameters) == weights.meta["num_params"]
    assert list(weights.meta["categories"]) == imagenet_class_names()
    preprocess = weights.transforms()
    assert tuple(preprocess.mean) == backbone.mean and tuple(preprocess.std) == backbone.std


def test_every_torchvision_backbone_is_covered():
    assert set(TORCHVISION_BACKBONES) == set(BACKBONES.names()) - {"efficientnet-lite0"}


def old_cache_key(backbone: str, weights: str, image_size: int, split: str, shards: list[str]) -> str:
    """The feature-cache file name before ``default`` meant ImageNet weights for torchvision models."""
    identity = json.dumps([backbone, weights, image_size,
                           [(s, os.path.getsize(s), os.path.getmtime(s)) for s in shards]])
    return f"{split}-{hashlib.sha1(identity.encode()).hexdigest()[:16]}.pt"


def test_feature_cache_keys_tell_imagenet_from_random_weights(sample_shards, tmp_path):
    shards = list_shards(sample_shards, "val")
    assert weights_identity("resnet18", "default") == "ResNet18_Weights.IMAGENET1K_V1"
    names = {weights: feature_cache_path(tmp_path, "resnet18", weights, 64, "val", shards).name
             for weights in ("default", "random", "ResNet18_Weights.IMAGENET1K_V1")}
    assert names["default"] == names["ResNet18_Weights.IMAGENET1K_V1"] != names["random"]
    # features cached under "default" when it meant random weights are not read as ImageNet features
    assert names["default"] != old_cache_key("resnet18", "default", 64, "val", shards)
    # EfficientNet-Lite0's default was always its packaged file: its cached features stay valid
    lite = feature_cache_path(tmp_path, "efficientnet-lite0", "default", 64, "val", shards).name
    assert lite == old_cache_key("efficientnet-lite0", "default", 64, "val", shards)


def shipped_configs() -> list:
    """Every run config shipped (configs/, reports/, each compare variant) and the tests' demo config."""
    configs = [demo_config(Path("unused"))]
    for path in sorted([*(PROJECT_ROOT / "configs").glob("*.yaml"), *(PROJECT_ROOT / "reports").glob("*/*.yaml")]):
        if "\nvariants:" in path.read_text():
            spec = load_compare_config(path)
            configs += [spec.base] + [spec.config_for(variant, None) for variant in spec.variants]
        else:
            configs.append(load_config(path))
    return configs


def test_no_shipped_config_downloads_weights(torch_home, downloads, monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT / "configs")  # a report's copied compare config names its base from there
    pairs = {(config.model.backbone, config.model.weights) for config in shipped_configs()}
    assert pairs  # every backbone they name is built from files on disk
    for backbone, weights in sorted(pairs):
        create_backbone(backbone, weights)
    assert downloads == [] and not (torch_home / "hub").exists()
