"""Turn user-supplied images (PIL, path, bytes, data URI, http(s) URL) into safe RGB PIL images.

Everything here runs on untrusted input (the server passes request payloads straight in), so each
step has a cap: payload bytes, decoded pixels per image and per request (both checked from the headers BEFORE
decoding), number of images, and for URLs scheme, destination address (on every hop), redirects, size and time.
`load_images(..., shrink=)` also decodes very large images straight to a smaller size (JPEG DCT scaling, then an
integer box reduce) when the caller's preprocessing shrinks them anyway, so their full size is never held for long.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Optional
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from ..allocator import release_freed_memory
from .image_fetch import fetch_url, forbidden_address_reason, redact_url, shorten

__all__ = [
    "FetchedImage", "ImageError", "ImageLimits", "load_image", "load_images", "describe_source", "fetch_image",
    "flatten_to_rgb", "forbidden_address_reason", "is_remote",
]

# Formats whose decoders are plain and well exercised. Notably absent: EPS (runs Ghostscript), and
# exotic scientific/legacy formats that only widen the attack surface.
# (Multi-picture JPEGs, MPO, are opened by the JPEG plugin.) Names this Pillow build lacks are skipped.
DEFAULT_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "PPM")


@dataclass
class ImageLimits:
    max_pixels: int = 40_000_000  # decoded width*height per image (a 40 Mpx RGB image is ~120 MB)
    max_bytes: int = 20 * 1024 * 1024  # encoded payload per image
    max_images: int = 16  # per request / prompt
    # Decoded width*height of all images of one request together (load_images): four 6000x4000 photos.
    max_request_pixels: int = 100_000_000
    # http(s) URLs are refused unless a caller opts in: vlmkit.load does for its user (allow_remote_images=True),
    # a server only with --allow-remote-images
    allow_remote: bool = False
    allow_paths: bool = True  # local files; a server taking requests from others should set False
    timeout_s: float = 10.0  # whole download (connect, headers, body, redirects), not per read
    max_redirects: int = 3
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS


REMOTE_DISABLED = ("remote image URLs are disabled (ImageLimits.allow_remote=False: vlmkit.load(..., "
                   "allow_remote_images=False), --no-remote-images, or a server started without "
                   "--allow-remote-images); download the image and pass its path or bytes")


class ImageError(ValueError):
    """An image could not be used. The message says which one (index, short source) and why."""

    def __init__(self, reason: str, *, index: int | None = None, source: str = ""):
        self.reason, self.index, self.source = reason, index, source
        which = "image" if index is None else f"image {index}"
        super().__init__(f"{which} ({source}): {reason}" if source else f"{which}: {reason}")


@dataclass(frozen=True)
class FetchedImage:
    """A remote image's bytes, downloaded ahead of decoding (so downloads and decoding can use different pools)."""

    url: str
    data: bytes


# A size hint from the caller's preprocessing: (width, height) -> the smallest (width, height) the image may be
# reduced to before it, or None to keep it whole.
ShrinkHint = Callable[[int, int], Optional[tuple[int, int]]]

EARLY_REDUCE_MIN_PIXELS = 4_000_000  # images up to this size stay exactly as decoded (pixel parity with HF)
TRIM_AFTER_PIXELS = 8_000_000  # after decoding this much, give freed memory back to the OS


def is_remote(x) -> bool:
    return isinstance(x, str) and x[:8].lower().startswith(("http://", "https://"))


def describe_source(x) -> str:
    """Short, log-safe description of an image input: never the payload, never URL query/credentials."""
    if isinstance(x, FetchedImage):
        return shorten(redact_url(x.url))
    if isinstance(x, Image.Image):
        return f"PIL image {x.width}x{x.height} {x.mode}"
    if isinstance(x, (bytes, bytearray, memoryview)):
        return f"bytes ({len(x)} bytes)"
    if isinstance(x, os.PathLike):
        return shorten(os.fspath(x))
    if isinstance(x, str):
        if x[:5].lower() == "data:":
            media = x[5:].split(",", 1)[0].split(";", 1)[0] or "no media type"
            return f"data URI ({shorten(media, 40)}, {len(x)} chars)"
        if x[:7].lower() == "http://" or x[:8].lower() == "https://":
            return shorten(redact_url(x))
        if len(x) > 200 or "\n" in x:  # not a plausible path (e.g. raw base64): do not echo it
            return f"string ({len(x)} chars)"
        return shorten(x)
    return type(x).__name__


