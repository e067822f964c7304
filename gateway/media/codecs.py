"""Image bytes <-> arrays, with every size limit enforced before the expensive step it protects.

Formats are decided by magic bytes only, never by a file name, URL suffix or declared MIME type. The array
conventions match diffusers' `VaeImageProcessor`, so the same input gives the same tensor as the reference
pipeline.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

import numpy as np
import pybase64
from PIL import Image, ImageFile, ImageFilter, ImageOps

from gateway.errors import ImageDimensionsTooLarge, ImageTooLarge, InvalidImage

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_SIDE = 2048
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_IMAGE_URL_CHARS = 2048
IMAGE_URL_SCHEMES = ("http", "https")
# Pillow warns above MAX_IMAGE_PIXELS and raises above twice that, at `Image.open` (header only). Our side
# check rejects anything above MAX_IMAGE_SIDE x MAX_IMAGE_SIDE anyway, so this guard only has to fit that.
DECOMPRESSION_BOMB_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
PNG_COMPRESS_LEVEL = 6  # zlib level; with Z_RLE below it hardly matters (zlib's RLE path ignores most of it)
# zlib strategy Z_RLE: filtered image rows compress as well with runs as with LZ77 matches, at a fraction of the
# time (docs/benchmarks.md, "PNG encoder settings": 2-6x faster than the default strategy, bytes within 1 %
# on smooth and noisy outputs and 2-7 % smaller on flat ones). Huffman-only is as fast but doubles flat images.
PNG_COMPRESS_TYPE = zlib.Z_RLE
# Decode work per image: libjpeg decodes every scan of a progressive JPEG over the whole image, so a small file
# with thousands of scans costs minutes of CPU (libjpeg-turbo issue 284). Encoders write about 10 scans (Pillow,
# libjpeg's default progression; mozjpeg's optimised ones a few more); more than this is refused before decoding.
MAX_JPEG_SCANS = 100
# Output encodings (the request's `output_format` / `output_quality`). Quality is libjpeg's / libwebp's 1-100
# scale; the default 90 is visually lossless for photographs. A 512 px output encodes in about 3 ms as JPEG,
# 25 ms as PNG and 28 ms as WebP (method 4) on the 2-core CI machine.
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_OUTPUT_FORMAT: Final = "png"
MIN_OUTPUT_QUALITY = 1
MAX_OUTPUT_QUALITY = 100
DEFAULT_OUTPUT_QUALITY: Mapping[str, int] = MappingProxyType({"jpeg": 90, "webp": 90})
OUTPUT_EXTENSIONS: Mapping[str, str] = MappingProxyType({"png": "png", "jpeg": "jpg", "webp": "webp"})
JPEG_SUBSAMPLING = 2  # Pillow's code for 4:2:0
WEBP_METHOD = 4  # libwebp's speed/size trade-off 0 (fast) - 6 (small); 4 is its default
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white, not whatever RGB hid under alpha 0
_DELETE_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")  # ASCII whitespace only; anything else is invalid
# Encoded text longer than this multiple of the largest allowed payload is refused before it is even scanned.
_WHITESPACE_SLACK = 2
_DATA_URI_HEADER_CHARS = 256  # room for "data:<media type>;<params>;base64," on top of the payload bound
_DATA_URI = re.compile(rf"^data:(?P<params>[^,]{{0,{_DATA_URI_HEADER_CHARS}}}),", re.IGNORECASE)
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,31}):")  # bounded: never scans a huge payload

# What Pillow's plugins raise on corrupt or hostile input (across formats, historically): a bad image.
_PILLOW_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
)

INVALID_IMAGE_MESSAGE = "Unable to process the provided image"
_max_jpeg_scans = MAX_JPEG_SCANS
CORRUPT_DETAILS = "Image format not supported or file corrupted"

Image.MAX_IMAGE_PIXELS = DECOMPRESSION_BOMB_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload must fail, not decode as grey padding


@dataclass(frozen=True)
class ImageSource:
    """Where the image comes from: exactly one of `url` (to fetch) or `data` (already decoded base64)."""

    url: str | None
    data: bytes | None


def describe_size(num_bytes: int) -> str:
    """Human wording of a byte cap, e.g. "10MB", as the spec's error details use."""
    mib = 1024 * 1024
    return f"{num_bytes // mib}MB" if num_bytes % mib == 0 else f"{num_bytes} bytes"


