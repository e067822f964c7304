"""Image codecs with real images made by Pillow (and a few hand-built hostile headers)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from gateway.errors import ImageDimensionsTooLarge, ImageTooLarge, InvalidImage, Overloaded
from gateway.media import codecs, work
from gateway.media.codecs import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_SIDE,
    ImageSource,
    decode_image,
    fit_to_grid,
    image_to_png,
    image_to_tensor,
    parse_image_field,
    sniff_format,
    tensor_to_png,
)
from gateway.settings import Settings

RED = (255, 0, 0)
BLUE = (0, 0, 255)
EXIF_ORIENTATION = 0x0112


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode=mode)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` but carries no pixel data (a 'bomb' header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --- parse_image_field -----------------------------------------------------------------------------------

PNG_BYTES = encode(Image.new("RGB", (4, 4), RED), "PNG")
PNG_B64 = base64.b64encode(PNG_BYTES).decode()


@pytest.mark.parametrize(
    "value",
    [
        "http://example.com/a.jpg",
        "https://example.com/a?x=1",
        "HTTPS://EXAMPLE.com/a.png",
        "  https://example.com/padded.png \n",
    ],
)
def test_urls_are_passed_through(value: str) -> None:
    assert parse_image_field(value) == ImageSource(url=value.strip(), data=None)


@pytest.mark.parametrize(
    "value",
    [
        f"data:image/png;base64,{PNG_B64}",
        f"data:image/jpeg;base64,{PNG_B64}",  # declared type is ignored; content decides
        f"DATA:image/png;charset=utf-8;BASE64,{PNG_B64}",
        f"data:;base64,{PNG_B64}",
        PNG_B64,
        "\n".join(PNG_B64[i : i + 76] for i in range(0, len(PNG_B64), 76)),  # MIME line breaks
        f"  {PNG_B64}\r\n",
    ],
)
def test_base64_forms_decode(value: str) -> None:
    assert parse_image_field(value) == ImageSource(url=None, data=PNG_BYTES)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://example.com/a.png", "scheme 'ftp'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("https://", "valid absolute"),
        ("https:///path", "valid absolute"),
        ("https://exa mple.com/a.png", "valid absolute"),
        ("https://example.com/" + "a" * codecs.MAX_IMAGE_URL_CHARS, "longer than"),
        ("data:image/png,rawbytes", "base64"),
        ("data:image/png;base64", "Malformed data URI"),
        ("data:" + "x" * 300 + ";base64,AAAA", "Malformed data URI"),
        ("data:image/png;base64,@@@@", "base64"),
        ("not base64 at all!", "base64"),
        (PNG_B64.rstrip("="), "base64"),  # strict: padding required
        (PNG_B64 + "====", "base64"),  # strict: no excess padding
        (base64.urlsafe_b64encode(b"\xfb\xff\xfe" * 4).decode(), "base64"),  # URL-safe alphabet refused
        ("ÿÿÿÿ", "base64"),
        ("", "empty"),
        ("data:image/png;base64,", "empty"),
    ],
)
def test_bad_image_fields(value: str, fragment: str) -> None:
    with pytest.raises(InvalidImage) as info:
        parse_image_field(value)
    assert fragment in (info.value.details or "")


def test_decoded_size_limit() -> None:
    limit = 1000
    assert parse_image_field(base64.b64encode(b"x" * limit).decode(), max_bytes=limit).data == b"x" * limit
    with pytest.raises(ImageTooLarge) as info:
        parse_image_field(base64.b64encode(b"x" * (limit + 1)).decode(), max_bytes=limit)
    assert info.value.details == "Maximum file size is 1000 bytes"


def test_over_10mb_payload_is_image_too_large() -> None:
    payload = "data:image/png;base64," + base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 1)).decode()
    with pytest.raises(ImageTooLarge) as info:
        parse_image_field(payload)
    assert info.value.message == "Image file size exceeds maximum limit"
    assert info.value.details == "Maximum file size is 10MB"


def test_exactly_10mb_is_accepted() -> None:
    data = parse_image_field(base64.b64encode(b"\0" * MAX_IMAGE_BYTES).decode()).data
    assert data is not None
    assert len(data) == MAX_IMAGE_BYTES


def test_huge_string_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_decode(*_args: object, **_kwargs: object) -> bytes:
        raise AssertionError("decoded a payload that was too large to begin with")

    monkeypatch.setattr(codecs.pybase64, "b64decode", must_not_decode)
    with pytest.raises(ImageTooLarge):
        parse_image_field("A" * (100 * 1024 * 1024))
    with pytest.raises(ImageTooLarge):  # just over the encoded bound, whitespace removed
        parse_image_field("AAAA" * (MAX_IMAGE_BYTES // 3 + 2))


# --- sniff_format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (encode(Image.new("RGB", (2, 2)), "JPEG"), "JPEG"),
        (encode(Image.new("RGB", (2, 2)), "PNG"), "PNG"),
        (encode(Image.new("RGB", (2, 2)), "WEBP"), "WEBP"),
        (encode(Image.new("RGB", (2, 2)), "GIF"), "GIF"),
        (encode(Image.new("RGB", (2, 2)), "BMP"), "BMP"),
        (encode(Image.new("RGB", (2, 2)), "TIFF"), "TIFF"),
        (b"RIFF\0\0\0\0WAVEfmt ", None),
        (b"", None),
        (b"\xff\xd8", None),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


# --- decode_image -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    img = decode_image(encode(Image.new("RGB", (33, 17), BLUE), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert img.mode == "RGB"
    assert img.size == (33, 17)
    if fmt != "JPEG":
        assert img.getpixel((5, 5)) == BLUE


def test_jpeg_exif_orientation_6_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # display = stored rotated 90 degrees clockwise
    img = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert img.size == (20, 40)
    top = img.getpixel((10, 5))
    bottom = img.getpixel((10, 35))
    assert isinstance(top, tuple)
    assert isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue at the bottom


def test_png_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # transparent black...
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # ...one opaque red pixel...
    rgba.putpixel((2, 0), (0, 0, 255, 128))  # ...one half-transparent blue
    img = decode_image(encode(rgba, "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == RED
    assert img.getpixel((2, 0)) == (127, 127, 255)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("I;16", (2, 2), 65535), (255, 255, 255)),
        (Image.new("I;16", (2, 2), 32896), (128, 128, 128)),  # scaled, not clipped to white
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
    ],
)
def test_other_png_modes_become_rgb(img: Image.Image, expected: tuple[int, int, int]) -> None:
    decoded = decode_image(encode(img, "PNG"))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == expected


def test_palette_png_with_transparency() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    img = decode_image(encode(palette, "PNG", transparency=0))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (0, 255, 0)


def test_webp_with_alpha() -> None:
    img = decode_image(encode(Image.new("RGBA", (8, 8), (0, 0, 255, 0)), "WEBP", lossless=True))
    assert img.mode == "RGB"
    assert img.getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb() -> None:
    img = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert img.mode == "RGB"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_unsupported_formats_rejected(fmt: str) -> None:
    with pytest.raises(InvalidImage) as info:
        decode_image(encode(Image.new("RGB", (4, 4)), fmt))
    assert info.value.message == "Unable to process the provided image"
    assert fmt in (info.value.details or "")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, not an image",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
        b"\xff\xd8\xff" + b"\0" * 40,
        b"RIFF\x10\0\0\0WEBPVP8 garbage",
    ],
)
def test_garbage_is_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImage) as info:
        decode_image(data)
    assert info.value.details == "Image format not supported or file corrupted"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_invalid_image(fmt: str) -> None:
    data = encode(noise_image(64, 64), fmt)
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(("width", "height"), [(2049, 10), (10, 2049)])
def test_side_over_limit(width: int, height: int) -> None:
    data = encode(Image.new("L", (width, height)), "PNG")
    with pytest.raises(ImageDimensionsTooLarge) as info:
        decode_image(data)
    assert info.value.details == "Maximum dimensions are 2048x2048 pixels"


def test_max_side_is_inclusive_and_can_be_lowered() -> None:
    data = encode(Image.new("L", (MAX_IMAGE_SIDE, 8)), "PNG")
    assert decode_image(data).size == (MAX_IMAGE_SIDE, 8)
    with pytest.raises(ImageDimensionsTooLarge) as info:
        decode_image(data, max_side=1024)
    assert "1024x1024" in (info.value.details or "")
    with pytest.raises(ValueError, match="MAX_IMAGE_SIDE"):
        decode_image(data, max_side=MAX_IMAGE_SIDE + 1)


def test_dimensions_checked_before_pixels_are_decoded() -> None:
    # Header says 2049 wide but there is no valid pixel data: the size error must win.
    with pytest.raises(ImageDimensionsTooLarge):
        decode_image(png_with_header(2049, 1))


def test_decompression_bomb_header_is_refused() -> None:
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
    with pytest.raises(ImageDimensionsTooLarge):
        decode_image(png_with_header(100_000, 100_000))  # Pillow's DecompressionBombError path


def test_decompression_bomb_warning_range_is_refused() -> None:
    data = png_with_header(2100, 2100)  # between 1x and 2x Pillow's guard: a warning, not an error
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageDimensionsTooLarge):
        decode_image(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageDimensionsTooLarge):
            decode_image(data)


def test_decoded_image_is_detached_from_the_input() -> None:
    img = decode_image(encode(Image.new("RGB", (3, 3), RED), "PNG"))
    img.load()
    assert np.asarray(img).shape == (3, 3, 3)


# --- fit_to_grid ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "native", "grid", "expected"),
    [
        (1024, 1024, 512, 8, (512, 512)),
        (1024, 768, 512, 8, (512, 384)),
        (768, 1024, 512, 64, (384, 512)),
        (64, 64, 128, 16, (128, 128)),  # small inputs are scaled up
        (1000, 333, 128, 16, (128, 48)),  # 42.6 -> 48
        (1000, 300, 128, 16, (128, 32)),  # 38.4 -> 32
        (128, 24, 128, 16, (128, 32)),  # exactly 1.5 grids: halves round up
        (2048, 10, 512, 8, (512, 8)),  # 2.5 -> 0 grids -> at least one grid
        (3, 2049, 128, 16, (16, 128)),
        (1920, 1080, 512, 8, (512, 288)),
        (1920, 1080, 100, 16, (96, 64)),  # native off the grid: the long side is snapped too; 56.25 -> 64
    ],
)
def test_fit_to_grid(width: int, height: int, native: int, grid: int, expected: tuple[int, int]) -> None:
    assert fit_to_grid(width, height, native, grid) == expected


@pytest.mark.parametrize("args", [(0, 10, 128, 16), (10, 10, 0, 16), (10, 10, 128, 0), (-1, 10, 128, 16)])
def test_fit_to_grid_rejects_non_positive(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        fit_to_grid(*args)


# --- tensors --------------------------------------------------------------------------------------------


def test_image_to_tensor_matches_vae_image_processor() -> None:
    img = noise_image(16, 8)
    tensor = image_to_tensor(img, (16, 8))
    assert tensor.shape == (1, 3, 8, 16)
    assert tensor.dtype == np.float32
    assert tensor.flags.c_contiguous
    pixels = np.asarray(img).astype(np.float32) / 255.0
    expected = (2.0 * pixels - 1.0).transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(tensor, expected)
    assert tensor.min() >= -1.0
    assert tensor.max() <= 1.0


def test_image_to_tensor_resizes_with_lanczos() -> None:
    img = noise_image(40, 20)
    tensor = image_to_tensor(img, (16, 8))
    assert tensor.shape == (1, 3, 8, 16)
    reference = np.asarray(img.resize((16, 8), Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
    np.testing.assert_array_equal(tensor[0], (2.0 * reference - 1.0).transpose(2, 0, 1))


def test_image_to_tensor_converts_non_rgb() -> None:
    assert image_to_tensor(Image.new("L", (4, 4), 255), (4, 4)).tolist() == np.ones((1, 3, 4, 4)).tolist()


def test_tensor_to_png_matches_diffusers_postprocess() -> None:
    sample = np.array([[[-1.0, -0.5, 0.0, 1.0, 3.0, -3.0, 0.0039, 0.0041]]], dtype=np.float32).repeat(3, axis=0)
    png = tensor_to_png(sample)
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    assert decoded.shape == (1, 8, 3)
    expected = (np.clip(sample / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded[0, :, 0].tolist() == [0, 64, 128, 255, 255, 0, 128, 128]


def test_tensor_to_png_is_deterministic() -> None:
    sample = np.random.default_rng(1).standard_normal((3, 32, 24)).astype(np.float32)
    first = tensor_to_png(sample)
    assert first.startswith(b"\x89PNG\r\n\x1a\n")
    assert tensor_to_png(sample.copy()) == first
    assert Image.open(io.BytesIO(first)).size == (24, 32)


def test_tensor_to_png_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        tensor_to_png(np.zeros((1, 3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        tensor_to_png(np.zeros((4, 4, 3), dtype=np.float32))
    nan = np.zeros((3, 4, 4), dtype=np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tensor_to_png(nan)


def test_round_trip_through_the_tensor_layout() -> None:
    img = noise_image(24, 16, seed=3)
    tensor = image_to_tensor(img, img.size)
    back = np.asarray(Image.open(io.BytesIO(tensor_to_png(tensor[0]))))
    np.testing.assert_array_equal(back, np.asarray(img))


def test_image_to_png() -> None:
    img = decode_image(encode(noise_image(10, 6), "JPEG"))
    png = image_to_png(img)
    assert png == image_to_png(img)
    again = Image.open(io.BytesIO(png))
    assert again.format == "PNG"
    np.testing.assert_array_equal(np.asarray(again), np.asarray(img))


def test_png_output_carries_no_colour_profile() -> None:
    with_profile = Image.new("RGB", (4, 4), RED)
    source = encode(with_profile, "PNG", icc_profile=b"fake-profile-bytes")
    img = decode_image(source)
    png = image_to_png(img)
    assert b"iCCP" in source
    assert b"iCCP" not in png


# --- decode work per image: progressive JPEGs with too many scans (libjpeg-turbo issue 284) ------------------


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a well-formed JPEG (a scan ends where its entropy data does)."""
    segments, pos = [], 2
    while pos < len(data):
        assert data[pos] == 0xFF, pos
        marker = data[pos + 1]
        if marker == 0xD9:
            segments.append((marker, pos, pos + 2))
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        segments.append((marker, pos, end))
        pos = end
    return segments


