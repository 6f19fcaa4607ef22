"""Decoded images → model inputs: the eval resize and crop, the seeded training crop and flip, and the
batched decode + augmentation on the training device.

Every transform works on uint8 RGB tensors (3 × H × W) with ``torchvision.transforms.v2`` functions, on
whatever device the tensor is on. The training augmentation draws its crop and flip from a per-sample
seed (``EpochSeed.sample_seed``), never from torch's global generator, so a sample's crop depends on
(seed, epoch, key) alone: the same on any worker count or rank, and again after a resume.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from retrieval.data.images import decode_image_bytes, pil_to_rgb_tensor
from retrieval.data.pipeline import EncodedImage, Handler, bad_image, raise_data_error
from retrieval.errors import ConfigError

DECODE_DEVICES = ("auto", "cpu", "cuda")
# what decode_jpeg reads on every device (nvjpeg included): PIL's modes of a JPEG header
DEVICE_JPEG_MODES = frozenset({"RGB", "L"})


def eval_resize(image_size: int) -> int:
    """The short side an image is resized to before the center crop (ImageNet's 256 for 224)."""
    return int(image_size * 256 / 224)


def as_rgb_tensor(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """A uint8 RGB tensor (3, H, W) as is; a PIL image (a query or an upload) converted to one."""
    return pil_to_rgb_tensor(image) if isinstance(image, Image.Image) else image


class Normalize:
    """uint8 images (…, 3, H, W) → float32 in [0, 1], then standardised by the backbone's ``mean`` and ``std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.to_dtype(images, torch.float32, scale=True), self.mean, self.std)


class EvalTransform:
    """Resize the short side (antialiased bilinear), center-crop, normalise: what every image sees outside training.

    Takes a uint8 RGB tensor or a PIL image; PIL's own resize and this one differ by rounding (±1 of 255).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size, self.normalize = image_size, Normalize(mean, std)

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        image = F.resize(as_rgb_tensor(image), [eval_resize(self.image_size)], antialias=True)
        return self.normalize(F.center_crop(image, [self.image_size, self.image_size]))


@dataclass(frozen=True)
class CropAndFlip:
    """One draw of the training augmentation: the crop box (pixels of the decoded image) and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class TrainAugment:
    """``RandomResizedCrop(image_size, scale)`` + horizontal flip (p = 1/2) + normalise, seeded per sample.

    ``augment(image, seed)``: the crop box is drawn as torchvision's ``RandomResizedCrop`` draws it (ten
    tries at an area in ``scale`` and an aspect in ``ratio``, log-uniform, then the central crop), but from
    ``random.Random(seed)``, so torch's global generator neither decides nor advances.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.6, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.image_size, self.scale, self.ratio = image_size, scale, ratio
        self.normalize = Normalize(mean, std)

    def draw(self, height: int, width: int, seed: int) -> CropAndFlip:
        """The crop and flip of an image of ``height`` × ``width`` for the sample seed ``seed``."""
        rng = random.Random(seed)
        area, log_ratio = height * width, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return CropAndFlip(rng.randint(0, height - h), rng.randint(0, width - w), h, w, rng.random() < 0.5)
        aspect = width / height  # fallback: the central crop of the nearest allowed aspect
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return CropAndFlip((height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5)

    def crop_and_flip(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """uint8 (3, H, W) → uint8 (3, size, size): the sample's crop, resized (antialiased), maybe flipped."""
        box = self.draw(image.shape[-2], image.shape[-1], seed)
        size = [self.image_size, self.image_size]
        image = F.resized_crop(image, box.top, box.left, box.height, box.width, size, antialias=True)
        return F.horizontal_flip(image) if box.flip else image

    def __call__(self, image: torch.Tensor | Image.Image, seed: int) -> torch.Tensor:
        return self.normalize(self.crop_and_flip(as_rgb_tensor(image), seed))


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """Resize the short side, center-crop, normalise: what every image sees outside training."""
    return EvalTransform(image_size, mean, std)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> TrainAugment:
    """Light augmentation for end-to-end fine-tuning: ``augment(image, sample_seed)``."""
    return TrainAugment(image_size, mean, std)


def check_decode_device(value: str, field: str = "data.decode_device") -> str:
    """``value`` if it is one of :data:`DECODE_DEVICES`, else a one-line ``ConfigError`` naming ``field``."""
    if value not in DECODE_DEVICES:
        raise ConfigError(f"{field}: must be {', '.join(DECODE_DEVICES[:-1])} or {DECODE_DEVICES[-1]}, got {value!r}")
    return value


def resolve_decode_device(setting: str, train_device: str, field: str = "data.decode_device") -> str | None:
    """Where streamed training images are decoded: None in the loader (CPU), else the training device.

    ``auto`` decodes on the training device when it is a CUDA GPU; ``cuda`` insists on it, and is a one-line
    ``ConfigError`` when training does not run on CUDA (none visible, or ``train.device`` chose another).
    """
    on_cuda = torch.device(train_device).type == "cuda"
    if check_decode_device(setting, field) == "cuda" and not on_cuda:
        raise ConfigError(f"{field}: 'cuda' decodes on the training GPU, but this run trains on {train_device} "
                          "(no CUDA GPU visible, or train.device chose it); use auto or cpu")
    return train_device if setting != "cpu" and on_cuda else None


class BatchDecoder:
    """A loader batch → a batch of model inputs on ``device``, with the same per-sample crops as in the loader.

    Batches the loader already decoded pass through. Batches of :class:`EncodedImage` are decoded on
    ``device``: the JPEGs in one ``torchvision.io.decode_jpeg(list, device=device)`` call (nvjpeg on CUDA),
    any other format on the CPU and moved there; then cropped, flipped and normalised there with
    ``augment``. A JPEG the device refuses is decoded on the CPU; one that no decoder reads goes to
    ``handler`` as a one-line ``BadItem`` naming its shard and sample, and leaves the batch.
    """

    def __init__(self, augment: TrainAugment, device: str | torch.device = "cpu",
                 handler: Handler = raise_data_error) -> None:
        self.augment, self.device, self.handler = augment, torch.device(device), handler

    def __call__(self, batch: tuple[torch.Tensor | list[EncodedImage], torch.Tensor, list[str]]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images, vectors, keys = batch
        if isinstance(images, torch.Tensor):
            return images, vectors, keys
        decoded = self.decode(images)
        kept = [i for i, image in enumerate(decoded) if image is not None]
        crops = [self.augment.crop_and_flip(decoded[i], images[i].seed) for i in kept]
        if not crops:
            size = self.augment.image_size
            return torch.zeros(0, 3, size, size, device=self.device), vectors[:0], []
        return self.augment.normalize(torch.stack(crops)), vectors[kept], [keys[i] for i in kept]

    def decode(self, images: Sequence[EncodedImage]) -> list[torch.Tensor | None]:
        """uint8 RGB tensors on the device, one per image (None for an image passed to the handler)."""
        decoded: list[torch.Tensor | None] = [None] * len(images)
        jpegs = [i for i, image in enumerate(images) if image.format == "JPEG" and image.mode in DEVICE_JPEG_MODES]
        for i, image in zip(jpegs, self._decode_jpegs([images[i].data for i in jpegs])):
            decoded[i] = image
        for i, image in enumerate(images):
            if decoded[i] is None:  # not a JPEG, or one the device refused: the CPU reader's verdict
                try:
                    decoded[i] = decode_image_bytes(image.data).to(self.device)
                except Exception as exc:  # PIL and torchvision raise many types
                    error = bad_image(image.where, exc)
                    if not self.handler(error):
                        raise error from None
        return decoded

    def _decode_jpegs(self, data: list[bytes]) -> list[torch.Tensor | None]:
        if not data:
            return []
        encoded = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in data]
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad image fails the batched call: one by one, None where the device refuses
            return [self._decode_one(item) for item in encoded]

    def _decode_one(self, encoded: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None
