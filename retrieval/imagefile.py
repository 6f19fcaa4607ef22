"""A user's image (a query file or an upload): decoded in full under a pixel cap, errors naming the file.

The cap guards against decompression bombs (a small file that decodes to a huge image): the size in
the header is checked before any pixel is decoded. The default cap is PIL's own
``Image.MAX_IMAGE_PIXELS``; its warning above that size counts as a refusal here, not a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import BinaryIO

from PIL import Image

from retrieval.data.images import image_error_text
from retrieval.errors import ConfigError, QueryError


def pixel_limit() -> int | None:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; None when it was switched off)."""
    return Image.MAX_IMAGE_PIXELS


def check_pixel_limit(value: int | str, field: str) -> int:
    """``value`` (a number or its text) as a pixel cap from 1 to :func:`pixel_limit`; else a one-line
    ``ConfigError`` naming ``field``."""
    try:
        number = int(str(value).replace("_", "").strip())
    except ValueError:
        raise ConfigError(f"{field}: {value!r} is not a whole number of pixels") from None
    ceiling = pixel_limit()
    if number < 1 or (ceiling is not None and number > ceiling):
        upper = f" to {ceiling:,} (PIL's decompression-bomb limit)" if ceiling is not None else " or more"
        raise ConfigError(f"{field}: {number:,} is out of range; give from 1{upper}")
    return number


def too_many_pixels(name: str, limit: int, size: tuple[int, int] | None = None) -> QueryError:
    """The one-line refusal of an image over ``limit`` pixels."""
    found = f" is {size[0]}×{size[1]} = {size[0] * size[1]:,} pixels and" if size else ""
    return QueryError(f"image {name}{found} exceeds the limit of {limit:,} pixels ({limit / 1e6:.3g} megapixels; "
                      "a guard against decompression bombs); use a smaller image")


def open_image(source: str | os.PathLike | BinaryIO, *, name: str | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode ``source`` (a path or a binary file object such as an upload's bytes).

    ``name`` is what errors call the image (default: the path); ``max_pixels`` caps width × height
    (default: :func:`pixel_limit`). An image over the cap, or one PIL cannot decode, is a one-line
    ``QueryError`` naming it.
    """
    name = name if name is not None else os.fspath(source) if isinstance(source, (str, os.PathLike)) else "upload"
    limit = pixel_limit() if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():  # PIL only warns between its limit and twice it: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            if limit is not None and image.size[0] * image.size[1] > limit:
                raise too_many_pixels(name, limit, image.size)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own limit, checked first
        raise too_many_pixels(name, min(value for value in (limit, pixel_limit()) if value)) from None
    except QueryError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # what PIL raises for a damaged or foreign file
        raise QueryError(f"cannot read image {name}: {image_error_text(error)}") from None
    return image