def many_scan_jpeg(scans: int, side: int = MAX_IMAGE_SIDE) -> bytes:
    """A valid progressive JPEG of `side` x `side` with `scans` scans in all, small on the wire but costly.

    Pillow writes libjpeg's standard progression (10 scans for YCbCr); its last scan (an AC refinement, with
    its Huffman table) is repeated before EOI. A flat grey image makes each scan a few bytes (end-of-band runs),
    yet libjpeg still walks every block of the image for each one: ~5 ms a scan at 2048 x 2048 here, so 10,000
    scans (~400 kB) are close to a minute of CPU. libjpeg only warns about the repeated progression.
    """
    base = encode(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", progressive=True, quality=90)
    segments = _jpeg_segments(base)
    own = sum(1 for marker, _, _ in segments if marker == 0xDA)
    assert scans >= own
    last_sos = max(i for i, (marker, _, _) in enumerate(segments) if marker == 0xDA)
    first = last_sos - 1 if segments[last_sos - 1][0] == 0xC4 else last_sos
    repeat = base[segments[first][1] : segments[last_sos][2]]
    eoi = segments[-1][1]
    return base[:eoi] + repeat * (scans - own) + base[eoi:]


def test_jpeg_scan_count_of_ordinary_files() -> None:
    img = noise_image(64, 48)
    assert codecs.jpeg_scan_count(encode(img, "JPEG")) == 1
    assert codecs.jpeg_scan_count(encode(img, "JPEG", progressive=True)) == 10
    assert codecs.jpeg_scan_count(encode(img.convert("L"), "JPEG", progressive=True)) == 6
    assert codecs.jpeg_scan_count(many_scan_jpeg(250, side=64)) == 250
    assert codecs.jpeg_scan_count(b"\xff\xd8\xff") == 0
    assert codecs.jpeg_scan_count(encode(img, "JPEG")[:200]) == 0  # cut in the headers: no scan yet


def test_scans_in_header_segments_are_not_counted_but_between_scans_they_are() -> None:
    """Markers inside a length-prefixed segment before the first scan (an EXIF thumbnail, a comment) are data
    to libjpeg too; after the first scan every `FF DA` pair counts (an over-count, never an under-count)."""
    thumbnail = encode(noise_image(16, 16), "JPEG", progressive=True)
    base = encode(noise_image(64, 48), "JPEG", progressive=True)
    comment = b"\xff\xfe" + struct.pack(">H", len(thumbnail) + 2) + thumbnail
    with_comment = base[:2] + comment + base[2:]
    assert codecs.jpeg_scan_count(with_comment) == 10
    assert decode_image(with_comment, max_jpeg_scans=10).size == (64, 48)
    segments = _jpeg_segments(base)
    second_scan = [start for marker, start, _ in segments if marker == 0xDA][1]
    between = base[:second_scan] + comment + base[second_scan:]
    assert codecs.jpeg_scan_count(between) == 20


def test_fill_bytes_and_stuffing_before_a_marker_are_skipped_as_libjpeg_does() -> None:
    base = encode(noise_image(32, 32), "JPEG", progressive=True)
    segments = _jpeg_segments(base)
    sof = next(start for marker, start, _ in segments if marker == 0xC2)
    padded = base[:sof] + b"\xff\xff\xff\x00junk" + base[sof:]  # fill, a stray FF 00, garbage: libjpeg skips them
    assert codecs.jpeg_scan_count(padded) == 10
    first_sos = next(start for marker, start, _ in segments if marker == 0xDA)
    filled = base[:first_sos] + b"\xff\xff" + base[first_sos:]  # FF FF FF DA is still an SOS
    assert codecs.jpeg_scan_count(filled) == 10


def test_scan_limit_is_inclusive() -> None:
    at_limit, over = many_scan_jpeg(12, side=32), many_scan_jpeg(13, side=32)
    assert decode_image(at_limit, max_jpeg_scans=12).size == (32, 32)
    with pytest.raises(InvalidImage) as caught:
        decode_image(over, max_jpeg_scans=12)
    assert caught.value.details == "JPEG has more than 12 scans"


def test_process_scan_limit_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecs, "_max_jpeg_scans", codecs.MAX_JPEG_SCANS)
    codecs.set_max_jpeg_scans(11)
    with pytest.raises(InvalidImage):
        decode_image(many_scan_jpeg(12, side=32))
    codecs.set_max_jpeg_scans(12)
    assert decode_image(many_scan_jpeg(12, side=32)).size == (32, 32)
    with pytest.raises(ValueError, match="at least 1"):
        codecs.set_max_jpeg_scans(0)


