"""Rendering for the synthetic generator: fonts, shapes, backgrounds, text, charts and augmentations.

Everything here is a pure function of a *scene* dict (see :mod:`.scenes`): the scene carries
every random choice (including the seeds of the background texture and of the pixel noise), so
``render_scene(scene)`` always draws the same pixels on the same machine. Only Pillow and numpy are used.

Fonts: a small set of font *styles* (``FONT_STYLES``) each resolves to the first TrueType file found on the
machine from a list of common names, or to Pillow's built-in scalable font (``ImageFont.load_default(size=)``,
Pillow >= 10.1; older Pillow gets the bitmap font scaled up). The random choice is always of a style, so the
random stream is the same on every machine; only the glyph shapes differ where fonts differ.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# ----------------------------------------------------------------------------------------------- fonts

_FONT_FILES = {
    "sans": ["DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf", "FreeSans.ttf",
             "NotoSans-Regular.ttf", "Roboto-Regular.ttf", "Helvetica.ttc"],
    "sans-bold": ["DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf", "Arial Bold.ttf", "arialbd.ttf",
                  "FreeSansBold.ttf", "NotoSans-Bold.ttf", "Roboto-Bold.ttf"],
    "serif": ["DejaVuSerif.ttf", "LiberationSerif-Regular.ttf", "Times New Roman.ttf", "times.ttf",
              "FreeSerif.ttf", "NotoSerif-Regular.ttf"],
    "serif-bold": ["DejaVuSerif-Bold.ttf", "LiberationSerif-Bold.ttf", "Times New Roman Bold.ttf",
                   "timesbd.ttf", "FreeSerifBold.ttf", "NotoSerif-Bold.ttf"],
    "mono": ["DejaVuSansMono.ttf", "LiberationMono-Regular.ttf", "Courier New.ttf", "cour.ttf",
             "FreeMono.ttf", "NotoSansMono-Regular.ttf"],
    "condensed": ["DejaVuSansCondensed-Bold.ttf", "DejaVuSansCondensed.ttf", "LiberationSansNarrow-Regular.ttf",
                  "arialn.ttf"],
    "italic": ["DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf", "LiberationSans-Italic.ttf", "ariali.ttf",
               "FreeSansOblique.ttf"],
    "default": [],  # Pillow's built-in font
}
FONT_STYLES = tuple(_FONT_FILES)


def _font_dirs() -> list[str]:
    dirs = ["/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"),
            os.path.expanduser("~/.local/share/fonts"), "/Library/Fonts", "/System/Library/Fonts",
            os.path.expanduser("~/Library/Fonts"), os.path.join(os.environ.get("WINDIR", "C:/Windows"), "Fonts")]
    spec = importlib.util.find_spec("matplotlib")  # matplotlib ships DejaVu; use it where installed
    if spec is not None and spec.origin:
        dirs.append(os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf"))
    return [d for d in dirs if os.path.isdir(d)]


@functools.lru_cache(maxsize=1)
def _font_index() -> dict[str, str]:
    found: dict[str, str] = {}
    for root_dir in _font_dirs():
        for root, _, files in os.walk(root_dir):
            for name in files:
                if name.lower().endswith((".ttf", ".otf", ".ttc")):
                    found.setdefault(name, os.path.join(root, name))
    return found


@functools.lru_cache(maxsize=None)
def font_path(style: str) -> str | None:
    """The TrueType file used for a font style on this machine, or None (Pillow's built-in font)."""
    index = _font_index()
    for name in _FONT_FILES[style]:
        if name in index:
            return index[name]
    return None


@functools.lru_cache(maxsize=1024)
def get_font(style: str, size: int):
    """A font of `style` at pixel `size`; never fails (falls back to Pillow's built-in font)."""
    size = max(4, int(size))
    path = font_path(style)
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font; text_mask() scales it
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _text_mask_cached(text: str, style: str, size: int) -> Image.Image:
    font = get_font(style, size)
    x0, y0, x1, y1 = font.getbbox(text)
    pad = 2
    mask = Image.new("L", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), 0)
    ImageDraw.Draw(mask).text((pad - x0, pad - y0), text, fill=255, font=font)
    if not isinstance(font, ImageFont.FreeTypeFont):  # bitmap fallback: scale to the requested size
        scale = size / 11.0
        mask = mask.resize((max(1, round(mask.width * scale)), max(1, round(mask.height * scale))),
                           Image.BILINEAR)
    return mask


