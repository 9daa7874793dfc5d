"""Image files <-> tensors, in one place.

Inside the library an image is a float tensor in [0, 1], ``[C, H, W]`` (a batch ``[B, C, H, W]``).
Files become tensors here, by one rule: **the shorter side is scaled to the model's size
(bicubic, antialiased) and the centred square is cut** — CLIP's preprocessing, used for training
folders, zero-shot images, image prompts and attention pictures alike. Transparent pixels are
composited onto white (clip art and emoji are drawn on transparency). Tensors that are already
images are only resized (``fit_images``), never cropped.
"""

from __future__ import annotations

import math
from io import BytesIO
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from cvformers.errors import UserError
from cvformers.utils import atomic_write_bytes, write_target

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_image(path: str | Path, channels: int = 3):
    """An image file -> PIL image in RGB (``channels`` 3) or L (1), transparency composited onto white.

    A missing or undecodable file is a ``UserError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    return _open_rgb(path, str(path), channels)


def read_image_bytes(data: bytes, channels: int = 3, name: str = "image"):
    """Encoded image bytes (a PNG or JPEG member of a tar shard) -> PIL image, as ``read_image``."""
    return _open_rgb(BytesIO(data), name, channels)


def _open_rgb(source: Any, name: str, channels: int):
    from PIL import Image

    try:
        with Image.open(source) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im).convert("RGB")
            else:
                im = im.convert("RGB")
    except Exception as e:  # PIL raises many types for a bad file (OSError, SyntaxError, struct.error, ...)
        raise UserError(f"cannot read image {name}: {type(e).__name__}: {e}") from e
    return im if channels == 3 else im.convert("L")


def png_bytes(image: torch.Tensor) -> bytes:
    """[C,H,W] float in [0,1] -> PNG file bytes (for a tar shard member)."""
    buf = BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def resize_center_crop(im, size: int):
    """Scale a PIL image so the shorter side is ``size`` (bicubic, antialiased), then cut the centred square."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def pil_to_tensor(im) -> torch.Tensor:
    """PIL image (RGB or L) -> [C, H, W] float in [0, 1]."""
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, -1)
    return x.permute(2, 0, 1).float().div_(255.0)


def load_image(image: Any, size: int, channels: int = 3) -> torch.Tensor:
    """A path, a PIL image or a [C, H, W] tensor in [0, 1] -> [channels, size, size] in [0, 1]."""
    if isinstance(image, torch.Tensor):
        x = fit_images(image.float()[None] if image.dim() == 3 else image.float(), size)[0]
        return x[:channels] if x.shape[0] >= channels else x.expand(channels, -1, -1)
    if isinstance(image, (str, Path)):
        image = read_image(image, channels)
    else:
        image = image.convert("RGB" if channels == 3 else "L")
    return pil_to_tensor(resize_center_crop(image, size))


def load_images(paths: Sequence[str | Path], size: int, channels: int = 3) -> torch.Tensor:
    """Image files -> [B, channels, size, size]; an unreadable file is a ``UserError`` naming it."""
    if not paths:
        raise UserError("no images given")
    return torch.stack([load_image(Path(p), size, channels) for p in paths])


def fit_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """A [B, C, H, W] tensor in [0, 1] at ``size`` x ``size`` (bicubic, antialiased; no crop)."""
    if images.ndim != 4:
        raise UserError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
    return images


# --- tensors -> files ---------------------------------------------------------------------


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """[B,C,H,W] in [0,1] -> one [C, H', W'] grid image with ``pad`` pixels of ``pad_value`` between."""
    b, c, h, w = images.shape
    nrow = max(1, min(nrow, b))
    ncol = (b + nrow - 1) // nrow
    grid = images.new_full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), pad_value)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def to_pil(image: torch.Tensor):
    """[C,H,W] float in [0,1] -> PIL image (RGB or L)."""
    from PIL import Image

    arr = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), mode="L")
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def upscale(images: torch.Tensor, min_side: int) -> torch.Tensor:
    """Repeat pixels (nearest neighbour, an integer factor) until a side is at least ``min_side``:
    a 32-pixel sample stays crisp at a size one can see."""
    factor = max(1, math.ceil(min_side / images.shape[-1]))
    return images.repeat_interleave(factor, -2).repeat_interleave(factor, -1) if factor > 1 else images