def load_images(items, limits: ImageLimits | None = None, *, shrink: ShrinkHint | None = None,
                admit=None) -> list[Image.Image]:
    """Load the images of one request: at most `limits.max_images`, and at most `limits.max_request_pixels`
    decoded pixels together, checked from the headers before any image is decoded; one image is decoded (and
    reduced, see `shrink`) at a time. `admit(pixels)`, when given, is a context manager held while decoding
    (a server uses it to bound the pixels being decoded at once)."""
    limits = limits or ImageLimits()
    items = list(items)
    if len(items) > limits.max_images:
        raise ImageError(f"too many images: {len(items)} > max_images={limits.max_images}")
    fails = [_failure(x, i) for i, x in enumerate(items)]
    opened = [_open(x, limits, fail) for x, fail in zip(items, fails)]
    total = sum(image.width * image.height for image in opened)
    if total > limits.max_request_pixels:
        raise ImageError(f"too many pixels in one request: {len(items)} images of {total} decoded pixels together "
                         f"> max_request_pixels={limits.max_request_pixels} (the per-request budget; send fewer or "
                         "smaller images)")
    images = []
    with admit(total) if admit is not None else contextlib.nullcontext():
        for i in range(len(opened)):
            image, opened[i] = opened[i], None  # nothing keeps the full-size image once it is decoded and reduced
            images.append(_decode(image, fails[i], shrink))
    if total >= TRIM_AFTER_PIXELS:
        release_freed_memory()
    return images


def load_image(x, *, limits: ImageLimits | None = None, index: int | None = None,
               shrink: ShrinkHint | None = None) -> Image.Image:
    """Return an RGB PIL image: EXIF orientation applied, transparency on white, first frame only."""
    limits = limits or ImageLimits()
    fail = _failure(x, index)
    return _decode(_open(x, limits, fail), fail, shrink)


def fetch_image(x: str, *, limits: ImageLimits, index: int | None = None) -> FetchedImage:
    """Download a remote image (refused unless `limits.allow_remote`); decode it later with load_image(s)."""
    fail = _failure(x, index)
    if not limits.allow_remote:
        raise fail(REMOTE_DISABLED)
    return FetchedImage(x, fetch_url(x, limits, fail))


def _failure(x, index):
    source = describe_source(x)
    return lambda reason: ImageError(reason, index=index, source=source)


def _open(x, limits: ImageLimits, fail) -> Image.Image:
    """A PIL image as given, or one whose header only is parsed; the per-image pixel cap checked either way."""
    if isinstance(x, Image.Image):
        _check_pixels(x.width, x.height, limits, fail)
        return x
    if isinstance(x, FetchedImage):
        data = x.data
    elif isinstance(x, (bytes, bytearray, memoryview)):
        data = bytes(x)
    elif isinstance(x, os.PathLike):
        data = _read_file(Path(x), limits, fail)
    elif isinstance(x, str):
        if x[:5].lower() == "data:":
            data = _decode_data_uri(x, limits, fail)
        elif is_remote(x):
            if not limits.allow_remote:
                raise fail(REMOTE_DISABLED)
            data = fetch_url(x, limits, fail)
        else:
            data = _read_file(Path(x), limits, fail)
    else:
        raise fail(f"unsupported input type {type(x).__name__}; expected a PIL image, path, bytes, "
                   "data: URI or http(s) URL")
    return _open_header(data, limits, fail)


# ---------------------------------------------------------------------------------------------- sources

def _read_file(path: Path, limits: ImageLimits, fail) -> bytes:
    if not limits.allow_paths:
        raise fail("local file paths are disabled (ImageLimits.allow_paths=False)")
    try:
        st = path.stat()
    except OSError:
        raise fail("no such file (raw base64 must be passed as bytes or a data: URI)") from None
    if not path.is_file():
        raise fail("not a regular file")
    if st.st_size > limits.max_bytes:
        raise fail(f"file too large: {st.st_size} bytes > max_bytes={limits.max_bytes}")
    try:
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)  # the file may have grown since stat
    except OSError as e:
        raise fail(f"cannot read file: {e.strerror or e}") from None
    return data


def _decode_data_uri(uri: str, limits: ImageLimits, fail) -> bytes:
    meta, sep, payload = uri[5:].partition(",")
    if not sep:
        raise fail("malformed data URI (no comma)")
    if meta.lower().endswith(";base64"):
        # Check the size from the text length first so a huge payload is never decoded.
        if len(payload) * 3 // 4 > limits.max_bytes + 3:
            raise fail(f"data URI payload too large: ~{len(payload) * 3 // 4} bytes > max_bytes={limits.max_bytes}")
        compact = "".join(payload.split())  # base64 in the wild is often line-wrapped
        compact += "=" * (-len(compact) % 4)  # and sometimes unpadded
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            try:  # URL-safe alphabet (some clients use it)
                data = base64.b64decode(compact, altchars=b"-_", validate=True)
            except (binascii.Error, ValueError):
                raise fail("invalid base64 in data URI") from None
    else:
        if len(payload) > 3 * (limits.max_bytes + 1):
            raise fail(f"data URI payload too large (> max_bytes={limits.max_bytes})")
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > limits.max_bytes:
        raise fail(f"data URI payload too large: {len(data)} bytes > max_bytes={limits.max_bytes}")
    return data


# ----------------------------------------------------------------------------------------------- decode