def test_many_scan_jpeg_is_refused_fast_and_is_costly_without_the_guard() -> None:
    """Liveness bound, not a performance claim: the refusal of a 10,000-scan file takes well under a second
    (it is one pass over ~400 kB). The same kind of file decodes when allowed, so it is a valid image and the
    refusal is the guard's; its cost without the guard is measured (and printed, `-s`), not asserted."""
    bomb = many_scan_jpeg(10_000)
    assert len(bomb) < 512 * 1024
    started = time.perf_counter()
    with pytest.raises(InvalidImage) as caught:
        decode_image(bomb)
    refused_in = time.perf_counter() - started
    assert caught.value.details == f"JPEG has more than {codecs.MAX_JPEG_SCANS} scans"
    assert refused_in < 1.0
    sample = many_scan_jpeg(200)
    started = time.perf_counter()
    assert decode_image(sample, max_jpeg_scans=200).size == (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
    per_scan = (time.perf_counter() - started) / 200
    print(
        f"\nunguarded decode: {per_scan * 1e3:.1f} ms per scan at {MAX_IMAGE_SIDE}px -> ~{per_scan * 10_000:.0f} s "
        f"for the {len(bomb) // 1024} kB 10,000-scan file; refused in {refused_in * 1e3:.1f} ms"
    )


# --- the image work pool (gateway/media/work.py) -------------------------------------------------------------


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_image_work_runs_on_its_own_threads_not_the_default_executor() -> None:
    pool = work.ImageWorkPool(threads=2, max_waiting=0)
    try:
        names = await asyncio.gather(*(pool.run(lambda: threading.current_thread().name) for _ in range(2)))
        assert all(name.startswith("image-work") for name in names)
        assert pool.threads == 2 and pool.in_flight == 0
        assert work.ImageWorkPool().threads == (os.cpu_count() or 1)
    finally:
        pool.shutdown()


async def test_request_work_beyond_the_queue_is_overloaded_and_job_work_waits() -> None:
    pool = work.ImageWorkPool(threads=1, max_waiting=1)
    gate = threading.Event()
    try:
        running = asyncio.ensure_future(pool.run(gate.wait, 10.0))
        waiting = asyncio.ensure_future(pool.run(lambda: "second"))
        await _until(lambda: pool.in_flight == 2)
        with pytest.raises(Overloaded) as caught:
            await pool.run(lambda: "refused")
        assert caught.value.headers["Retry-After"] == str(work.RETRY_AFTER_S)
        job_work = asyncio.ensure_future(pool.run(lambda: "job", wait=True))  # a job's work is never refused
        await _until(lambda: pool.in_flight == 3)
        gate.set()
        assert await asyncio.gather(running, waiting, job_work) == [True, "second", "job"]
        assert pool.in_flight == 0
        assert await pool.run(lambda: "room again") == "room again"
    finally:
        gate.set()
        pool.shutdown()


async def test_a_cancelled_caller_frees_its_slot_only_when_its_work_is_done() -> None:
    pool = work.ImageWorkPool(threads=1, max_waiting=1)
    gate = threading.Event()
    try:
        running = asyncio.ensure_future(pool.run(gate.wait, 10.0))
        waiting = asyncio.ensure_future(pool.run(lambda: "never"))
        await _until(lambda: pool.in_flight == 2)
        waiting.cancel()  # not started yet: cancelled on the pool too, its slot is free at once
        await _until(lambda: pool.in_flight == 1)
        running.cancel()  # already on a thread: it goes on, and keeps its slot until it returns
        await asyncio.sleep(0.05)
        assert pool.in_flight == 1
        gate.set()
        await _until(lambda: pool.in_flight == 0)
    finally:
        gate.set()
        pool.shutdown()


def test_pool_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        work.ImageWorkPool(threads=0)
    with pytest.raises(ValueError):
        work.ImageWorkPool(threads=1, max_waiting=-1)


async def test_configure_sizes_the_process_pool_and_the_scan_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(work, "_pool", None)
    monkeypatch.setattr(codecs, "_max_jpeg_scans", codecs.MAX_JPEG_SCANS)
    first = work.configure(Settings(image_threads=3, image_queue=5, max_jpeg_scans=7))
    assert (first.threads, first.max_waiting, codecs._max_jpeg_scans) == (3, 5, 7)
    assert work.configure(Settings(image_threads=3, image_queue=5, max_jpeg_scans=7)) is first  # unchanged: kept
    assert await work.run_image_work(sum, [1, 2]) == 3
    second = work.configure_pool(None, 2)
    assert second is not first and second.threads == (os.cpu_count() or 1)
    assert work.pool() is second
    second.shutdown()
    env = Settings.from_env({"IMAGEN_IMAGE_THREADS": "2", "IMAGEN_IMAGE_QUEUE": "4", "IMAGEN_MAX_JPEG_SCANS": "50"})
    assert (env.image_threads, env.image_queue, env.max_jpeg_scans) == (2, 4, 50)
    defaults = Settings()
    assert (defaults.image_threads, defaults.image_queue, defaults.max_jpeg_scans) == (None, 16, 100)


# --- masks ----------------------------------------------------------------------------------------------


def _mask_png(img: Image.Image, **params: object) -> bytes:
    return encode(img, "PNG", **params)


def _hole(mode: str, size: tuple[int, int] = (8, 6)) -> Image.Image:
    """An image of `mode` whose alpha is 0 at (2..4, 1..3) and 255 elsewhere."""
    rgba = Image.new("RGBA", size, (0, 0, 0, 255))
    rgba.paste((255, 255, 255, 0), (2, 1, 5, 4))
    return rgba.convert(mode)


def _expected_hole(size: tuple[int, int] = (8, 6)) -> np.ndarray:
    out = np.zeros((size[1], size[0]), np.uint8)
    out[1:4, 2:5] = 255
    return out


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_mask_alpha_hole_is_the_area_to_change(mode: str) -> None:
    mask = codecs.decode_mask(_mask_png(_hole(mode)))
    assert mask.mode == "L" and mask.size == (8, 6)
    np.testing.assert_array_equal(np.asarray(mask), _expected_hole())


def test_mask_webp_with_an_alpha_hole() -> None:
    mask = codecs.decode_mask(encode(_hole("RGBA"), "WEBP", lossless=True))
    np.testing.assert_array_equal(np.asarray(mask), _expected_hole())


def test_mask_palette_with_transparency() -> None:
    pal = Image.new("P", (8, 6), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.paste(1, (2, 1, 5, 4))
    data = _mask_png(pal, transparency=1)  # index 1 (white) fully transparent
    np.testing.assert_array_equal(np.asarray(codecs.decode_mask(data)), _expected_hole())
    # Without tRNS the same palette is read by luminance: white = change, the same area.
    np.testing.assert_array_equal(np.asarray(codecs.decode_mask(_mask_png(pal))), _expected_hole())


def test_opaque_rgba_mask_is_read_by_luminance() -> None:
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 255, 255, 255))
    rgba.putpixel((2, 1), (255, 0, 0, 255))
    out = np.asarray(codecs.decode_mask(_mask_png(rgba)))
    assert out[0, 1] == 255 and out[0, 0] == 0
    assert out[1, 2] == 76  # ITU-R 601 luma of pure red (Pillow's convert("L"), diffusers' grayscale)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_grey_and_rgb_masks_are_read_by_luminance(mode: str) -> None:
    grey = Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8), mode="L")
    out = np.asarray(codecs.decode_mask(_mask_png(grey.convert(mode))))
    np.testing.assert_array_equal(out, [[0, 127, 128, 255]])