def picture(images: torch.Tensor, min_tile: int = 128, nrow: int | None = None) -> torch.Tensor:
    """What a user looks at: one image alone, or a grid with white gutters, each image enlarged by
    whole pixels to ``min_tile`` (0: as sampled). ``nrow`` defaults to 4 up to 16 images, else √n."""
    n = len(images)
    tiles = upscale(images, min_tile) if min_tile else images
    if n == 1:
        return tiles[0]
    nrow = nrow or (min(n, 4) if n <= 16 else math.ceil(math.sqrt(n)))
    return image_grid(tiles, nrow=nrow, pad=max(2, tiles.shape[-1] // 32), pad_value=1.0)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_image(image: torch.Tensor, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save a [C,H,W] image atomically in the format its suffix names (.png, .jpg/.jpeg, .webp);
    ``metadata`` goes into PNG text chunks or a JPEG comment. Another suffix is a ``UserError``."""
    import json

    write_target(path)  # a folder or a device is refused as such, whatever its name
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"cannot write {path}: the suffix says no image format; use .png, .jpg or .webp")
    if fmt == "PNG":
        return save_png(image, path, metadata)
    buf = BytesIO()
    extra = {"comment": json.dumps(metadata).encode()} if fmt == "JPEG" and metadata else {}
    to_pil(image).save(buf, format=fmt, quality=95, **extra)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def save_png(image: torch.Tensor, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save a [C,H,W] image as PNG atomically, with optional text chunks (e.g. the prompt)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, v)
    buf = BytesIO()
    to_pil(image).save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


# --- sheets with words: captions and class names beside the pictures -----------------------

LABEL_FONT_SIZE = 11  # pixels; PIL's default font, so no font file is needed anywhere


def label_font(size: int = LABEL_FONT_SIZE):
    """PIL's built-in font at ``size`` px (Pillow >= 10.1 scales it; older Pillow has one bitmap size)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def wrap_text(text: str, width: int, font) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels at word boundaries (a word wider
    than that keeps a line of its own); newlines in ``text`` are kept."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            longer = f"{line} {word}" if line else word
            if line and font.getlength(longer) > width:
                lines.append(line)
                line = word
            else:
                line = longer
        lines.append(line)
    return lines


def labelled_grid(images: torch.Tensor, nrow: int, *, min_tile: int = 0, row_labels: Sequence[str] | None = None,
                  tile_labels: Sequence[str] | None = None, label_width: int = 160,
                  font_size: int = LABEL_FONT_SIZE) -> torch.Tensor:
    """A grid like ``picture``'s with words on it -> [3, H', W'] in [0, 1].

    ``row_labels`` (one per grid row: the caption or class a row was drawn from) are written in a
    column ``label_width`` px wide left of the rows; ``tile_labels`` (one per image: a caption, a
    verdict; "" for none) under each image, wrapped to its width. Images are enlarged by whole
    pixels to ``min_tile`` (0: as they are) so that the words have room beside them.
    """
    from PIL import Image, ImageDraw

    b = len(images)
    nrow = max(1, min(nrow, b))
    rows = math.ceil(b / nrow)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    if tile_labels is not None and len(tile_labels) != b:
        raise ValueError(f"{len(tile_labels)} tile labels for {b} images")
    tiles = upscale(images, min_tile) if min_tile else images
    tiles = tiles.expand(-1, 3, -1, -1) if tiles.shape[1] == 1 else tiles
    h, w = tiles.shape[-2:]
    pad = max(2, w // 32)
    font = label_font(font_size)
    line_h = font_size + 3
    wrapped = [wrap_text(t, w, font) if t else [] for t in (tile_labels or [""] * b)]
    # each grid row's strip is as tall as its longest wrapped label, so an unlabelled row has none
    under = [max(len(x) for x in wrapped[r * nrow:(r + 1) * nrow]) * line_h for r in range(rows)]
    tops = [pad + sum(h + u + pad for u in under[:r]) for r in range(rows)]
    left = label_width + pad if row_labels is not None else 0
    canvas = Image.new("RGB", (left + nrow * (w + pad) + pad, tops[-1] + h + under[-1] + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        r, c = divmod(i, nrow)
        x, y = left + pad + c * (w + pad), tops[r]
        canvas.paste(to_pil(tiles[i]), (x, y))
        for k, line in enumerate(wrapped[i]):
            draw.text((x, y + h + k * line_h + 1), line, fill="black", font=font)
    for r, label in enumerate(row_labels or []):
        lines = wrap_text(label, label_width - pad, font)
        y = tops[r] + max(0, (h - len(lines) * line_h) // 2)  # centred on the row's images
        for k, line in enumerate(lines):
            draw.text((pad, y + k * line_h), line, fill="black", font=font)
    return pil_to_tensor(canvas)
