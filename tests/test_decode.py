"""Image decoding and augmentation: torchvision.io decodes to PIL's pixels under the pixel cap, the eval
transform matches the PIL one, the training crop and flip depend on (seed, epoch, key) alone, and the batched
decode on the training device (run here with device="cpu") gives the loader's own images."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

import retrieval.transforms as transforms_module
from retrieval.config import config_from_dict
from retrieval.data import (
    decode_sample,
    list_shards,
    make_loader,
    make_train_pipeline,
    records_from_jsonl,
    write_shards,
)
from retrieval.data.images import ImageTooLarge, decode_image_bytes
from retrieval.data.pipeline import EncodedImage, EpochSeed, collate_batch
from retrieval.data.skips import BadItem
from retrieval.errors import ConfigError, DataError
from retrieval.transforms import BatchDecoder, CropAndFlip, TrainAugment, eval_transform, resolve_decode_device
from tests.conftest import SAMPLE_CAPTIONS, demo_config

PHOTOS = sorted((SAMPLE_CAPTIONS.parent / "images").glob("*.jpg"))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 16


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def pil_pixels(data: bytes) -> torch.Tensor:
    """The reference: PIL's ``convert("RGB")``, as the readers decoded before."""
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def raw_sample(data: bytes, ext: str = "jpg", key: str = "a") -> dict:
    return {"__key__": key, "__url__": "s-000.tar", ext: data,
            "json": json.dumps({"key": key, "captions": ["x"], "meta": {}}).encode()}


# -- decoding ---------------------------------------------------------------------------------------------
def palette_with_transparency() -> Image.Image:
    image = noise(23, 17, 1).convert("P")
    image.info["transparency"] = 3
    return image


@pytest.mark.parametrize("image, fmt", [
    (noise(37, 23, 0), "JPEG"), (noise(37, 23, 0).convert("L"), "JPEG"), (noise(37, 23, 0), "PNG"),
    (noise(37, 23, 0).convert("RGBA"), "PNG"), (noise(37, 23, 0).convert("L"), "PNG"),
    (noise(37, 23, 0).convert("LA"), "PNG"), (noise(37, 23, 0).convert("1"), "PNG"),
    (palette_with_transparency(), "PNG"),
    (noise(37, 23, 0).convert("CMYK"), "JPEG"), (noise(37, 23, 0), "WEBP"), (noise(37, 23, 0), "BMP"),
], ids=["jpeg", "jpeg-gray", "png", "png-rgba", "png-gray", "png-gray-alpha", "png-1bit", "png-palette",
        "jpeg-cmyk", "webp", "bmp"])
def test_decoded_pixels_are_pils(image, fmt):
    data = encode(image, fmt)
    decoded = decode_image_bytes(data)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, pil_pixels(data))


def test_coco_photos_decode_to_pils_pixels():
    for photo in PHOTOS[:5]:
        data = photo.read_bytes()
        assert torch.equal(decode_image_bytes(data), pil_pixels(data))


def test_pixel_cap_is_checked_from_the_header(monkeypatch):
    bomb = encode(Image.new("1", (20_000, 20_000)), "PNG")  # 1.2 GB as RGB, tens of KB encoded
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge):
        decode_image_bytes(bomb)
    with pytest.raises(DataError) as error:
        decode_sample(raw_sample(bomb, "png", "bomb"))
    assert str(error.value).startswith("s-000.tar: sample bomb: image ") and "\n" not in str(error.value)
    assert "exceeds the limit of" in str(error.value) and error.value.reason == "image over the pixel limit"

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 120 × 120: PIL itself would only warn
    with pytest.raises(DataError, match=r"^s-000\.tar: sample big: image is 120×120 = 14,400 pixels and exceeds the "
                                        r"limit of 10,000 pixels"):
        decode_sample(raw_sample(encode(Image.new("RGB", (120, 120)), "PNG"), "png", "big"))
    with pytest.raises(DataError, match="sample big: image is 120×120"):  # also when only the header is read
        decode_sample(raw_sample(encode(Image.new("RGB", (120, 120)), "PNG"), "png", "big"), keep_encoded=True)
    assert decode_sample(raw_sample(encode(Image.new("RGB", (100, 100)), "PNG"), "png")).image.shape == (3, 100, 100)