def text_mask(text: str, style: str, size: int, angle: float = 0.0) -> Image.Image:
    """An 'L' mask of `text`, tightly cropped (2 px pad), rotated by `angle` degrees (counter-clockwise)."""
    mask = _text_mask_cached(text, style, max(4, int(size)))
    if angle:
        mask = mask.rotate(angle, resample=Image.BICUBIC, expand=True)
    return mask


def text_size(text: str, style: str, size: int, angle: float = 0.0) -> tuple[int, int]:
    """(width, height) in pixels of the rotated text box."""
    w, h = _text_mask_cached(text, style, max(4, int(size))).size
    if angle:
        a = math.radians(angle)
        c, s = abs(math.cos(a)), abs(math.sin(a))
        return int(math.ceil(w * c + h * s)), int(math.ceil(w * s + h * c))
    return w, h


def draw_text(img: Image.Image, text: str, style: str, size: int, fill, xy, anchor: str = "mm",
              angle: float = 0.0) -> tuple[int, int, int, int]:
    """Draw `text` so that its box's `anchor` point (l/m/r x t/m/b) is at `xy`; returns the box."""
    mask = text_mask(text, style, size, angle)
    w, h = mask.size
    x, y = xy
    x0 = x - {"l": 0, "m": w / 2, "r": w}[anchor[0]]
    y0 = y - {"t": 0, "m": h / 2, "b": h}[anchor[1]]
    x0, y0 = int(round(x0)), int(round(y0))
    img.paste(tuple(int(v) for v in fill), (x0, y0, x0 + w, y0 + h), mask)
    return x0, y0, x0 + w, y0 + h


# ---------------------------------------------------------------------------------------------- shapes

def _regular(n: int, radius: float = 1.0, start: float = -90.0) -> np.ndarray:
    t = np.radians(start + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    outer = _regular(points)
    inn = _regular(points, inner, -90.0 + 180.0 / points)
    return np.stack([outer, inn], 1).reshape(-1, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max() * 0.95


def _cross(w: float = 0.32, l: float = 0.9) -> np.ndarray:
    return np.array([(-w, -l), (w, -l), (w, -w), (l, -w), (l, w), (w, w), (w, l), (-w, l), (-w, w), (-l, w),
                     (-l, -w), (-w, -w)], float)


def _triangle() -> np.ndarray:
    pts = _regular(3)
    pts[:, 1] -= (pts[:, 1].max() + pts[:, 1].min()) / 2  # centre the bounding box
    return pts * 1.08

# Unit outlines (fit in the unit circle); circle is drawn as an ellipse.
SHAPE_POLYGONS = {
    "square": np.array([(-0.74, -0.74), (0.74, -0.74), (0.74, 0.74), (-0.74, 0.74)]),
    "triangle": _triangle(),
    "star": _star(),
    "hexagon": _regular(6, 0.95, 0.0),
    "diamond": np.array([(0.0, -1.0), (0.64, 0.0), (0.0, 1.0), (-0.64, 0.0)]),
    "cross": _cross(),
    "heart": _heart(),
}


def shape_points(shape: str, x: float, y: float, r: float, angle: float = 0.0) -> list[tuple[float, float]]:
    pts = SHAPE_POLYGONS[shape]
    if angle:
        a = math.radians(angle)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = pts @ rot.T
    pts = pts * r + (x, y)
    return [tuple(p) for p in pts.tolist()]


def draw_shape(draw: ImageDraw.ImageDraw, obj: dict, scale: float = 1.0) -> None:
    x, y, r = obj["x"] * scale, obj["y"] * scale, obj["r"] * scale
    fill = tuple(obj["rgb"])
    outline = tuple(obj["outline"]) if obj.get("outline") else None
    width = max(1, int(round(r * 0.08))) if outline else 0
    if obj["shape"] == "circle":
        rr = r * 0.92
        draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=fill, outline=outline, width=width)
    else:
        draw.polygon(shape_points(obj["shape"], x, y, r, obj.get("angle", 0.0)), fill=fill, outline=outline,
                     width=width)


# ----------------------------------------------------------------------------------------- backgrounds

def render_background(bg: dict, w: int, h: int) -> Image.Image:
    kind, colors = bg["kind"], [tuple(int(v) for v in c) for c in bg["colors"]]
    if kind == "flat":
        return Image.new("RGB", (w, h), colors[0])
    if kind == "gradient":
        c1, c2 = np.array(colors[0], np.float32), np.array(colors[1], np.float32)
        d = bg["direction"]
        if d == "horizontal":
            t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
        elif d == "vertical":
            t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        else:
            t = (np.linspace(0, 0.5, w, dtype=np.float32)[None, :, None]
                 + np.linspace(0, 0.5, h, dtype=np.float32)[:, None, None])
        arr = c1 + (c2 - c1) * t
        return Image.fromarray(np.broadcast_to(arr, (h, w, 3)).astype(np.uint8), "RGB")
    if kind == "texture":
        rng = np.random.default_rng(bg["seed"])
        cells = bg["cells"]
        small = rng.uniform(-1, 1, (cells, cells, 1 if bg.get("mono", True) else 3)).astype(np.float32)
        small = np.broadcast_to(small, (cells, cells, 3))
        base = np.array(colors[0], np.float32)
        arr = np.clip(base + small * bg["amplitude"], 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "RGB").resize((w, h), Image.BICUBIC)
    if kind == "pattern":  # stripes or checks in two close tones
        img = Image.new("RGB", (w, h), colors[0])
        draw = ImageDraw.Draw(img)
        step = max(4, int(bg["period"] * min(w, h)))
        if bg["pattern"] == "stripes":
            for x in range(-h, w, 2 * step):  # diagonal stripes
                draw.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=colors[1])
        else:
            for j, y in enumerate(range(0, h, step)):
                for i, x in enumerate(range(0, w, step)):
                    if (i + j) % 2:
                        draw.rectangle((x, y, x + step - 1, y + step - 1), fill=colors[1])
        return img
    raise ValueError(f"unknown background kind {kind!r}")