def _available_formats(allowed) -> list[str]:
    Image.init()  # registers all plugins once; cheap afterwards
    return [name for name in (f.upper() for f in allowed) if name in Image.OPEN]


def _check_pixels(width: int, height: int, limits: ImageLimits, fail) -> None:
    if width <= 0 or height <= 0:
        raise fail(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise fail(f"too many pixels: {width}x{height} = {width * height} > max_pixels={limits.max_pixels}")


def _open_header(data: bytes, limits: ImageLimits, fail) -> Image.Image:
    if not data:
        raise fail("empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise fail(f"payload too large: {len(data)} bytes > max_bytes={limits.max_bytes}")
    try:
        # Image.open only parses the header; PIL's own bomb check (MAX_IMAGE_PIXELS, left as the user set
        # it) may already raise here, and ours below does not depend on that global.
        image = Image.open(io.BytesIO(data), formats=_available_formats(limits.allowed_formats))
    except Image.DecompressionBombError as e:
        raise fail(f"too many pixels (decompression bomb): {e}") from None
    except Image.UnidentifiedImageError:
        raise fail(f"not a recognised image (allowed formats: {', '.join(limits.allowed_formats)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise fail(f"cannot decode image header: {e}") from None
    _check_pixels(image.width, image.height, limits, fail)  # BEFORE any pixel data is decoded
    return image


def _decode(image: Image.Image, fail, shrink: ShrinkHint | None) -> Image.Image:
    if not isinstance(image, ImageFile.ImageFile):  # a PIL image the caller decoded
        return _finish(image, fail)
    target = _reduce_target(image, shrink)
    try:
        if target is not None and image.format == "JPEG":
            image.draft(image.mode, target)  # the decoder scales by 1/2..1/8, keeping at least `target`
        image.load()  # first frame only: Image.open leaves animated images on frame 0
        if target is not None:
            image = _reduce(image, target)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise fail(f"corrupt or truncated image data: {e}") from None
    return _finish(image, fail)


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that undoes it (as exif_transpose)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # malformed EXIF: treated as upright, as _finish does
        return 1


def _reduce_target(image: Image.Image, shrink: ShrinkHint | None) -> tuple[int, int] | None:
    """The smallest size (in stored orientation) this image may be decoded/reduced to; None: keep it whole."""
    if shrink is None or image.width * image.height <= EARLY_REDUCE_MIN_PIXELS:
        return None
    swapped = _orientation(image) in (5, 6, 7, 8)  # the preprocessing sees the image after transposing
    hint = shrink(image.height, image.width) if swapped else shrink(image.width, image.height)
    if hint is None:
        return None
    width, height = (hint[1], hint[0]) if swapped else hint
    if image.width // max(1, width) < 2 or image.height // max(1, height) < 2:
        return None
    return max(1, int(width)), max(1, int(height))


def _reduce(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Box-reduce by the largest integer factor that keeps `target`; EXIF orientation applied here."""
    factor = min(image.width // target[0], image.height // target[1])  # < 2 when a JPEG draft did enough
    transpose = _TRANSPOSE.get(_orientation(image))
    if image.mode in ("RGBA", "LA") and "transparency" not in image.info:
        # Premultiplied, so averaging then compositing on white equals compositing then averaging.
        premultiplied = {"RGBA": "RGBa", "LA": "La"}[image.mode]
        image = image.convert(premultiplied).reduce(factor).convert(image.mode) if factor >= 2 else image
    elif image.mode in ("RGB", "L") and "transparency" not in image.info:
        image = image.reduce(factor) if factor >= 2 else image
    else:  # palette, 16-bit, CMYK, colour-keyed transparency: to RGB first
        image = flatten_to_rgb(image)
        image = image.reduce(factor) if factor >= 2 else image
    for key in ("exif", "xmp", "XML:com.adobe.xmp"):  # orientation is applied below, not again by _finish
        image.info.pop(key, None)
    return image.transpose(transpose) if transpose is not None else image


def _finish(image: Image.Image, fail) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)  # a copy, or the same image when there is no orientation
    except Exception:  # malformed EXIF must not make an otherwise fine image unusable
        pass
    try:
        return flatten_to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise fail(f"cannot convert image to RGB: {e}") from None


def flatten_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit/float scaled to 8 bits, CMYK via ICC."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        # Same rule and compositing as transformers' convert_to_rgb, so results match its processors.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK" and image.info.get("icc_profile"):
        converted = _cmyk_with_icc(image)
        if converted is not None:
            return converted
    return image.convert("RGB")


def _high_depth_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and values.max() <= 1.0:  # float images are usually [0, 1]
            values = values * 255.0
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    values = array.astype(np.int64)
    if mode.startswith("I;16") or (values.size and values.max() > 255):  # 16-bit range -> 8-bit, rounded
        return ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
    return np.clip(values, 0, 255).astype(np.uint8)


def _cmyk_with_icc(image: Image.Image) -> Image.Image | None:
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # a broken or unsupported profile: fall back to PIL's plain conversion
        return None