def test_bad_bytes_are_one_line_errors_naming_shard_and_sample():
    photo = PHOTOS[0].read_bytes()
    with pytest.raises(DataError) as error:
        decode_sample(raw_sample(photo[: len(photo) // 2], key="cut"))
    message = str(error.value)
    assert message.startswith("s-000.tar: sample cut: image does not decode: ") and "truncated" in message
    assert "\n" not in message and "decode_jpeg" not in message and ".cpp" not in message  # PIL's words, not torch's
    with pytest.raises(DataError, match=r"^s-000\.tar: sample junk: image does not decode: not an image"):
        decode_sample(raw_sample(b"garbage" * 20, key="junk"), keep_encoded=True)


def test_encoded_samples_keep_their_bytes_and_header():
    data = PHOTOS[0].read_bytes()
    image = decode_sample(raw_sample(data), keep_encoded=True).image
    assert image == EncodedImage(data, "JPEG", "RGB", "s-000.tar: sample a")


# -- transforms -------------------------------------------------------------------------------------------
def test_eval_transform_matches_the_pil_transform_within_rounding():
    """Tensor resize (antialiased) against the PIL pipeline it replaces: within 1/255 everywhere."""
    pil_transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    ours = eval_transform(224, MEAN, STD)
    for photo in PHOTOS[:4]:
        data = photo.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            reference = pil_transform(image.convert("RGB"))
            from_pil = ours(image.convert("RGB"))
        got = ours(decode_image_bytes(data))
        assert got.shape == (3, 224, 224) and torch.equal(got, from_pil)
        in_pixels = (got - reference) * torch.tensor(STD)[:, None, None] * 255
        assert in_pixels.abs().max() <= 1.0 + 1e-4 and in_pixels.abs().mean() < 0.05


def test_crop_draws_respect_scale_and_aspect():
    augment = TrainAugment(SIZE, MEAN, STD, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3))
    flips = 0
    for seed in range(300):
        box = augment.draw(480, 640, seed)
        assert 0 <= box.top and box.top + box.height <= 480 and 0 <= box.left and box.left + box.width <= 640
        assert 0.6 - 0.01 <= box.height * box.width / (480 * 640) <= 1.0
        assert 3 / 4 - 0.01 <= box.width / box.height <= 4 / 3 + 0.01
        assert augment.draw(480, 640, seed) == box
        flips += box.flip
    assert 120 < flips < 180
    # no try fits a 1 × 100 strip: the central crop of the nearest allowed aspect (4/3 → 1 × 1)
    assert augment.draw(1, 100, 5) == CropAndFlip(0, 49, 1, 1, augment.draw(1, 100, 5).flip)


def test_crop_and_flip_applies_the_drawn_box():
    augment = TrainAugment(SIZE, MEAN, STD)
    image = F.pil_to_tensor(noise(40, 30, 3))
    for seed in range(6):
        box = augment.draw(30, 40, seed)
        expected = F.resized_crop(image, box.top, box.left, box.height, box.width, [SIZE, SIZE], antialias=True)
        expected = F.horizontal_flip(expected) if box.flip else expected
        assert torch.equal(augment.crop_and_flip(image, seed), expected)
        normalised = (expected.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        assert torch.allclose(augment(image, seed), normalised, atol=1e-6)


def test_sample_seed_depends_on_seed_epoch_and_key_only():
    seed = EpochSeed(3, 1).sample_seed("k1")
    assert seed == EpochSeed(3, 1).sample_seed("k1") and 0 <= seed < 2**64
    assert len({seed, EpochSeed(3, 2).sample_seed("k1"), EpochSeed(4, 1).sample_seed("k1"),
                EpochSeed(3, 1).sample_seed("k2")}) == 4


# -- the training pipeline ---------------------------------------------------------------------------------
def caption_vector(caption: str) -> np.ndarray:
    return np.array([len(caption), 1.0], dtype=np.float32)


@pytest.fixture(scope="module")
def noisy_shards(tmp_path_factory) -> list[str]:
    """Eight noise photos (JPEG, and PNG for every third) of 40 × 30, two per shard."""
    root = tmp_path_factory.mktemp("noisy")
    lines = []
    for i in range(8):
        name = f"k{i}.png" if i % 3 == 2 else f"k{i}.jpg"
        noise(40, 30, 10 + i).save(root / name)
        lines.append(json.dumps({"image": name, "caption": f"photo {i}"}))
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    write_shards(records_from_jsonl(root / "c.jsonl"), root / "shards", shard_size=2, val_fraction=0.0, progress=False)
    return list_shards(root / "shards", "train")


def images_by_key(shards: list[str], *, epoch: int = 0, num_workers: int = 0, seed: int = 7,
                  keep_encoded: bool = False, decoder: BatchDecoder | None = None) -> dict[str, torch.Tensor]:
    augment = TrainAugment(SIZE, MEAN, STD)
    pipeline = make_train_pipeline(shards, transform=None if keep_encoded else augment, keep_encoded=keep_encoded,
                                   caption_vector=caption_vector, shuffle_buffer=4, seed=seed)
    loader = make_loader(pipeline, batch_size=3, num_workers=num_workers)
    loader.epoch = epoch
    found = {}
    for images, _, keys in map(decoder or BatchDecoder(augment), loader):
        found.update(zip(keys, images))
    return found


def test_augmentation_leaves_the_global_generators_alone(noisy_shards):
    """Decoding and augmenting (in the pipeline, and on the device) draw nothing from torch's or Python's generator.

    (A DataLoader pass itself draws its workers' base seed from torch's generator; that is the loader's.)
    """
    augment = TrainAugment(SIZE, MEAN, STD)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    in_pipeline = list(make_train_pipeline(noisy_shards, transform=augment, caption_vector=caption_vector, seed=1))
    encoded = list(make_train_pipeline(noisy_shards, keep_encoded=True, caption_vector=caption_vector, seed=1))
    on_device, _, keys = BatchDecoder(augment)(collate_batch(encoded))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert len(in_pipeline) == 8 and [key for _, _, key in in_pipeline] == keys
    assert torch.equal(torch.stack([image for image, _, _ in in_pipeline]), on_device)


def test_a_samples_crop_is_the_same_with_any_worker_count(noisy_shards):
    alone = images_by_key(noisy_shards)
    workers = images_by_key(noisy_shards, num_workers=2)
    assert sorted(alone) == sorted(workers) == [f"k{i}" for i in range(8)]
    assert all(torch.equal(alone[key], workers[key]) for key in alone)
    augment, folder = TrainAugment(SIZE, MEAN, STD), Path(noisy_shards[0]).parents[1]
    for name in ("k0.jpg", "k2.png"):  # by hand: the file's pixels, augmented with the sample seed of (7, 0, key)
        expected = augment(decode_image_bytes((folder / name).read_bytes()), EpochSeed(7, 0).sample_seed(name[:2]))
        assert torch.equal(alone[name[:2]], expected)
    next_epoch = images_by_key(noisy_shards, epoch=1)
    assert sum(not torch.equal(alone[key], next_epoch[key]) for key in alone) >= 6  # a new crop or flip per epoch


def test_device_batch_decode_gives_the_loaders_images(noisy_shards, monkeypatch):
    """The on-device branch, run with device="cpu": one batched decode_jpeg call per batch (PNGs on the CPU)."""
    calls = []
    real_decode_jpeg = transforms_module.decode_jpeg

    def spy(data, **kwargs):
        calls.append((len(data) if isinstance(data, list) else 0, str(kwargs["device"])))
        return real_decode_jpeg(data, **kwargs)

    monkeypatch.setattr(transforms_module, "decode_jpeg", spy)
    in_loader = images_by_key(noisy_shards)
    assert calls == []
    on_device = images_by_key(noisy_shards, keep_encoded=True)
    assert sorted(on_device) == sorted(in_loader) and all(torch.equal(on_device[k], in_loader[k]) for k in in_loader)
    assert sum(n for n, _ in calls) == 6 and {device for _, device in calls} == {"cpu"}  # 6 JPEGs, 2 PNGs
    assert len(calls) <= 3 and all(n > 0 for n, _ in calls)  # one call per batch of 3, 3 and 2, given a list
    assert images_by_key(noisy_shards, keep_encoded=True, num_workers=2).keys() == in_loader.keys()


def test_device_batch_decode_drops_a_bad_jpeg_through_the_handler():
    photo = encode(noise(40, 30, 1), "JPEG")
    good = [EncodedImage(photo, "JPEG", "RGB", f"s-000.tar: sample g{i}", seed=i) for i in range(2)]
    cut = EncodedImage(photo[: len(photo) // 2], "JPEG", "RGB", "s-000.tar: sample cut", seed=9)
    png = EncodedImage(encode(noise(40, 30, 2), "PNG"), "PNG", "RGB", "s-000.tar: sample p", seed=4)
    batch = collate_batch([(image, torch.tensor([float(i)]), image.where.split()[-1])
                           for i, image in enumerate([good[0], cut, png, good[1]])])
    errors: list[Exception] = []
    decoder = BatchDecoder(TrainAugment(SIZE, MEAN, STD), "cpu", lambda error: errors.append(error) or True)
    images, vectors, keys = decoder(batch)
    assert keys == ["g0", "p", "g1"] and vectors.flatten().tolist() == [0.0, 2.0, 3.0] and images.shape[0] == 3
    assert len(errors) == 1 and isinstance(errors[0], BadItem)
    assert str(errors[0]).startswith("s-000.tar: sample cut: image does not decode: ") and "truncated" in str(errors[0])
    augment = TrainAugment(SIZE, MEAN, STD)
    assert torch.equal(images[0], augment(decode_image_bytes(photo), 0))
    assert torch.equal(images[1], augment(decode_image_bytes(png.data), 4))
    with pytest.raises(DataError, match=r"^s-000\.tar: sample cut: image does not decode"):
        BatchDecoder(augment, "cpu")(batch)  # the default handler: stop, in one line


def test_streamed_training_batches_decoded_on_the_device_equal_the_loaders(sample_shards, tmp_path, monkeypatch):
    """StreamedImageBatches' device branch (the device faked as "cpu") yields the loader branch's batches."""
    from retrieval.train import Trainer

    config = demo_config(tmp_path, f"data.shard_dir={sample_shards}", "model.backbone=resnet18",
                         "model.weights=random", "model.freeze_backbone=false", "data.image_size=32",
                         "train.shuffle_buffer=1")
    trainer = Trainer(config, progress=False)
    in_loader = list(trainer.source.batches(1, trainer.targets))
    monkeypatch.setattr("retrieval.batches.resolve_decode_device", lambda setting, device: "cpu")
    on_device = list(trainer.source.batches(1, trainer.targets))
    assert len(on_device) == len(in_loader) == math.ceil(26 / 32)
    for (images, vectors, labels), (images2, vectors2, labels2) in zip(in_loader, on_device):
        assert torch.equal(images, images2) and torch.equal(vectors, vectors2) and torch.equal(labels, labels2)


# -- the setting ------------------------------------------------------------------------------------------
def test_decode_device_setting():
    assert resolve_decode_device("auto", "cpu") is None and resolve_decode_device("cpu", "cuda") is None
    assert resolve_decode_device("auto", "cuda") == "cuda" and resolve_decode_device("cuda", "cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"^data\.decode_device: 'cuda' decodes on the training GPU, but this run "
                                          r"trains on cpu .*; use auto or cpu$"):
        resolve_decode_device("cuda", "cpu")
    with pytest.raises(ConfigError, match=r"^data\.decode_device: must be auto, cpu or cuda, got 'gpu'$"):
        config_from_dict({"data": {"decode_device": "gpu"}})
    with pytest.raises(ConfigError, match=r"^data\.decode_device: 'cuda' decodes the images streamed .* cached"):
        config_from_dict({"data": {"decode_device": "cuda"}})  # the default: frozen backbone, cached features
    streamed = config_from_dict({"data": {"decode_device": "cuda"}, "model": {"freeze_backbone": False}})
    assert streamed.data.decode_device == "cuda"


def test_make_train_pipeline_wants_a_transform_or_encoded_images(noisy_shards):
    with pytest.raises(ValueError, match="keep_encoded"):
        make_train_pipeline(noisy_shards, caption_vector=caption_vector)
    with pytest.raises(ValueError, match="keep_encoded"):
        make_train_pipeline(noisy_shards, transform=TrainAugment(SIZE, MEAN, STD), keep_encoded=True,
                            caption_vector=caption_vector)
