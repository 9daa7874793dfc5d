"""Multi-crop views for DINO (Caron et al. 2021 §3.1; augmentations of appendix D / the official code).

Each image gives 2 *global* views (random resized crops covering 40-100% of the image, at the
model's resolution) and N *local* views (5-40%, at a smaller resolution), each flipped at
random, colour-jittered (p 0.8), turned grey (p 0.2), Gaussian-blurred (p 1.0 for the first
global view, 0.1 for the second, 0.5 for the local ones) and, for the second global view,
solarised (p 0.2) — BYOL's augmentations, as the paper uses them.

Sized for small images (the paper's 224 / 96 px ratio, rounded to whole 4-pixel patches):

    image  global views  local views
    28 px  28 px         12 px   (3x3 patches of a patch-4 ViT)
    32 px  32 px         16 px   (4x4 patches)

The blur's σ range (0.1-2.0 px at 224 px) scales with the view's size, so a 28 px view is
blurred as its 224 px counterpart would be.

The views are made on the whole batch at once, in ``MultiCropCollate`` (one ``grid_sample`` for
the crops and flips of a view, tensor arithmetic for the colour), because per-image PIL work
would cost more than the tiny ViT's step. Departures, each for small tensors on a CPU:
bilinear instead of bicubic resampling; the jitter's four changes in a fixed order (torchvision
draws the order at random); hue is a rotation of the YIQ chroma plane (torchvision goes through
HSV); on one-channel images saturation, hue and greyscale do nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cvformers.config import ConfigError


@dataclass
class MultiCropConfig:
    """The ``[crops]`` table of a dino run."""

    global_size: int = 0  # side of the 2 global views in pixels (0: the model's image size)
    local_size: int = 0  # side of the local views (0: 12 px for 28 px images, 16 px for 32 px; 3/7 of the size otherwise)
    local_crops: int = 6  # N, the number of local views (paper: 6 or 10 for ViT-S/16, §5.3 / Table 8)
    global_scale: tuple[float, float] = (0.4, 1.0)  # area range of a global crop, as a fraction of the image (official code)
    local_scale: tuple[float, float] = (0.05, 0.4)  # area range of a local crop
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)  # aspect-ratio range of a crop (torchvision's RandomResizedCrop)
    flip: float = 0.5  # probability of a horizontal flip
    jitter: float = 0.8  # probability of colour jitter
    brightness: float = 0.4  # jitter strengths, as torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1)
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2  # probability of turning the view grey
    blur: tuple[float, float, float] = (1.0, 0.1, 0.5)  # blur probability: first global, second global, local views
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # σ range in pixels of a 224 px view (scaled to the view's size)
    solarize: float = 0.2  # probability of solarising the second global view

    def __post_init__(self) -> None:
        if self.local_crops < 0 or self.global_size < 0 or self.local_size < 0:
            raise ConfigError("crops.local_crops, crops.global_size and crops.local_size must be >= 0")
        for name in ("global_scale", "local_scale", "blur_sigma", "ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"crops.{name} must be two numbers 0 < low <= high, got {getattr(self, name)}")
        for name in ("global_scale", "local_scale"):
            if getattr(self, name)[1] > 1:
                raise ConfigError(f"crops.{name}: an area fraction above 1 is no crop, got {getattr(self, name)}")
        for name in ("flip", "jitter", "grayscale", "solarize", *()):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"crops.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not all(0 <= p <= 1 for p in self.blur):
            raise ConfigError(f"crops.blur holds probabilities in [0, 1], got {self.blur}")

    def sizes(self, image_size: int, multiple_of: int = 4) -> tuple[int, int]:
        """(global, local) view sides for images of ``image_size`` px."""
        g = self.global_size or image_size
        if self.local_size:
            local = self.local_size
        elif image_size == 28:
            local = 12
        elif image_size == 32:
            local = 16
        else:  # the paper's 96 / 224, to whole patches
            local = max(multiple_of, round(image_size * 96 / 224 / multiple_of) * multiple_of)
        return g, local


def random_resized_crop(images: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        flip: float) -> torch.Tensor:
    """Each image of [B, C, H, W]: a crop of a random area fraction in ``scale`` and aspect ratio in
    ``ratio``, at a random place, flipped with probability ``flip``, resampled to size x size."""
    b = images.shape[0]
    area = torch.empty(b).uniform_(*scale)
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the image's width and height
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(b) * (1 - w) + w / 2) * 2 - 1  # centre in [-1, 1] coordinates, crop inside the image
    cy = (torch.rand(b) * (1 - h) + h / 2) * 2 - 1
    sign = torch.where(torch.rand(b) < flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(images), [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma
    return (images * weights).sum(dim=1, keepdim=True)


def _pick(p: float, b: int) -> torch.Tensor:
    """[B, 1, 1, 1] mask of the images an augmentation with probability ``p`` applies to."""
    return (torch.rand(b) < p).view(b, 1, 1, 1)


def color_jitter(images: torch.Tensor, cfg: MultiCropConfig) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (each factor uniform in [1 - s, 1 + s]; hue a shift in
    [-h, h] turns), applied to a fraction ``cfg.jitter`` of the images."""
    b = images.shape[0]
    u = lambda s: torch.empty(b, 1, 1, 1).uniform_(1 - s, 1 + s).to(images)  # noqa: E731
    out = (images * u(cfg.brightness)).clamp(0, 1)
    mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * u(cfg.contrast) + mean).clamp(0, 1)
    if images.shape[1] == 3:
        gray = _gray(out)
        out = ((out - gray) * u(cfg.saturation) + gray).clamp(0, 1)
        angle = torch.empty(b).uniform_(-cfg.hue, cfg.hue) * 2 * math.pi
        to_yiq = out.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        yiq = torch.einsum("ij,bjhw->bihw", to_yiq, out)
        cos, sin = angle.cos().view(b, 1, 1).to(out), angle.sin().view(b, 1, 1).to(out)
        i, q = yiq[:, 1], yiq[:, 2]
        yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
        out = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)
    return torch.where(_pick(cfg.jitter, b).to(images.device), out, images)


