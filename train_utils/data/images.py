"""The one image decoder of training, validation, the dataset checker and prediction.

Every caller catches :data:`DECODE_ERRORS`, so a file PIL cannot read (corrupt, truncated, not an
image, or a decompression bomb larger than ``PIL.Image.MAX_IMAGE_PIXELS`` allows) is a counted skip
rather than a traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps

# What PIL raises on unreadable image data (UnidentifiedImageError is an OSError; a decompression
# bomb is not).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
EXIF_ORIENTATION_TAG = 0x0112


def read_image_header(path: Path) -> tuple[int, int, Optional[int]]:
    """(stored height, stored width, EXIF orientation or None) without decoding pixels.

    Raises one of :data:`DECODE_ERRORS` when the file is not a readable image.
    """
    with Image.open(path) as image:
        # Only look for EXIF when the header carries it: PIL decodes a PNG to search for it otherwise.
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG) if "exif" in image.info else None
        return image.height, image.width, orientation


def decode_image(path: Path, exif_transpose: bool) -> Image.Image:
    """Decode ``path`` to an RGB image (alpha dropped), EXIF-transposed when ``exif_transpose``.

    Raises one of :data:`DECODE_ERRORS` when the file cannot be decoded.
    """
    with Image.open(path) as image:
        image.load()
        shown = ImageOps.exif_transpose(image) if exif_transpose else image
        if shown.mode in ("P", "PA"):  # palette transparency is only handled via RGBA
            shown = shown.convert("RGBA")
        return shown.convert("RGB")
