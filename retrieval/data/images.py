"""Image bytes → a fully decoded PIL image, or a one-line reason that names no Python object.

PIL's ``verify()`` only checks an image's structure: a JPEG cut short passes it and fails later, when
its pixels are first read. Every check here decodes the whole image, so such a file is caught when
the data is prepared rather than in the middle of training.
"""

from __future__ import annotations

import io
import re

from PIL import Image, UnidentifiedImageError

# PIL names the stream it was given ("cannot identify image file <_io.BytesIO object at 0x7f…>")
_OBJECT_REPR = re.compile(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>")


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

