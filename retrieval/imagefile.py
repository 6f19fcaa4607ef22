"""A user's image (a query file or an upload): decoded in full under a pixel cap, errors naming the file.

The cap guards against decompression bombs (a small file that decodes to a huge image): the size in
the header is checked before any pixel is decoded. The default cap is PIL's own
``Image.MAX_IMAGE_PIXELS``; its warning above that size counts as a refusal here, not a warning.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from PIL import Image

from retrieval.data.images import ImageTooLarge, image_error_text, open_within_limit, pixel_limit
from retrieval.errors import ConfigError, QueryError

__all__ = ["check_pixel_limit", "open_image", "pixel_limit"]


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


def open_image(source: str | os.PathLike | BinaryIO, *, name: str | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode ``source`` (a path or a binary file object such as an upload's bytes).

    ``name`` is what errors call the image (default: the path); ``max_pixels`` caps width × height
    (default: :func:`pixel_limit`). An image over the cap, or one PIL cannot decode, is a one-line
    ``QueryError`` naming it.
    """
    name = name if name is not None else os.fspath(source) if isinstance(source, (str, os.PathLike)) else "upload"
    try:
        image = open_within_limit(source, max_pixels)
        image.load()
    except ImageTooLarge as error:
        raise QueryError(error.describe(f"image {name}")) from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # what PIL raises for a damaged or foreign file
        raise QueryError(f"cannot read image {name}: {image_error_text(error)}") from None
    return image
