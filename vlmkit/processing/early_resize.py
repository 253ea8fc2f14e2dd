"""How small a very large image may be decoded before a family's preprocessing sees it.

Every family resizes an image to a size it computes from the image's own size (CLIP: shortest edge, then a crop;
IDEFICS: a fixed square; Idefics2: longest edge capped, quadrants at twice that when splitting; Idefics3: longest
edge). Decoding a 6000x6000 image at full size only to resize it to a few hundred pixels wastes ~100 MB per image,
so the loader may reduce it first, down to MARGIN times that output size. `images.load_images` applies the hint
only to images over EARLY_REDUCE_MIN_PIXELS, so images of ordinary size keep pixel values equal to transformers'.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from .image_ops import generic_output_size
from .image_processors import ClipImageSettings, IdeficsImageSettings
from .image_tiling import Idefics2ImageSettings, Idefics3ImageSettings, idefics2_output_size, idefics3_first_resize

__all__ = ["MARGIN", "shrink_hint_for"]

MARGIN = 3  # the family's own (antialiased) resize still shrinks at least 3x, so the early box reduce barely shows


def shrink_hint_for(image_processor) -> Optional[Callable[[int, int], tuple[int, int]]]:
    """(width, height) -> the smallest (width, height) an image may be reduced to before `image_processor`;
    None when the family does not resize (then images are kept whole)."""
    s = getattr(image_processor, "settings", None)
    if s is None or not s.do_resize:
        return None
    if isinstance(s, Idefics3ImageSettings):
        def output_size(h, w):
            return idefics3_first_resize(h, w, s.size)
    elif isinstance(s, Idefics2ImageSettings):
        crops_across = 2 if s.do_image_splitting else 1  # each quadrant gets the full output size

        def output_size(h, w):
            oh, ow = idefics2_output_size(h, w, s.size)
            return crops_across * oh, crops_across * ow
    elif isinstance(s, (ClipImageSettings, IdeficsImageSettings)):
        def output_size(h, w):
            return generic_output_size(h, w, s.size)
    else:
        return None

    def hint(width: int, height: int) -> tuple[int, int]:
        out_h, out_w = output_size(height, width)
        return math.ceil(MARGIN * out_w), math.ceil(MARGIN * out_h)

    return hint