def image_too_large(max_bytes: int) -> ImageTooLarge:
    """The one wording of the size error, shared by base64 decoding and URL fetching."""
    return ImageTooLarge("Image file size exceeds maximum limit", f"Maximum file size is {describe_size(max_bytes)}")


def _max_encoded_chars(max_bytes: int) -> int:
    """Length of the base64 encoding of `max_bytes` bytes."""
    return 4 * ((max_bytes + 2) // 3)


def _decode_base64(text: str, max_bytes: int) -> bytes:
    """Strict standard base64 (padding required, no URL-safe alphabet); ASCII whitespace is tolerated."""
    max_encoded = _max_encoded_chars(max_bytes)
    if len(text) > _WHITESPACE_SLACK * max_encoded:
        raise image_too_large(max_bytes)
    # pybase64 (SIMD) validates and decodes a 1 MB field in ~0.04 ms, binascii's strict mode in ~2.5 ms; the
    # whitespace-free text clients send is decoded as it is, without the copy that stripping would make.
    try:
        if len(text) > max_encoded:
            raise ValueError("longer than the limit before whitespace is removed")
        data = pybase64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, non-ASCII text, whitespace, or too long: strip whitespace and retry
        compact = text.translate(_DELETE_WHITESPACE)
        if len(compact) > max_encoded:
            raise image_too_large(max_bytes) from None
        try:
            data = pybase64.b64decode(compact, validate=True)
        except ValueError:
            raise InvalidImage(INVALID_IMAGE_MESSAGE, "Image is not valid base64") from None
    if not data:
        raise InvalidImage(INVALID_IMAGE_MESSAGE, "Image data is empty")
    if len(data) > max_bytes:
        raise image_too_large(max_bytes)
    return data


def parse_image_field(value: str, max_bytes: int = MAX_IMAGE_BYTES) -> ImageSource:
    """Classify the `image` field: an http(s) URL, a `data:` URI with `;base64`, or bare base64.

    The declared media type of a data URI is ignored (content decides). Any other URL scheme (file:, ftp:,
    gopher:...) is refused with `InvalidImage`, since it is the image field that cannot be used.
    """
    if len(value) > _WHITESPACE_SLACK * _max_encoded_chars(max_bytes) + _DATA_URI_HEADER_CHARS:
        raise image_too_large(max_bytes)  # refuse a huge string before even copying it
    text = value.strip()
    data_uri = _DATA_URI.match(text)
    if data_uri:
        params = [p.strip().lower() for p in data_uri.group("params").split(";")]
        if "base64" not in params[1:]:
            raise InvalidImage(INVALID_IMAGE_MESSAGE, "Data URIs must be base64 encoded (';base64,')")
        return ImageSource(url=None, data=_decode_base64(text[data_uri.end() :], max_bytes))
    if text[:5].lower() == "data:":
        raise InvalidImage(INVALID_IMAGE_MESSAGE, "Malformed data URI; expected 'data:image/...;base64,...'")
    scheme = _SCHEME.match(text)  # ':' is not in the base64 alphabet, so this cannot be bare base64
    if scheme:
        name = scheme.group("scheme").lower()
        if name not in IMAGE_URL_SCHEMES:
            raise InvalidImage(
                INVALID_IMAGE_MESSAGE,
                f"URL scheme '{name}' is not supported; use http(s) or a base64 data URI",
            )
        if len(text) > MAX_IMAGE_URL_CHARS:
            raise InvalidImage(INVALID_IMAGE_MESSAGE, f"Image URL is longer than {MAX_IMAGE_URL_CHARS} characters")
        try:
            host = urlsplit(text).hostname
        except ValueError:
            host = None
        if not host or any(ch.isspace() for ch in text):
            raise InvalidImage(INVALID_IMAGE_MESSAGE, "Image URL is not a valid absolute http(s) URL")
        return ImageSource(url=text, data=None)
    return ImageSource(url=None, data=_decode_base64(text, max_bytes))


def sniff_format(data: bytes) -> str | None:
    """Name the container by its magic bytes (Pillow's format names); None when unrecognised.

    GIF, BMP and TIFF are recognised only so the error can say what was sent; they are not in
    `SUPPORTED_FORMATS`.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def set_max_jpeg_scans(limit: int) -> None:
    """The process's bound on scans per JPEG (`IMAGEN_MAX_JPEG_SCANS`), used when `decode_image` is not given one."""
    global _max_jpeg_scans
    if limit < 1:
        raise ValueError("max_jpeg_scans must be at least 1")
    _max_jpeg_scans = limit


_SOS = 0xDA
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0-7 carry no length


def jpeg_scan_count(data: bytes) -> int:
    """An upper bound on the scans (SOS markers) libjpeg would decode in `data`; 0 if it has none.

    The segments before the first scan are walked by their lengths exactly as libjpeg reads them (so an EXIF
    thumbnail's own scans do not count); from the first scan on, every `FF DA` byte pair is counted. libjpeg
    finds each later marker by scanning for `FF` (skipping fill `FF`s), and inside entropy-coded data an `FF`
    is always stuffed (`FF 00`) or a marker, so every scan it decodes is one of those pairs: the count can be
    too high (an `FF DA` inside a segment between scans), never too low. One C-speed pass over the bytes.
    """
    pos, end = 2, len(data)  # after SOI
    while pos < end:
        pos = data.find(b"\xff", pos)
        if pos < 0:
            return 0
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            return 0
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker in _STANDALONE_MARKERS:  # stray stuffed byte (libjpeg skips it) or no length
            continue
        if marker == _SOS:
            return data.count(b"\xff\xda", pos - 2)
        if marker == 0xD9 or pos + 2 > end:  # EOI before any scan, or a truncated length
            return 0
        pos += int.from_bytes(data[pos : pos + 2], "big")  # the length counts its own two bytes
    return 0


def _has_alpha(img: Image.Image) -> bool:
    return "A" in img.getbands() or "transparency" in img.info


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with alpha composited on `ALPHA_BACKGROUND`; 16-bit grey scaled (Pillow's convert would clip)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open_checked(
    data: bytes, max_side: int, max_jpeg_scans: int | None, finish: Callable[[Image.Image], Image.Image]
) -> Image.Image:
    """Decode untrusted bytes with every check (`decode_image`'s), then `finish` the upright, loaded image.

    `finish` runs inside the same guards, so the image and the mask raise the same errors for the same bytes.
    """
    if max_side > MAX_IMAGE_SIDE:
        raise ValueError(f"max_side {max_side} exceeds MAX_IMAGE_SIDE {MAX_IMAGE_SIDE}")
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidImage(INVALID_IMAGE_MESSAGE, CORRUPT_DETAILS)
    if fmt not in SUPPORTED_FORMATS:
        raise InvalidImage(
            INVALID_IMAGE_MESSAGE, f"Image format {fmt} is not supported; use {', '.join(SUPPORTED_FORMATS)}"
        )
    scan_limit = _max_jpeg_scans if max_jpeg_scans is None else max_jpeg_scans
    if fmt == "JPEG" and jpeg_scan_count(data) > scan_limit:
        raise InvalidImage(INVALID_IMAGE_MESSAGE, f"JPEG has more than {scan_limit} scans")
    too_big = ImageDimensionsTooLarge(
        "Image dimensions exceed maximum limit", f"Maximum dimensions are {max_side}x{max_side} pixels"
    )
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_big from None
    except _PILLOW_DECODE_ERRORS:
        raise InvalidImage(INVALID_IMAGE_MESSAGE, CORRUPT_DETAILS) from None
    try:
        if img.width > max_side or img.height > max_side:
            raise too_big
        if img.width < 1 or img.height < 1:
            raise InvalidImage(INVALID_IMAGE_MESSAGE, CORRUPT_DETAILS)
        try:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return finish(upright)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise too_big from None
        except _PILLOW_DECODE_ERRORS:  # truncated or malformed pixel data surfaces here
            raise InvalidImage(INVALID_IMAGE_MESSAGE, CORRUPT_DETAILS) from None
    finally:
        img.close()


def decode_image(data: bytes, max_side: int = MAX_IMAGE_SIDE, max_jpeg_scans: int | None = None) -> Image.Image:
    """Decode untrusted bytes to an upright, fully loaded RGB image.

    Order matters: sniff, count a JPEG's scans, read the header, check the sides, and only then decode pixels.
    The first frame of an animated PNG/WebP is used. `max_side` may be lowered below `MAX_IMAGE_SIDE`, not
    raised: Pillow's bomb guard (`DECOMPRESSION_BOMB_PIXELS`) is sized for that limit. `max_jpeg_scans`
    defaults to the process's bound (`set_max_jpeg_scans`, `MAX_JPEG_SCANS` unless configured).
    """
    return _open_checked(data, max_side, max_jpeg_scans, _to_rgb)


# --- masks ---------------------------------------------------------------------------------------------------
# A mask is read like diffusers' `mask_processor` (`VaeImageProcessor(do_normalize=False, do_binarize=True,
# do_convert_grayscale=True)`): grey, LANCZOS to the processed size, optionally blurred, binarized at 0.5.

MASK_THRESHOLD = 128  # 8-bit grey at or above this is "change": diffusers' binarize, x / 255 >= 0.5


def _mask_from(img: Image.Image) -> Image.Image:
    """The alpha rule: fully transparent pixels are the area to change when the mask has any (OpenAI's and
    Stability's convention); otherwise luminance (white = change), alpha composited on white as the image is."""
    if _has_alpha(img):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] == 0:
            return alpha.point(lambda a: 255 if a == 0 else 0)
    if img.mode == "L":
        return img.copy()
    return _to_rgb(img).convert("L")  # ITU-R 601 luma, as diffusers' convert_to_grayscale


