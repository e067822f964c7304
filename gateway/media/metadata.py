"""Metadata out of a stored input, pixels untouched: the stored copy of an upload keeps no EXIF (GPS, camera
serials, timestamps), XMP, IPTC, comments or text chunks.

Byte-level, not a re-encode: the compressed image data is copied as it is, so a re-run decodes exactly the pixels
the first run did. The one tag kept is the EXIF orientation (alone, in a minimal EXIF block), because decoding
applies it (`codecs.decode_image`). A container this module cannot walk is returned unchanged (and logged):
decoding has already accepted the image, so that is a well-formed file with a layout not handled here.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib

from PIL import ExifTags, Image

from gateway.media.codecs import SUPPORTED_FORMATS, sniff_format

log = logging.getLogger(__name__)

EXIF_HEADER = b"Exif\x00\x00"
UPRIGHT = 1
# JPEG: APP0 (JFIF), APP2 (ICC profile) and APP14 (Adobe: it decides how CMYK/YCCK is decoded) are kept; every
# other APPn segment (EXIF and XMP in APP1, IPTC in APP13, ...) and comments (COM) are dropped.
JPEG_KEPT_APPS = frozenset({0xE0, 0xE2, 0xEE})
JPEG_COMMENT = 0xFE
JPEG_SOS = 0xDA
JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# PNG chunks that carry metadata; eXIf returns with the orientation alone when it is not upright.
PNG_DROPPED = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# WebP chunks that carry metadata, and their flags in the VP8X header.
WEBP_DROPPED = frozenset({b"EXIF", b"XMP "})
WEBP_EXIF_FLAG, WEBP_XMP_FLAG = 0x08, 0x04


class _Unwalkable(ValueError):
    """A layout this module does not handle."""


def orientation_of(data: bytes) -> int:
    with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as img:
        value = img.getexif().get(ExifTags.Base.Orientation, UPRIGHT)
    return value if isinstance(value, int) and 1 <= value <= 8 else UPRIGHT


def _orientation_exif(orientation: int) -> bytes:
    """`Exif\\0\\0` and a TIFF block holding the orientation only."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif.tobytes()


def _strip_jpeg(data: bytes, orientation: int) -> bytes:
    out = [data[:2]]  # SOI
    pending_exif = orientation != UPRIGHT  # goes right after SOI (and JFIF's APP0 when it leads)
    i = 2
    while i < len(data):
        if data[i] != 0xFF:
            raise _Unwalkable("no marker where a segment should start")
        code = data[i + 1]
        if code == 0xFF:  # a fill byte before a marker
            out.append(data[i : i + 1])
            i += 1
            continue
        if code in JPEG_STANDALONE:
            out.append(data[i : i + 2])
            i += 2
            continue
        if pending_exif and code != 0xE0:
            payload = _orientation_exif(orientation)
            out.append(b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload)
            pending_exif = False
        if code == JPEG_SOS:
            out.append(data[i:])  # the scans and everything after them, as they are
            break
        if i + 4 > len(data):
            raise _Unwalkable("truncated segment header")
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        segment = data[i : i + 2 + length]
        i += 2 + length
        if (0xE1 <= code <= 0xEF and code not in JPEG_KEPT_APPS) or code == JPEG_COMMENT:
            continue
        out.append(segment)
    return b"".join(out)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _strip_png(data: bytes, orientation: int) -> bytes:
    out = [PNG_SIGNATURE]
    i = len(PNG_SIGNATURE)
    while i < len(data):
        if i + 8 > len(data):
            raise _Unwalkable("truncated chunk header")
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        chunk = data[i : i + 12 + length]
        i += 12 + length
        if kind == b"IDAT" and orientation != UPRIGHT:  # eXIf must come before the image data
            out.append(_png_chunk(b"eXIf", _orientation_exif(orientation)[len(EXIF_HEADER) :]))
            orientation = UPRIGHT
        if kind not in PNG_DROPPED:
            out.append(chunk)
    return b"".join(out)


def _strip_webp(data: bytes, orientation: int) -> bytes:
    chunks = []
    i = 12
    while i < len(data):
        if i + 8 > len(data):
            raise _Unwalkable("truncated chunk header")
        kind = data[i : i + 4]
        (length,) = struct.unpack("<I", data[i + 4 : i + 8])
        chunk = data[i : i + 8 + length + (length & 1)]
        i += 8 + length + (length & 1)
        if kind not in WEBP_DROPPED:
            chunks.append(chunk)
    keep_exif = orientation != UPRIGHT
    if chunks and chunks[0][:4] == b"VP8X":  # clear the flags of what is gone (EXIF stays when it is kept)
        header = bytearray(chunks[0])
        header[8] &= ~(WEBP_XMP_FLAG | (0 if keep_exif else WEBP_EXIF_FLAG)) & 0xFF
        chunks[0] = bytes(header)
    elif keep_exif:
        raise _Unwalkable("an oriented simple WebP (no VP8X header) cannot carry the orientation alone")
    if keep_exif:
        tiff = _orientation_exif(orientation)[len(EXIF_HEADER) :]
        chunks.append(b"EXIF" + struct.pack("<I", len(tiff)) + tiff + b"\0" * (len(tiff) & 1))
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def strip_metadata(data: bytes) -> bytes:
    """`data` (an accepted JPEG, PNG or WebP) without its metadata but its orientation; the same bytes when it
    carries none."""
    strip = {"JPEG": _strip_jpeg, "PNG": _strip_png, "WEBP": _strip_webp}.get(sniff_format(data) or "")
    if strip is None:
        return data
    try:
        return strip(data, orientation_of(data))
    except (_Unwalkable, struct.error, IndexError) as exc:
        log.warning("stored input keeps its metadata: %s", exc)
        return data
