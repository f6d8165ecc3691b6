"""Decoding and crop/resize with control metadata.

Why: real corpora contain every image mode PIL knows plus broken files, and a training crop that is not
recorded cannot be used for SDXL-style size/crop conditioning. So `decode_image` turns anything decodable
into RGB (white under transparency, 16-bit scaled not clipped, EXIF orientation applied) and raises
`SkipImage(reason)` for the rest; `crop_and_resize` follows ADM's `center_crop_arr` (BOX halving while
the short side >= 2R, then one BICUBIC resize to short side R) and reports the crop box in
ORIGINAL-image pixels, so the control signal does not depend on the resize path.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..control import mirror_box

CROP_POLICIES = ("center", "random", "random-flip")
_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


class SkipImage(Exception):
    """A sample that cannot be used; `reason` is the key counted in report.json's `skipped`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "I" and arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
            scale = 1.0  # an 8-bit image stored as 32-bit ints
        else:
            scale = 255.0 / 65535.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
            or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, key: str, max_pixels: int = 89_478_485) -> Image.Image:
    """Decode encoded bytes to an RGB image or raise SkipImage(empty|not_an_image|truncated|corrupt|
    decompression_bomb). `key` only makes the message useful."""
    if not data:
        raise SkipImage("empty", key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise SkipImage("decompression_bomb", f"{key}: {e}") from None
        except UnidentifiedImageError:
            # A known signature that PIL cannot parse is a cut-off file, anything else is not an image.
            reason = "truncated" if data.startswith(_MAGIC) else "not_an_image"
            raise SkipImage(reason, key) from None
        except Exception as e:  # PIL raises many types on broken headers
            raise SkipImage("corrupt", f"{key}: {type(e).__name__}: {e}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise SkipImage("decompression_bomb", f"{key}: {w}x{h} > {max_pixels} pixels")
        if w == 0 or h == 0:
            raise SkipImage("corrupt", f"{key}: zero-sized image")
        try:
            img.load()
        except OSError as e:
            reason = "truncated" if "truncated" in str(e) or "broken data stream" in str(e) else "corrupt"
            raise SkipImage(reason, f"{key}: {e}") from None
        except Exception as e:
            raise SkipImage("corrupt", f"{key}: {type(e).__name__}: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the stored orientation rather than losing the image
        pass
    return _to_rgb(img)


def _resize_short_side(img: Image.Image, resolution: int) -> Image.Image:
    """ADM center_crop_arr resize: BOX halving while short side >= 2R, then BICUBIC to short side R."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    size = tuple(max(resolution, round(x * scale)) for x in img.size)
    return img.resize(size, resample=Image.BICUBIC)


def crop_and_resize(img: Image.Image, resolution: int, policy: str, rng: np.random.Generator,
                    max_aspect: float = 4.0) -> tuple[Image.Image, dict]:
    """Resize + crop `img` to resolution x resolution; meta has the crop box in original pixels.

    `random` draws the crop offset (y then x) from `rng`; `random-flip` draws the same offset and then
    one flip coin, so for one rng state it returns the `random` crop, mirrored when meta['flip'] == 1 (its
    crop box then mirrored too, as a training-time flip mirrors it: `ldm.control.mirror_box`).
    Images smaller than R are upscaled; aspect ratios above `max_aspect` raise SkipImage('extreme_aspect').
    """
    if policy not in CROP_POLICIES:
        raise ValueError(f"unknown crop policy {policy!r}; expected one of {', '.join(CROP_POLICIES)}")
    ow, oh = img.size
    if max(ow, oh) > max_aspect * min(ow, oh):
        raise SkipImage("extreme_aspect", f"{ow}x{oh} exceeds {max_aspect}:1")
    small = _resize_short_side(img, resolution)
    sw, sh = small.size
    if policy == "center":
        top, left = (sh - resolution) // 2, (sw - resolution) // 2
    else:
        top = int(rng.integers(0, sh - resolution + 1))
        left = int(rng.integers(0, sw - resolution + 1))
    out = small.crop((left, top, left + resolution, top + resolution))
    flip = 0
    if policy == "random-flip" and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
        flip = 1
    # Map the box back: the resize path scales each axis by (resized / original).
    fy, fx = oh / sh, ow / sw
    crop_h = min(oh, round(resolution * fy))
    crop_w = min(ow, round(resolution * fx))
    crop_top = min(oh - crop_h, round(top * fy))
    crop_left = min(ow - crop_w, round(left * fx))
    meta = {"orig_h": oh, "orig_w": ow, "crop_top": crop_top, "crop_left": crop_left,
            "crop_h": crop_h, "crop_w": crop_w, "flip": 0}
    return out, (mirror_box(meta) if flip else meta)