def decode_mask(data: bytes, max_side: int = MAX_IMAGE_SIDE, max_jpeg_scans: int | None = None) -> Image.Image:
    """Decode an untrusted mask to an upright "L" image at its own size (255 = change, 0 = keep, grey between).

    The same checks and errors as `decode_image` (a decode bomb, too many JPEG scans, bad bytes), then the alpha
    rule (`_mask_from`). White strokes on a transparent background therefore read as "change the background".
    """
    return _open_checked(data, max_side, max_jpeg_scans, _mask_from)


def mask_fits(image_size: tuple[int, int], mask_size: tuple[int, int]) -> bool:
    """Whether the mask (w, h) has the image's aspect ratio: some scale maps the image's size to the mask's with
    one pixel of slack per side (a client's rounding). E.g. 80x60 fits 160x120, 100x100 does not."""
    iw, ih = image_size
    mw, mh = mask_size
    if min(iw, ih, mw, mh) < 1:
        return False
    return (mw - 1) * ih <= (mh + 1) * iw and (mh - 1) * iw <= (mw + 1) * ih


def prepare_mask(mask: Image.Image, size: tuple[int, int], blur: int | None = None) -> Image.Image:
    """The mask at the processed `size` = (w, h): LANCZOS (diffusers' mask_processor), then, when `blur` > 0,
    `VaeImageProcessor.blur` (Pillow's GaussianBlur, sigma `blur` px). Not binarized: the overlay uses it as is."""
    out = mask if mask.mode == "L" else mask.convert("L")
    if out.size != tuple(size):
        out = out.resize(size, resample=Image.Resampling.LANCZOS)
    if blur:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    return out


