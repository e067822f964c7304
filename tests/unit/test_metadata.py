"""Issue 22, point 9: stored inputs keep no EXIF (GPS included), XMP, comments or text chunks, and decode to the
same pixels as the upload (the orientation is the one tag kept)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import ExifTags, Image, PngImagePlugin

from gateway.media import codecs
from gateway.media.metadata import strip_metadata
from tests.helpers import make_image

SECRETS = (b"SecretCameraMaker", b"2024:01:01", b"secret comment", b"secret text", b"x:xmpmeta")
GPS = {1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)}
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">secret</x:xmpmeta>'


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "SecretCameraMaker"
    exif[ExifTags.Base.DateTime] = "2024:01:01 12:00:00"
    exif[ExifTags.Base.GPSInfo] = GPS
    exif[ExifTags.Base.Orientation] = orientation
    return exif.tobytes()


def _with_metadata(fmt: str, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(make_image(48, 32, seed=3))).convert("RGB")
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", exif=_exif(orientation), comment=b"secret comment", xmp=XMP)
    elif fmt == "PNG":
        text = PngImagePlugin.PngInfo()
        text.add_text("Comment", "secret text")
        image.save(buf, format="PNG", exif=_exif(orientation), pnginfo=text)
    else:
        image.save(buf, format="WEBP", exif=_exif(orientation), xmp=XMP, lossless=True)
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(codecs.decode_image(data))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_metadata_goes_and_the_pixels_and_orientation_stay(fmt: str, orientation: int) -> None:
    original = _with_metadata(fmt, orientation)
    assert b"SecretCameraMaker" in original
    stripped = strip_metadata(original)
    for secret in SECRETS:
        assert secret not in stripped, secret
    with Image.open(io.BytesIO(stripped)) as img:
        assert img.format == fmt
        exif = dict(img.getexif())
        assert exif == ({} if orientation == 1 else {ExifTags.Base.Orientation: orientation})
        assert not any(key in img.info for key in ("comment", "Comment", "xmp", "XML:com.adobe.xmp"))
    np.testing.assert_array_equal(_pixels(stripped), _pixels(original))  # upright, the same pixels


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_an_image_without_metadata_is_stored_byte_for_byte(fmt: str) -> None:
    data = make_image(40, 24, fmt=fmt)
    assert strip_metadata(data) == data