def test_16_bit_grey_mask_is_scaled() -> None:
    wide = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32896, 65535)):
        wide.putpixel((x, 0), value)
    assert wide.mode == "I;16"
    out = np.asarray(codecs.decode_mask(_mask_png(wide)))
    np.testing.assert_array_equal(out, [[0, 128, 255]])


def test_jpeg_mask_is_read_by_luminance() -> None:
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 16))
    out = np.asarray(codecs.decode_mask(encode(img, "JPEG", quality=95)))
    assert out[:, :12].max() < 20 and out[:, 20:].min() > 235


@pytest.mark.parametrize(
    "data",
    [b"hello", b"GIF89a" + b"\x00" * 20, encode(Image.new("RGB", (8, 8)), "PNG")[:40], png_with_header(4096, 8)],
    ids=["garbage", "gif", "truncated", "too-wide"],
)
def test_bad_masks_raise_the_image_errors(data: bytes) -> None:
    with pytest.raises((InvalidImage, ImageDimensionsTooLarge)) as image_error:
        decode_image(data)
    with pytest.raises(type(image_error.value)) as mask_error:
        codecs.decode_mask(data)
    assert (mask_error.value.message, mask_error.value.details) == (
        image_error.value.message,
        image_error.value.details,
    )


@pytest.mark.parametrize("side", [100_000, 2100])  # Pillow's bomb error, and its warning range
def test_mask_decode_bomb_is_refused_like_the_image(side: int) -> None:
    bomb = png_with_header(side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageDimensionsTooLarge):
            decode_image(bomb)
        with pytest.raises(ImageDimensionsTooLarge) as mask_error:
            codecs.decode_mask(bomb)
    assert mask_error.value.details == f"Maximum dimensions are {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels"