# ---------------------------------------------------------------------------------------------- charts

def _fit_font(labels, style, size, max_w) -> int:
    """Largest font size <= size at which every label is at most max_w wide."""
    size = int(size)
    while size > 6 and max(text_size(lbl, style, size)[0] for lbl in labels) > max_w:
        size = int(size * 0.88)
    return max(6, size)


def draw_chart(img: Image.Image, chart: dict, scale: float = 1.0) -> None:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    fg = tuple(chart["fg"])
    style = chart["font"]
    labels, values = chart["labels"], chart["values"]
    n = len(labels)
    top = 0.04 * h
    base_fs = chart["font_scale"] * min(w, h)
    if chart.get("title"):
        fs = _fit_font([chart["title"]], style, base_fs * 1.15, 0.9 * w)
        draw_text(img, chart["title"], style, fs, fg, (w / 2, top), "mt")
        top += text_size(chart["title"], style, fs)[1] + 0.02 * h
    value_txt = [f"{v}%" if chart["kind"] == "pie" else str(v) for v in values]
    if chart["kind"] == "bar":
        left, right, bottom = 0.08 * w, w - 0.04 * w, h - 0.05 * h
        slot = (right - left) / n
        fs = _fit_font(labels + value_txt, style, base_fs, 0.95 * slot)
        lab_h = text_size("Agy", style, fs)[1]
        axis_y = bottom - lab_h - 0.02 * h
        plot_top = top + lab_h + 0.03 * h
        vmax = max(values) * 1.05
        draw.line((left, axis_y, right, axis_y), fill=fg, width=max(1, int(2 * scale)))
        draw.line((left, plot_top, left, axis_y), fill=fg, width=max(1, int(2 * scale)))
        for i, (lbl, v, vt) in enumerate(zip(labels, values, value_txt)):
            cx = left + slot * (i + 0.5)
            bw = slot * chart["bar_width"] / 2
            y = axis_y - (axis_y - plot_top) * v / vmax
            draw.rectangle((cx - bw, min(y, axis_y - 1), cx + bw, axis_y - 1), fill=tuple(chart["colors"][i]))
            draw_text(img, vt, style, fs, fg, (cx, y - 0.01 * h), "mb")
            draw_text(img, lbl, style, fs, fg, (cx, axis_y + 0.015 * h), "mt")
    elif chart["kind"] == "hbar":
        bottom = h - 0.04 * h
        slot = (bottom - top) / n
        fs = _fit_font(labels, style, min(base_fs, 0.6 * slot), 0.3 * w)
        lab_w = max(text_size(lbl, style, fs)[0] for lbl in labels)
        val_w = max(text_size(vt, style, fs)[0] for vt in value_txt)
        axis_x = 0.03 * w + lab_w + 0.02 * w
        right = w - 0.03 * w - val_w - 0.015 * w
        vmax = max(values)
        draw.line((axis_x, top, axis_x, bottom), fill=fg, width=max(1, int(2 * scale)))
        for i, (lbl, v, vt) in enumerate(zip(labels, values, value_txt)):
            cy = top + slot * (i + 0.5)
            bh = slot * chart["bar_width"] / 2
            x = axis_x + (right - axis_x) * v / vmax
            draw.rectangle((axis_x + 1, cy - bh, max(x, axis_x + 1), cy + bh), fill=tuple(chart["colors"][i]))
            draw_text(img, lbl, style, fs, fg, (axis_x - 0.015 * w, cy), "rm")
            draw_text(img, vt, style, fs, fg, (x + 0.012 * w, cy), "lm")
    else:  # pie: labels outside, percentages inside
        fs = int(base_fs)
        fs = _fit_font(labels, style, fs, 0.28 * w)
        lab_w = max(text_size(lbl, style, fs)[0] for lbl in labels)
        lab_h = text_size("Agy", style, fs)[1]
        radius = min((w - 2 * lab_w - 0.1 * w) / 2, (h - top - 2 * lab_h - 0.06 * h) / 2)
        radius = max(radius, 0.18 * min(w, h))
        cx, cy = w / 2, top + lab_h + 0.03 * h + radius
        start = chart["start_angle"]
        for i, (lbl, v, vt) in enumerate(zip(labels, values, value_txt)):
            end = start + 360.0 * v / 100.0
            col = tuple(chart["colors"][i])
            draw.pieslice((cx - radius, cy - radius, cx + radius, cy + radius), start, end, fill=col,
                          outline=tuple(chart["bg_rgb"]), width=max(1, int(2 * scale)))
            mid = math.radians((start + end) / 2)
            ca, sa = math.cos(mid), math.sin(mid)
            lum = 0.299 * col[0] + 0.587 * col[1] + 0.114 * col[2]
            inner = (20, 20, 20) if lum > 140 else (250, 250, 250)
            pfs = _fit_font([vt], style, fs, 0.9 * radius * max(0.35, math.radians(end - start)))
            draw_text(img, vt, style, pfs, inner, (cx + 0.62 * radius * ca, cy + 0.62 * radius * sa), "mm")
            lx, ly = cx + (radius + 0.03 * w) * ca, cy + (radius + 0.03 * h) * sa
            anchor = ("l" if ca > 0.3 else "r" if ca < -0.3 else "m") + ("t" if sa > 0.3 else "b" if sa < -0.3 else "m")
            draw_text(img, lbl, style, fs, fg, (lx, ly), anchor)
            start = end


