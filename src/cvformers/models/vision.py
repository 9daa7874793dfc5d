"""The vision backbones by name: families, presets, ``create_model`` and ``list_models`` (timm's names).

A *family* is an architecture (config dataclass + module): vit, mixer, convmixer, swin and the
two hybrids. A *preset* is a named set of config values, e.g. ``vit_tiny_patch16_224`` (the
paper's / timm's sizes) or ``vit_tiny_patch4_28`` (small images: 28 px grayscale, 7×7 patches
of 4×4). ``create_model(name, **overrides)`` builds the bare backbone, timm-style (its
state-dict keys are the family's documented ones); ``list_models("vit_*")`` lists preset names.
Loading a checkpoint into it (``checkpoint_path``) is ``cvformers.create_model``, in
``loading.py``, which reads weight files and run folders.

The trainable model of a run folder is ``ImageClassifier`` (model kind ``"classifier"``): a
backbone under the attribute ``backbone`` plus what training needs — input normalisation, the
small-image augmentation, label smoothing and mixup inside ``loss(batch)``. Its ``[model]``
table names the family and holds the family's config table, so the run rebuilds from TOML.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cvformers.config import ConfigError, from_dict, to_dict
from cvformers.registry import register_kind
from cvformers.errors import UserError
from cvformers.models.convmixer import ConvMixer, ConvMixerConfig
from cvformers.models.hybrid import ConvMixerMixer, ConvMixerMixerConfig, MixerAttention, MixerAttentionConfig
from cvformers.models.mixer import MixerConfig, MlpMixer
from cvformers.models.swin import SwinConfig, SwinTransformer
from cvformers.models.vit import ViTConfig, VisionTransformer
from cvformers.nn.layers import count_parameters

# family name -> (config class, module class)
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "vit": (ViTConfig, VisionTransformer),
    "mixer": (MixerConfig, MlpMixer),
    "convmixer": (ConvMixerConfig, ConvMixer),
    "swin": (SwinConfig, SwinTransformer),
    "mixer_attention": (MixerAttentionConfig, MixerAttention),
    "convmixer_mixer": (ConvMixerMixerConfig, ConvMixerMixer),
}

_SMALL = {"image_size": 28, "in_chans": 1, "num_classes": 10}  # MNIST / Fashion-MNIST
_SMALL32 = {"image_size": 32, "in_chans": 3, "num_classes": 10}  # CIFAR-sized / shapes
_IMAGENET = {"image_size": 224, "in_chans": 3, "num_classes": 1000}


def _vit(dim: int, depth: int, heads: int, patch: int, base: dict, **kw) -> tuple[str, dict]:
    return "vit", {**base, "patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads, **kw}


def _mixer(dim: int, depth: int, ds: int, dc: int, patch: int, base: dict) -> tuple[str, dict]:
    return "mixer", {**base, "patch_size": patch, "embed_dim": dim, "depth": depth,
                     "tokens_mlp_dim": ds, "channels_mlp_dim": dc}


def _convmixer(dim: int, depth: int, patch: int, kernel: int, base: dict, act: str = "gelu") -> tuple[str, dict]:
    return "convmixer", {**base, "patch_size": patch, "dim": dim, "depth": depth, "kernel_size": kernel, "activation": act}


def _swin(dim: int, depths: tuple, heads: tuple, patch: int, window: int, base: dict, drop_path: float) -> tuple[str, dict]:
    return "swin", {**base, "patch_size": patch, "embed_dim": dim, "depths": depths, "num_heads": heads,
                    "window_size": window, "drop_path": drop_path}


# preset name -> (family, config values). 224 px sizes follow the papers' tables (ViT table 1,
# Mixer table 1, ConvMixer table 1 names "ConvMixer-h/d", Swin §3.3 variants).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # ViT — small images: 4×4 patches
    "vit_nano_patch4_28": _vit(128, 6, 4, 4, _SMALL, mlp_ratio=2.0, patch_norm=True, init="pytorch"),
    "vit_nano_patch4_28_paper": _vit(128, 6, 4, 4, _SMALL, mlp_ratio=2.0),  # the paper's embedding and init
    # + shifted patch tokens and locality self-attention (Lee et al. 2021): the ViT for small data.
    # No qkv bias, as in Lee et al.'s code: on Fashion-MNIST it trained ~3% faster and as well or
    # better (docs/results.md, vision backbones against vit-pytorch)
    "vit_nano_patch4_28_spt_lsa": _vit(128, 6, 4, 4, _SMALL, mlp_ratio=2.0, patch_norm=True, init="pytorch",
                                       shifted_patches=True, locality_attention=True, qkv_bias=False),
    "vit_tiny_patch4_28": _vit(192, 12, 3, 4, _SMALL),
    "vit_nano_patch4_32": _vit(128, 6, 4, 4, _SMALL32, mlp_ratio=2.0, patch_norm=True, init="pytorch"),
    "vit_tiny_patch4_32": _vit(192, 12, 3, 4, _SMALL32),
    # ViT — ImageNet sizes (tiny/small are DeiT's widths, as in timm)
    "vit_tiny_patch16_224": _vit(192, 12, 3, 16, _IMAGENET),
    "vit_small_patch16_224": _vit(384, 12, 6, 16, _IMAGENET),
    "vit_base_patch16_224": _vit(768, 12, 12, 16, _IMAGENET),
    "vit_base_patch32_224": _vit(768, 12, 12, 32, _IMAGENET),
    "vit_large_patch16_224": _vit(1024, 24, 16, 16, _IMAGENET),
    # MLP-Mixer
    "mixer_nano_patch4_28": _mixer(128, 8, 64, 512, 4, _SMALL),
    "mixer_nano_patch4_32": _mixer(128, 8, 64, 512, 4, _SMALL32),
    "mixer_s32_224": _mixer(512, 8, 256, 2048, 32, _IMAGENET),
    "mixer_s16_224": _mixer(512, 8, 256, 2048, 16, _IMAGENET),
    "mixer_b32_224": _mixer(768, 12, 384, 3072, 32, _IMAGENET),
    "mixer_b16_224": _mixer(768, 12, 384, 3072, 16, _IMAGENET),
    "mixer_l16_224": _mixer(1024, 24, 512, 4096, 16, _IMAGENET),
    # ConvMixer-h/d (small images: 2×2 patches, 5×5 depthwise kernels)
    "convmixer_256_8_28": _convmixer(256, 8, 2, 5, _SMALL),
    "convmixer_256_8_32": _convmixer(256, 8, 2, 5, _SMALL32),
    # 4×4 patches and 3×3 kernels: ~7× the images/s of the 2×2-patch model on one CPU core, for
    # short CPU budgets (the depthwise conv is the slow op there; 5×5 kernels halve the speed)
    "convmixer_256_8_ks3_p4_28": _convmixer(256, 8, 4, 3, _SMALL),
    "convmixer_768_32": _convmixer(768, 32, 7, 7, _IMAGENET, act="relu"),
    "convmixer_1024_20_ks9_p14": _convmixer(1024, 20, 14, 9, _IMAGENET),
    "convmixer_1536_20": _convmixer(1536, 20, 7, 9, _IMAGENET),
    # Swin (small images: 2×2 patches)
    "swin_nano_patch2_window7_28": _swin(64, (2, 4), (2, 4), 2, 7, _SMALL, 0.1),
    "swin_pico_patch2_window7_28": _swin(48, (2, 2), (2, 4), 2, 7, _SMALL, 0.1),
    "swin_nano_patch2_window4_32": _swin(64, (2, 2, 2), (2, 4, 8), 2, 4, _SMALL32, 0.1),
    # 4×4 patches of a 32 px image (28 px data is padded): 8×8 tokens in 4×4 windows, then 4×4
    # tokens in one window; wider and ~2x the images/s of the 2×2-patch models, for CPU budgets
    "swin_micro_patch4_window4_32": _swin(96, (2, 2), (3, 6), 4, 4, _SMALL32, 0.0),
    "swin_tiny_patch4_window7_224": _swin(96, (2, 2, 6, 2), (3, 6, 12, 24), 4, 7, _IMAGENET, 0.2),
    "swin_small_patch4_window7_224": _swin(96, (2, 2, 18, 2), (3, 6, 12, 24), 4, 7, _IMAGENET, 0.3),
    "swin_base_patch4_window7_224": _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 4, 7, _IMAGENET, 0.5),
    # Hybrids (the split is mixer_depth / conv_depth)
    "mixer_attention_nano_patch4_28": ("mixer_attention", {**_SMALL, "patch_size": 4, "embed_dim": 128, "depth": 8,
                                                           "mixer_depth": 4, "num_heads": 4, "tokens_mlp_dim": 64,
                                                           "channels_mlp_dim": 512}),
    # half the blocks and half the MLP width: ~2x the images/s, for short CPU budgets
    "mixer_attention_pico_patch4_28": ("mixer_attention", {**_SMALL, "patch_size": 4, "embed_dim": 128, "depth": 6,
                                                           "mixer_depth": 3, "num_heads": 4, "tokens_mlp_dim": 64,
                                                           "channels_mlp_dim": 256}),
    "mixer_attention_s16_224": ("mixer_attention", {**_IMAGENET, "patch_size": 16, "embed_dim": 512, "depth": 8,
                                                    "mixer_depth": 4, "num_heads": 8, "tokens_mlp_dim": 256,
                                                    "channels_mlp_dim": 2048}),
    "convmixer_mixer_256_8_28": ("convmixer_mixer", {**_SMALL, "patch_size": 2, "dim": 256, "depth": 8, "conv_depth": 4,
                                                     "kernel_size": 5, "tokens_mlp_dim": 128, "channels_mlp_dim": 512}),
    "convmixer_mixer_256_8_ks3_p4_28": ("convmixer_mixer", {**_SMALL, "patch_size": 4, "dim": 256, "depth": 8,
                                                            "conv_depth": 4, "kernel_size": 3, "tokens_mlp_dim": 64,
                                                            "channels_mlp_dim": 512}),
    "convmixer_mixer_768_16_224": ("convmixer_mixer", {**_IMAGENET, "patch_size": 14, "dim": 768, "depth": 16,
                                                       "conv_depth": 8, "kernel_size": 9, "tokens_mlp_dim": 384,
                                                       "channels_mlp_dim": 3072}),
}


def unknown_name_error(name: str, known, what: str = "model") -> UserError:
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.6)
    if close:
        return UserError(f"unknown {what} {name!r}; did you mean {', '.join(close)}? ({len(known)} known; "
                         "cvformers.list_models() or `cvformers models` lists them)")
    return UserError(f"unknown {what} {name!r}; known: {', '.join(sorted(known))}")


def preset_config(name: str, **overrides: Any):
    """The family name and config dataclass of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise unknown_name_error(name, PRESETS)
    family, values = PRESETS[name]
    config_cls = FAMILIES[family][0]
    return family, from_dict(config_cls, {**values, **overrides}, name)