def mask_is_empty(mask: Image.Image) -> bool:
    """Whether the prepared mask marks nothing to change (no pixel at or above `MASK_THRESHOLD`)."""
    return not bool((np.asarray(mask.convert("L")) >= MASK_THRESHOLD).any())


def mask_to_tensor(mask: Image.Image) -> np.ndarray:
    """The prepared mask as diffusers' `mask_condition`: float32 `[1, 1, H, W]`, 1 = change (>= 128), 0 = keep."""
    grey = np.asarray(mask.convert("L"))
    return np.ascontiguousarray((grey >= MASK_THRESHOLD).astype(np.float32)[np.newaxis, np.newaxis])


def apply_overlay(mask: Image.Image, original: Image.Image, generated: Image.Image) -> Image.Image:
    """Paste `original` back over `generated` outside the (blurred) mask, feathered by its grey levels.

    Exactly diffusers' `VaeImageProcessor.apply_overlay` without `crop_coords` (the same Pillow calls, so the
    same bytes); all three are at the processed size.
    """
    width, height = original.width, original.height
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    out = generated.convert("RGBA")
    out.alpha_composite(kept)
    return out.convert("RGB")


def fit_to_grid(width: int, height: int, native: int, grid: int) -> tuple[int, int]:
    """Size (w, h) to run the model at: the longer side becomes `native`, aspect ratio is kept.

    Each side (the longer one too, in case `native` is not a multiple of `grid`) is then rounded to the
    nearest multiple of `grid`, halves rounding up, and is at least `grid`. Computed in integers, so the
    result is exact: e.g. (1000, 333, 128, 16) -> 333*128/1000 = 42.6 -> (128, 48).
    """
    if min(width, height, native, grid) < 1:
        raise ValueError("width, height, native and grid must be positive")
    longer = max(width, height)

    def snap(side: int) -> int:
        # Nearest multiple of grid to side*native/longer, halves up:
        # floor((2*side*native + longer*grid) / (2*longer*grid)) grids, all in integers.
        multiples = (2 * side * native + longer * grid) // (2 * longer * grid)
        return max(grid, multiples * grid)

    return snap(width), snap(height)