# ----------------------------------------------------------------------------------------- the scene

@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((521, 521, 3)).astype(np.float32)


def _noise(seed: int, h: int, w: int) -> np.ndarray:
    bank = _noise_bank()
    rng = np.random.default_rng(seed)
    if h > bank.shape[0] or w > bank.shape[1]:
        reps = (math.ceil(h / bank.shape[0]) + 1, math.ceil(w / bank.shape[1]) + 1, 1)
        bank = np.tile(bank, reps)
    y0 = int(rng.integers(0, bank.shape[0] - h + 1))
    x0 = int(rng.integers(0, bank.shape[1] - w + 1))
    return bank[y0:y0 + h, x0:x0 + w]


def _draw_content(img: Image.Image, scene: dict, scale: float) -> None:
    draw = ImageDraw.Draw(img)
    for obj in scene.get("objects", ()):
        draw_shape(draw, obj, scale)
    for t in scene.get("texts", ()):
        draw_text(img, t["rendered"], t["font"], t["size"] * scale, t["rgb"], (t["x"] * scale, t["y"] * scale),
                  "mm", t.get("angle", 0.0))
    if scene.get("chart"):
        draw_chart(img, scene["chart"], scale)


def render_scene(scene: dict) -> Image.Image:
    """Draw a scene dict and apply its augmentations; returns an RGB image of (width, height)."""
    w, h = scene["width"], scene["height"]
    aug = scene.get("aug", {})
    scale = aug.get("draw_scale", 1.0)
    dw, dh = max(8, int(round(w * scale))), max(8, int(round(h * scale)))
    img = render_background(scene["background"], dw, dh)
    _draw_content(img, scene, dw / w)
    if (dw, dh) != (w, h):
        img = img.resize((w, h), Image.BOX if dw > w else Image.BILINEAR)
    if aug.get("blur"):
        img = img.filter(ImageFilter.GaussianBlur(aug["blur"]))
    if aug.get("noise"):
        arr = np.asarray(img, dtype=np.float32) + _noise(aug["noise_seed"], h, w) * aug["noise"]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if aug.get("jpeg"):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(aug["jpeg"]))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img