def build_backbone(family: str, cfg: Any) -> nn.Module:
    """Build a family's module from its config dataclass or a plain dict (strictly checked)."""
    if family not in FAMILIES:
        raise unknown_name_error(family, FAMILIES, "model family")
    config_cls, module_cls = FAMILIES[family]
    if not isinstance(cfg, config_cls):
        cfg = from_dict(config_cls, dict(cfg), family)
    try:
        return module_cls(cfg)
    except ValueError as e:  # an inconsistent config (sizes that do not divide, …)
        raise ConfigError(f"{family}: {e}") from e


def create_model(name: str, pretrained: bool = False, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Build the backbone of preset ``name``, e.g. ``create_model("vit_tiny_patch4_28", num_classes=10)``.

    timm's signature: ``num_classes`` sets the head (0: none; default: the preset's), other
    overrides are fields of the family's config (``in_chans``, ``image_size``, ``drop_path`` …); an
    unknown one raises ``ConfigError`` naming it. No weights are published for the presets, so
    ``pretrained=True`` is refused; ``cvformers.create_model(name, checkpoint_path=…)`` loads yours.
    """
    if pretrained:
        raise UserError(f"no pretrained weights are published for {name!r}; train a classifier "
                        "(`cvformers train classifier`) and pass checkpoint_path=RUN to cvformers.create_model")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    family, cfg = preset_config(name, **overrides)
    return build_backbone(family, cfg)


def list_models(filter: str | list[str] = "", exclude_filters: str | list[str] = "",
                pretrained: bool = False) -> list[str]:
    """Preset names, sorted, as timm's ``list_models``: ``filter`` and ``exclude_filters`` are
    shell-style patterns (``"vit_*"``, ``["swin_*", "*_32"]``); a name matching any filter and no
    exclude filter is listed. ``pretrained=True`` lists those with published weights: none."""
    if pretrained:
        return []

    def patterns(value: str | list[str]) -> list[str]:
        return [value] if isinstance(value, str) else list(value)

    include = [f for f in patterns(filter) if f] or ["*"]
    exclude = [f for f in patterns(exclude_filters) if f]
    return sorted(name for name in PRESETS
                  if any(fnmatch.fnmatchcase(name, f) for f in include)
                  and not any(fnmatch.fnmatchcase(name, f) for f in exclude))


def model_rows(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Each preset of ``names`` (default: all, in preset order) with its family, input size,
    channels, classes and parameter count.

    Models are built on the ``meta`` device (no memory, no init) just to count parameters.
    """
    rows = []
    for name in (list(PRESETS) if names is None else names):
        family, cfg = preset_config(name)
        with torch.device("meta"):
            model = build_backbone(family, cfg)
        c = to_dict(cfg)
        rows.append({"name": name, "family": family, "image_size": c["image_size"], "in_chans": c["in_chans"],
                     "num_classes": c["num_classes"], "params": count_parameters(model)})
    return rows