def test_many_scan_jpeg_mask_is_refused_like_the_image() -> None:
    data = many_scan_jpeg(codecs.MAX_JPEG_SCANS + 1, side=64)
    with pytest.raises(InvalidImage) as image_error:
        decode_image(data)
    with pytest.raises(InvalidImage) as mask_error:
        codecs.decode_mask(data)
    assert "scans" in (mask_error.value.details or "")
    assert mask_error.value.details == image_error.value.details


@pytest.mark.parametrize(
    ("image", "mask", "fits"),
    [
        ((160, 120), (80, 60), True),
        ((160, 120), (160, 120), True),
        ((160, 120), (100, 100), False),
        ((160, 120), (120, 160), False),
        ((1000, 333), (100, 33), True),  # 33.3 rounded down
        ((1000, 333), (100, 34), True),  # rounded up
        ((1000, 333), (100, 36), False),
        ((2048, 17), (1024, 8), True),
        ((160, 120), (0, 60), False),
    ],
)
def test_mask_fits(image: tuple[int, int], mask: tuple[int, int], fits: bool) -> None:
    assert codecs.mask_fits(image, mask) is fits


def _mask_processor() -> object:
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def test_prepare_mask_and_tensor_match_diffusers_mask_processor() -> None:
    """Resize (LANCZOS), binarize at 0.5: diffusers' mask_condition, from a mask of another size."""
    import torch  # noqa: F401  (diffusers' preprocess returns a torch tensor)

    processor = _mask_processor()
    mask = noise_image(40, 30, seed=3).convert("L")
    ours = codecs.mask_to_tensor(codecs.prepare_mask(mask, (64, 48)))
    theirs = processor.preprocess(mask, height=48, width=64)  # type: ignore[attr-defined]
    assert ours.shape == (1, 1, 48, 64) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.parametrize("blur", [1, 4, 9])