def resize_for_model(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """RGB at `size` = (w, h), resized with Pillow's LANCZOS as diffusers does: the pixels the model reads."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    if rgb.size != tuple(size):
        rgb = rgb.resize(size, resample=Image.Resampling.LANCZOS)
    return rgb


def image_to_tensor(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize (Pillow LANCZOS, as diffusers) to `size` = (w, h); return float32 `[1, 3, H, W]` in [-1, 1].

    Values are x/255 then 2x-1, exactly diffusers' `VaeImageProcessor.preprocess` for a PIL input. An image
    already at `size` (`resize_for_model`'s) is not resized again: the same tensor either way.
    """
    rgb = resize_for_model(img, size)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = 2.0 * array - 1.0
    return np.ascontiguousarray(array.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)


def _encode_png(img: Image.Image) -> bytes:
    """PNG without metadata at a fixed level and strategy, so the same pixels always give the same bytes.

    `icc_profile=None` stops Pillow copying an input's colour profile: pixels are used as-is (no colour
    management, like diffusers), so a stored copy shows exactly what the model was given.
    """
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=PNG_COMPRESS_TYPE, icc_profile=None)
    return buffer.getvalue()


def tensor_to_image(sample: np.ndarray) -> Image.Image:
    """One VAE-decoder output `[3, H, W]` (roughly [-1, 1]) as 8-bit RGB pixels, as diffusers' postprocess does.

    Non-finite values are refused (ValueError): the recipe checks the decoder's output before it gets here.
    """
    if sample.ndim != 3 or sample.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] array, got shape {sample.shape}")
    if not np.all(np.isfinite(sample)):
        raise ValueError("sample contains NaN or infinity")
    unit = np.clip(sample.astype(np.float32) / 2.0 + 0.5, 0.0, 1.0)
    pixels = (unit.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels)


def tensor_to_png(sample: np.ndarray) -> bytes:
    """Encode one VAE-decoder output `[3, H, W]` (roughly [-1, 1]) as PNG (see `tensor_to_image`)."""
    return _encode_png(tensor_to_image(sample))


def output_quality(output_format: str, quality: int | None) -> int | None:
    """The quality an output is encoded at: the request's, else the format's default; None for PNG (lossless)."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}")
    if output_format == "png":
        if quality is not None:
            raise ValueError("PNG is lossless: it takes no quality")
        return None
    chosen = DEFAULT_OUTPUT_QUALITY[output_format] if quality is None else quality
    if not MIN_OUTPUT_QUALITY <= chosen <= MAX_OUTPUT_QUALITY:
        raise ValueError(f"quality must be {MIN_OUTPUT_QUALITY}-{MAX_OUTPUT_QUALITY}, got {chosen}")
    return chosen


def encode_output(sample: np.ndarray, output_format: str, quality: int | None = None) -> bytes:
    """Encode one VAE-decoder output in the request's format, with no metadata (no EXIF, XMP, ICC profile or
    text chunk: nothing about the job, the host or the encoder leaks into a served file).

    JPEG is baseline, 4:2:0 chroma subsampling (what libjpeg and the hosted APIs use by default), JFIF header
    only; WebP is lossy VP8 in a plain RIFF container (no VP8X extension chunk, so no room for metadata).
    """
    return encode_image(tensor_to_image(sample), output_format, quality)


def encode_image(img: Image.Image, output_format: str, quality: int | None = None) -> bytes:
    """Encode RGB pixels in the request's format, without metadata (see `encode_output`)."""
    level = output_quality(output_format, quality)
    if output_format == "png":
        return _encode_png(img)
    buffer = io.BytesIO()
    if output_format == "jpeg":
        img.save(buffer, format="JPEG", quality=level, subsampling=JPEG_SUBSAMPLING, optimize=False, icc_profile=None)
    else:
        img.save(buffer, format="WEBP", quality=level, method=WEBP_METHOD, lossless=False, icc_profile=None)
    return buffer.getvalue()


def image_to_png(img: Image.Image) -> bytes:
    """PNG copy of a decoded input (e.g. a base64 upload, so the response can link `original_image`).

    It is the decoded image (upright, RGB, alpha flattened), not the uploaded bytes.
    """
    return _encode_png(img)
