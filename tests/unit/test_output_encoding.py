"""`output_format` / `output_quality`: the encoders (no metadata, quality honoured, same pixels as the PNG within
the lossy codec's error), the stored names and content types, and jobs stored before these fields existed."""

from __future__ import annotations

import dataclasses
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image, ImageFilter

from gateway.errors import InvalidRequest
from gateway.jobs.admission import output_quality
from gateway.jobs.model import OutputImage, job_from_json, job_to_json
from gateway.jobs.naming import output_name
from gateway.media import codecs
from gateway.media.storage import CONTENT_TYPES, content_type_for
from tests.unit.fakes import make_job, make_spec


def _sample(seed: int = 0, size: int = 64) -> np.ndarray:
    """A decoder-like output: smooth structure plus some texture, [3, H, W] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    pixels = np.asarray(noise.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    return np.ascontiguousarray((pixels / 127.5 - 1.0).transpose(2, 0, 1))


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append(data[at + 4 : at + 8])
        at += 12 + length
    return chunks


def _jpeg_markers(data: bytes) -> list[int]:
    """Markers up to the first scan (where metadata segments live)."""
    assert data[:2] == b"\xff\xd8"
    markers, at = [], 2
    while True:
        marker = data[at + 1]
        markers.append(marker)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return markers
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        at += 2 + length


def _webp_chunks(data: bytes) -> list[bytes]:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    chunks, at = [], 12
    while at < len(data):
        (length,) = struct.unpack("<I", data[at + 4 : at + 8])
        chunks.append(data[at : at + 4])
        at += 8 + length + (length & 1)
    return chunks


def test_png_is_the_tensor_to_png_bytes() -> None:
    sample = _sample()
    assert codecs.encode_output(sample, "png") == codecs.tensor_to_png(sample)


def test_no_metadata_in_any_format() -> None:
    sample = _sample()
    assert _png_chunks(codecs.encode_output(sample, "png")) == [b"IHDR", b"IDAT", b"IEND"]
    # JPEG: SOI, the JFIF APP0 header, tables, frame, scan; no APP1 (EXIF/XMP), APP2 (ICC) or COM segment.
    markers = _jpeg_markers(codecs.encode_output(sample, "jpeg"))
    assert markers[0] == 0xE0 and markers[-1] == 0xDA
    assert set(markers) <= {0xE0, 0xDB, 0xC0, 0xC4, 0xDA}, [hex(m) for m in markers]
    # WebP: the simple lossy container, one VP8 chunk (metadata would need VP8X + EXIF/XMP/ICCP chunks).
    assert _webp_chunks(codecs.encode_output(sample, "webp")) == [b"VP8 "]


# Tolerances per codec at the default quality (90), on smooth-plus-texture content like the model's outputs:
# mean absolute error and PSNR against the PNG (= exact) pixels. Observed: JPEG mean 2.6 levels (37 dB),
# WebP 2.1 (39 dB).
LOSSY_MEAN_LEVELS = 4.0
LOSSY_MIN_PSNR_DB = 32.0


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_decode_to_the_png_pixels_within_tolerance(fmt: str) -> None:
    sample = _sample()
    exact = _pixels(codecs.encode_output(sample, "png"))
    lossy = _pixels(codecs.encode_output(sample, fmt))
    diff = np.abs(lossy - exact)
    psnr = 10 * np.log10(255**2 / np.mean(diff.astype(np.float64) ** 2))
    assert diff.mean() <= LOSSY_MEAN_LEVELS and psnr >= LOSSY_MIN_PSNR_DB, (diff.mean(), psnr)
    assert diff.max() > 0  # not a lossless path in disguise


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_is_honoured(fmt: str) -> None:
    sample = _sample()
    exact = _pixels(codecs.encode_output(sample, "png"))
    low, high = (codecs.encode_output(sample, fmt, q) for q in (10, 95))
    assert len(low) < len(high)
    assert np.abs(_pixels(low) - exact).mean() > np.abs(_pixels(high) - exact).mean()
    assert codecs.encode_output(sample, fmt) == codecs.encode_output(sample, fmt, codecs.DEFAULT_OUTPUT_QUALITY[fmt])
    assert codecs.encode_output(sample, fmt, 95) == high  # deterministic: same pixels, same bytes


def test_output_quality_rules() -> None:
    assert codecs.output_quality("png", None) is None
    assert codecs.output_quality("jpeg", None) == codecs.DEFAULT_OUTPUT_QUALITY["jpeg"] == 90
    assert codecs.output_quality("webp", 1) == 1 and codecs.output_quality("webp", 100) == 100
    for fmt, quality in (("png", 90), ("jpeg", 0), ("webp", 101), ("gif", None)):
        with pytest.raises(ValueError):
            codecs.output_quality(fmt, quality)


@pytest.mark.parametrize(
    ("fmt", "content_type"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")]
)
def test_stored_name_and_content_type(fmt: str, content_type: str) -> None:
    extension = codecs.OUTPUT_EXTENSIONS[fmt]
    for name in (output_name("img_transform_x", 0, 1, extension), output_name("img_transform_x", 1, 3, extension)):
        assert name.endswith(f".{extension}") and content_type_for(name) == content_type
    assert CONTENT_TYPES[extension] == content_type
    image = Image.open(io.BytesIO(codecs.encode_output(_sample(), fmt)))
    assert Image.MIME[image.format or ""] == content_type


def test_jobs_stored_before_the_fields_read_back_as_png() -> None:
    job = dataclasses.replace(
        make_job("old", spec=make_spec()),
        images=(OutputImage(name="old_0.png", url="http://x/old_0.png", width=16, height=16, seed=1),),
    )
    raw = json.loads(job_to_json(job))
    for key in ("scheduler", "output_format", "output_quality"):
        del raw["spec"][key]
    for key in ("content_type", "sha256"):
        del raw["images"][0][key]
    old = job_from_json(json.dumps(raw), version=1)
    assert old.spec.scheduler is None and old.spec.output_format == "png" and old.spec.output_quality is None
    assert old.images[0].content_type == "image/png" and old.images[0].sha256 is None


def test_the_use_case_refuses_bad_formats_with_400_for_any_caller() -> None:
    """A caller of `CreateJob` other than the native wire schema (another route's model) still gets a 400."""
    assert output_quality("jpeg", None) == 90 and output_quality("png", None) is None
    for fmt, quality, field in (
        ("gif", None, "output_format"),
        ("png", 80, "output_quality"),
        ("webp", 0, "output_quality"),
    ):
        with pytest.raises(InvalidRequest) as info:
            output_quality(fmt, quality)
        assert info.value.message == f"Invalid field '{field}'"