def test_mask_blur_is_vae_image_processor_blur(blur: int) -> None:
    from diffusers.image_processor import VaeImageProcessor

    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (10, 12, 40, 30))
    ours = codecs.prepare_mask(mask, (64, 48), blur)
    theirs = VaeImageProcessor.blur(mask, blur_factor=blur)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert codecs.prepare_mask(mask, (64, 48), 0).tobytes() == mask.tobytes()
    assert codecs.prepare_mask(mask, (64, 48), None).tobytes() == mask.tobytes()


def test_mask_threshold_is_128() -> None:
    grey = Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8), mode="L")
    np.testing.assert_array_equal(codecs.mask_to_tensor(grey), [[[[0.0, 0.0, 1.0, 1.0]]]])
    theirs = _mask_processor().preprocess(grey.resize((8, 8), Image.Resampling.NEAREST), height=8, width=8)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(codecs.mask_to_tensor(grey.resize((8, 8), Image.Resampling.NEAREST)), theirs.numpy())


def test_empty_mask_check() -> None:
    assert codecs.mask_is_empty(Image.new("L", (8, 8), 127))
    almost = Image.new("L", (8, 8), 0)
    almost.putpixel((7, 7), 128)
    assert not codecs.mask_is_empty(almost)
    # A thin white stroke that blurring and resizing wash out marks nothing.
    thin = Image.new("L", (256, 256), 0)
    thin.paste(255, (100, 0, 101, 256))
    assert not codecs.mask_is_empty(thin)
    assert codecs.mask_is_empty(codecs.prepare_mask(thin, (64, 64), 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apply_overlay_is_bit_equal_to_diffusers(seed: int) -> None:
    from diffusers.image_processor import VaeImageProcessor

    original = noise_image(48, 32, seed=seed)
    generated = noise_image(48, 32, seed=seed + 10)
    mask = noise_image(48, 32, seed=seed + 20).convert("L")
    processor = VaeImageProcessor()
    theirs = processor.apply_overlay(mask, original, generated)
    ours = codecs.apply_overlay(mask, original, generated)
    assert ours.mode == theirs.mode == "RGB"
    assert ours.tobytes() == theirs.tobytes()


def test_apply_overlay_keeps_black_and_replaces_white() -> None:
    original = noise_image(16, 8, seed=4)
    generated = noise_image(16, 8, seed=5)
    mask = Image.new("L", (16, 8), 0)
    mask.paste(255, (8, 0, 16, 8))
    out = np.asarray(codecs.apply_overlay(mask, original, generated))
    np.testing.assert_array_equal(out[:, :8], np.asarray(original)[:, :8])
    np.testing.assert_array_equal(out[:, 8:], np.asarray(generated)[:, 8:])


def test_encode_image_is_encode_output_of_the_same_pixels() -> None:
    sample = np.random.default_rng(6).uniform(-1, 1, (3, 16, 16)).astype(np.float32)
    for fmt in codecs.OUTPUT_FORMATS:
        assert codecs.encode_image(codecs.tensor_to_image(sample), fmt) == codecs.encode_output(sample, fmt)