def gaussian_blur(images: torch.Tensor, p: float, sigma: tuple[float, float]) -> torch.Tensor:
    """Blur a fraction ``p`` of the images with σ uniform in ``sigma`` (pixels), separable kernels."""
    b, c, h, w = images.shape
    s = torch.empty(b).uniform_(*sigma)
    radius = max(1, math.ceil(3 * sigma[1]))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x[None] / s[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images)  # [B, k]
    k = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel), as groups
    flat = images.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b * c)
    return torch.where(_pick(p, b).to(images.device), flat.reshape(b, c, h, w), images)


def solarize(images: torch.Tensor, p: float) -> torch.Tensor:
    """Invert the pixels at or above 0.5 in a fraction ``p`` of the images."""
    out = torch.where(images >= 0.5, 1.0 - images, images)
    return torch.where(_pick(p, images.shape[0]).to(images.device), out, images)


def make_views(images: torch.Tensor, cfg: MultiCropConfig, global_size: int, local_size: int) -> list[torch.Tensor]:
    """[B, C, H, W] in [0, 1] -> [global 1, global 2, local 1 .. local N], each [B, C, s, s]."""
    b = images.shape[0]
    views = []
    for v in range(2 + cfg.local_crops):
        is_global = v < 2
        size = global_size if is_global else local_size
        x = random_resized_crop(images, size, cfg.global_scale if is_global else cfg.local_scale, cfg.ratio, cfg.flip)
        x = color_jitter(x, cfg)
        if x.shape[1] == 3 and cfg.grayscale > 0:
            x = torch.where(_pick(cfg.grayscale, b).to(x.device), _gray(x).expand_as(x), x)
        blur_p = cfg.blur[min(v, 2)]
        if blur_p > 0:
            lo, hi = cfg.blur_sigma
            x = gaussian_blur(x, blur_p, (lo * size / 224, hi * size / 224))
        if v == 1 and cfg.solarize > 0:
            x = solarize(x, cfg.solarize)
        views.append(x.contiguous())
    return views


class MultiCropCollate:
    """A collate function: stack the items as ``cvformers.data.collate`` does, then add
    ``batch["crops"]``, the multi-crop views of the batch's images."""

    def __init__(self, cfg: MultiCropConfig, image_size: int, patch_size: int = 4):
        self.cfg = cfg
        self.global_size, self.local_size = cfg.sizes(image_size, patch_size)
        for name, size in (("global", self.global_size), ("local", self.local_size)):
            if size % patch_size:
                raise ConfigError(f"crops: the {name} views' side {size} is not a multiple of the patch size {patch_size}")

    def __call__(self, items: list[dict]) -> dict:
        from cvformers.data import collate

        batch = collate(items)
        batch["crops"] = make_views(batch["image"], self.cfg, self.global_size, self.local_size)
        return batch
