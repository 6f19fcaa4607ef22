"""Image bytes → decoded pixels under a pixel cap, or a one-line reason that names no Python object.

PIL's ``verify()`` only checks an image's structure: a JPEG cut short passes it and fails later, when
its pixels are first read. Every check here decodes the whole image, so such a file is caught when
the data is prepared rather than in the middle of training.

:func:`decode_image_bytes` is the fast path of the readers: the size in the header (PIL's lazy open,
no pixel decoded) is checked against the cap first, JPEG and PNG then decode with ``torchvision.io``
straight into a uint8 tensor, and any other format (or an image torchvision refuses) with PIL.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor

# PIL names the stream it was given ("cannot identify image file <_io.BytesIO object at 0x7f…>")
_OBJECT_REPR = re.compile(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>")

# what torchvision.io decodes to the same RGB pixels as PIL's convert("RGB"): PIL format → PIL modes
TORCHVISION_DECODES = {"JPEG": frozenset({"RGB", "L"}), "PNG": frozenset({"RGB", "RGBA", "L", "LA", "P", "1"})}


def image_error_text(error: BaseException) -> str:
    """The first line of a PIL error, without object reprs; an unknown format reads as such."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image in a format PIL reads"
    text = _OBJECT_REPR.sub("", str(error)).strip()
    return (text.splitlines() or [type(error).__name__])[0]


def check_image_bytes(data: bytes) -> None:
    """Verify the structure of encoded image bytes, then decode every pixel; raises PIL's own errors."""
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # checksums and chunk structure (e.g. a PNG's CRCs), which decoding may not look at
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # the pixels: a truncated JPEG fails here ("image file is truncated")


def pixel_limit() -> int | None:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; None when it was switched off)."""
    return Image.MAX_IMAGE_PIXELS


class ImageTooLarge(ValueError):
    """An image over the pixel cap, found from its header before any pixel was decoded."""

    def __init__(self, limit: int, size: tuple[int, int] | None = None) -> None:
        self.limit, self.size = limit, size
        super().__init__(self.describe("image"))

    def describe(self, name: str) -> str:
        """The one-line refusal, calling the image ``name``."""
        size, limit = self.size, self.limit
        found = f" is {size[0]}×{size[1]} = {size[0] * size[1]:,} pixels and" if size else ""
        return (f"{name}{found} exceeds the limit of {limit:,} pixels ({limit / 1e6:.3g} megapixels; "
                "a guard against decompression bombs); use a smaller image")


def open_within_limit(source: str | os.PathLike | BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """Open ``source`` lazily (header only) and refuse it with :class:`ImageTooLarge` over ``max_pixels``.

    ``max_pixels`` defaults to :func:`pixel_limit`; PIL's own limit applies too, and its warning between
    that limit and twice it counts as a refusal. Other failures are PIL's own errors.
    """
    limits = [value for value in (pixel_limit() if max_pixels is None else max_pixels, pixel_limit()) if value]
    try:
        with warnings.catch_warnings():  # PIL only warns between its limit and twice it: refused below, with the size
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError:  # over twice PIL's limit: PIL refuses before telling the size
        raise ImageTooLarge(min(limits)) from None
    if limits and image.size[0] * image.size[1] > min(limits):
        image.close()
        raise ImageTooLarge(min(limits), image.size)
    return image


def pil_to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 RGB tensor (3, H, W), through ``convert("RGB")`` as the PIL readers always did."""
    return pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))


def decode_image_bytes(data: bytes, max_pixels: int | None = None) -> torch.Tensor:
    """Encoded image bytes → a uint8 RGB tensor (3, H, W), the same pixels PIL's ``convert("RGB")`` gives.

    The header's size is checked first (:class:`ImageTooLarge` over ``max_pixels``, default
    :func:`pixel_limit`). JPEG and PNG in the modes of :data:`TORCHVISION_DECODES` decode with
    ``torchvision.io``; everything else, and anything torchvision refuses, with PIL (whose errors, such as
    "image file is truncated", are what a bad image raises).
    """
    with open_within_limit(io.BytesIO(data), max_pixels) as image:
        if image.mode in TORCHVISION_DECODES.get(image.format, ()):
            try:
                decoded = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError:  # torchvision's refusal: PIL decodes it, or says why not in its own words
                decoded = None
            if decoded is not None and decoded.dtype == torch.uint8:
                return decoded
        image.load()
        return pil_to_rgb_tensor(image)