def format_models_table(rows: list[dict[str, Any]] | list[str]) -> str:
    """The table ``cvformers models`` prints, from ``model_rows()`` or a list of preset names."""
    if rows and isinstance(rows[0], str):
        rows = model_rows(rows)
    lines = [f"{'name':34s} {'family':16s} {'input':>9s} {'classes':>7s} {'params':>9s}"]
    for r in rows:
        size = f"{r['in_chans']}x{r['image_size']}²"
        lines.append(f"{r['name']:34s} {r['family']:16s} {size:>9s} {r['num_classes']:>7d} {r['params'] / 1e6:>8.2f}M")
    return "\n".join(lines)


# --- the trainable classifier (model kind "classifier") -----------------------------------


@dataclass
class ClassifierConfig:
    family: str = "vit"  # architecture: vit | mixer | convmixer | swin | mixer_attention | convmixer_mixer
    preset: str = ""  # preset the backbone started from (for the record; the table below rules)
    backbone: dict[str, Any] = field(default_factory=dict)  # the family's config table, strictly checked
    label_smoothing: float = 0.1  # cross-entropy label smoothing (Szegedy et al. 2016 §7)
    mixup_alpha: float = 0.0  # mixup Beta(α, α) (Zhang et al. 2018); 0 = off
    crop_padding: int = 2  # random crop after zero-padding by this many pixels; 0 = off
    hflip: bool = True  # random horizontal flips (off for digits, where mirroring changes meaning)
    mean: list[float] = field(default_factory=lambda: [0.5])  # input normalisation, per channel or one value
    std: list[float] = field(default_factory=lambda: [0.5])  # (x - mean) / std before the backbone
    init_from: str = ""  # a dino or classifier run whose backbone weights a new run starts from ("": random init)


def classifier_config(preset: str, **overrides: Any) -> ClassifierConfig:
    """A ``ClassifierConfig`` for preset ``preset``; ``overrides`` go to the backbone config."""
    family, cfg = preset_config(preset, **overrides)
    return ClassifierConfig(family=family, preset=preset, backbone=to_dict(cfg))


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back at an independent random offset per image."""
    b, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,))
    dx = torch.randint(0, 2 * padding + 1, (b,))
    rows = (torch.arange(h)[None] + dy[:, None]).to(images.device)  # [B, H]
    cols = (torch.arange(w)[None] + dx[:, None]).to(images.device)  # [B, W]
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(images.shape[0]) < 0.5
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


@register_kind("classifier", ClassifierConfig)
class ImageClassifier(nn.Module):
    """A backbone + what training it needs. ``forward(images in [0,1]) -> logits``."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.family, cfg.backbone)
        bcfg = self.backbone.cfg
        self.image_size: int = bcfg.image_size
        self.in_chans: int = bcfg.in_chans
        self.num_classes: int = bcfg.num_classes
        # a ViT takes any multiple of its patch size (interpolated position embeddings)
        self.any_size_multiple_of: int = bcfg.patch_size if cfg.family == "vit" else 0
        for name, values in (("mean", cfg.mean), ("std", cfg.std)):
            if len(values) not in (1, self.in_chans):
                raise ConfigError(f"model.{name}: give 1 or {self.in_chans} values, got {len(values)}")
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._warned: set[str] = set()

    def _notice(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    def fit_input(self, images: torch.Tensor) -> torch.Tensor:
        """Adapt channels and size to what the backbone takes, with a notice; refuse what can't be.

        A ViT takes any multiple of its patch size (its position embeddings are interpolated);
        the other families need their exact size, so the image is resized (bilinear).
        """
        if images.ndim != 4:
            raise UserError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        c = images.shape[1]
        if c != self.in_chans:
            if c == 1 and self.in_chans == 3:
                images = images.expand(-1, 3, -1, -1)
            elif c == 3 and self.in_chans == 1:
                weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma
                images = (images * weights).sum(dim=1, keepdim=True)
            else:
                raise UserError(f"the model takes {self.in_chans}-channel images, got {c} channels")
            self._notice(f"converted {c}-channel input to the model's {self.in_chans} channels")
        h, w = images.shape[-2:]
        size = self.image_size
        if (h, w) != (size, size):
            p = self.any_size_multiple_of
            if p and h % p == 0 and w % p == 0:
                return images
            self._notice(f"resized {h}x{w} input to the model's {size}x{size}")
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self.fit_input(images)
        return self.backbone((images - self.mean) / self.std)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Standard small-image augmentation: random crop with zero padding, optional flip."""
        if self.cfg.crop_padding > 0:
            images = random_crop(images, self.cfg.crop_padding)
        if self.cfg.hflip:
            images = random_hflip(images)
        return images

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy with label smoothing; augmentation and mixup only in training mode."""
        images, labels = batch["image"], batch["label"].long()
        device = self.mean.device
        images, labels = images.to(device), labels.to(device)
        if (labels < 0).any() or (labels >= self.num_classes).any():
            raise UserError(f"labels must be in [0, {self.num_classes}); this data has {labels.min()}..{labels.max()}")
        smoothing = self.cfg.label_smoothing
        if not self.training:
            logits = self(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            acc = (logits.argmax(-1) == labels).float().mean()
            return loss, {"loss": loss.item(), "acc": acc.item()}
        images = self.augment(self.fit_input(images))
        if self.cfg.mixup_alpha > 0:
            lam = float(torch.distributions.Beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha).sample())
            perm = torch.randperm(images.shape[0], device=device)
            logits = self(lam * images + (1 - lam) * images[perm])
            loss = lam * F.cross_entropy(logits, labels, label_smoothing=smoothing) + (1 - lam) * F.cross_entropy(
                logits, labels[perm], label_smoothing=smoothing)
        else:
            logits = self(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}
