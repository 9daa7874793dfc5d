"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", arXiv 2104.14294).

A student network g_θs and a teacher g_θt of the same architecture (a backbone, then the DINO
head) see differently augmented views of an image (§3.1, multi-crop: 2 global views and N
local ones). Each network's output over K dimensions becomes a distribution by a softmax with a
temperature; the student learns to match the teacher (eq. 2-3):

    min_θs  Σ_{x ∈ {x1g, x2g}}  Σ_{x' ∈ V, x' ≠ x}  H(P_t(x), P_s(x'))

where the teacher sees only the global views and the student all of them. The teacher is not
trained by gradients: it is an exponential moving average of the student, and its outputs
are centred and sharpened (§3.1 "Avoiding collapse"). Those parts are training state, not
the model: they live in the trainer hook ``cvformers.train.teacher.DINOTeacher``, which this
module calls for the targets (Algorithm 1's ``teacher(x1), teacher(x2)``, centring, softmax).

This file holds the student: ``DINO`` = any registry backbone with a [CLS]-like pooled output
(``num_classes = 0``) + ``DINOHead``, and ``dino_loss`` (Algorithm 1's ``H``, over all
(teacher global, student other) view pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cvformers.config import ConfigError
from cvformers.registry import register_kind


@dataclass
class DINOConfig:
    """The ``[model]`` table of a dino run: the backbone and the head (sizes for small images)."""

    family: str = "vit"  # backbone architecture: vit | mixer | convmixer | swin | mixer_attention | convmixer_mixer
    preset: str = ""  # preset the backbone started from (for the record; the table below rules)
    backbone: dict[str, Any] = field(default_factory=dict)  # the family's config table; num_classes is forced to 0
    out_dim: int = 4096  # K, the head's output dimensions (paper: 65536 for ImageNet; §5.3 / Table 9)
    hidden_dim: int = 512  # width of the head's MLP (paper: 2048)
    bottleneck_dim: int = 128  # the L2-normalised bottleneck before the last layer (paper: 256)
    head_layers: int = 3  # layers of the head's MLP before the bottleneck (paper: 3, appendix C)
    norm_last_layer: bool = True  # weight-normalised last layer with its norm g fixed to 1 (the official default)
    student_temp: float = 0.1  # τs of the student's softmax (§3.1)
    freeze_last_layer_steps: int = 0  # the last layer gets no update for this many steps (paper: the first epoch)
    mean: list[float] = field(default_factory=lambda: [0.5])  # input normalisation, per channel or one value
    std: list[float] = field(default_factory=lambda: [0.5])  # (x - mean) / std before the backbone

    def __post_init__(self) -> None:
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.student_temp > 0:
            raise ConfigError(f"model.student_temp must be > 0, got {self.student_temp}")


class WeightNormLinear(nn.Module):
    """A bias-free Linear whose rows are w = g · v / ‖v‖ (Salimans & Kingma 2016), the head's last
    layer. Keys ``weight_g`` [out, 1] and ``weight_v`` [out, in], as ``torch.nn.utils.weight_norm``
    names them in the official code; with ``fixed_norm`` g stays 1 and is not trained."""

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        w = self.weight()
        # frozen: no gradient reaches v or g, so the optimizer skips them (grad None), as the
        # official code's cancel_gradients_last_layer does in the first epoch
        return F.linear(x, w.detach() if frozen else w)


class DINOHead(nn.Module):
    """Projection head (§3.1, appendix C): a 3-layer MLP (hidden 2048 in the paper, GELU) to a
    bottleneck, L2 normalisation, then a weight-normalised linear layer to K dimensions."""

    def __init__(self, in_dim: int, cfg: DINOConfig):
        super().__init__()
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.head_layers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(cfg.bottleneck_dim, cfg.out_dim, fixed_norm=cfg.norm_last_layer)

    def forward(self, features: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        z = F.normalize(self.mlp(features), dim=-1)
        return self.last_layer(z, frozen=freeze_last_layer)


def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor],
              student_temp: float) -> torch.Tensor:
    """Eq. 3 / Algorithm 1: the mean over all pairs (teacher view i, student view j ≠ i) of the
    cross-entropy H(P_t, P_s) = -Σ_k P_t[k] log P_s[k], averaged over the batch.

    ``student_logits``: one [B, K] tensor per view, the teacher's global views first (the pair of
    the same view is skipped); ``teacher_probs``: one [B, K] distribution per global view.
    """
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student_logits]
    total, pairs = 0.0, 0
    for i, p in enumerate(teacher_probs):
        for j, log_q in enumerate(log_probs):
            if i == j:
                continue
            total = total + (-(p * log_q).sum(dim=-1)).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss needs at least one pair of different views")
    return total / pairs


class TeacherTargets(Protocol):
    """What the student asks of its teacher (``cvformers.train.teacher.DINOTeacher``)."""

    def targets(self, global_views: list[torch.Tensor], training: bool = True) -> list[torch.Tensor]:
        """Centred, sharpened teacher distributions [B, K] of each global view (``training``: keep
        their mean output for the centre's update)."""
        ...


def feature_dim(backbone: nn.Module) -> int:
    """Width of a registry backbone's pooled output (its head's input)."""
    if hasattr(backbone, "num_features"):
        return int(backbone.num_features)
    cfg = backbone.cfg
    return int(getattr(cfg, "embed_dim", None) or cfg.dim)


def _build_backbone(cfg: DINOConfig) -> nn.Module:
    from cvformers.models.vision import build_backbone  # vision imports this package's siblings

    return build_backbone(cfg.family, {**cfg.backbone, "num_classes": 0})


@register_kind("dino", DINOConfig)
class DINO(nn.Module):
    """The student (and, as an averaged copy, the teacher): backbone + DINO head.

    ``features(images in [0, 1])`` is the backbone's pooled output ([CLS] for a ViT): what k-NN,
    the linear probe and transfer use. ``forward`` adds the head. ``loss(batch)`` takes the
    multi-crop views ``batch["crops"]`` (2 global views first) and asks the attached teacher for
    its targets.
    """

    progress_metrics = ("teacher_entropy", "kl")  # shown in the progress bar: they show collapse

    def __init__(self, cfg: DINOConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = _build_backbone(cfg)
        bcfg = self.backbone.cfg
        self.image_size: int = bcfg.image_size
        self.in_chans: int = bcfg.in_chans
        self.head = DINOHead(feature_dim(self.backbone), cfg)
        for name, values in (("mean", cfg.mean), ("std", cfg.std)):
            if len(values) not in (1, self.in_chans):
                raise ConfigError(f"model.{name}: give 1 or {self.in_chans} values, got {len(values)}")
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.freeze_last_layer = False
        self._teacher: list[TeacherTargets] = []  # a list, so that the hook is no submodule of the model

    # --- the teacher --------------------------------------------------------------------
    def attach_teacher(self, teacher: TeacherTargets | None) -> None:
        """Called by the teacher hook at the start of training: where ``loss`` gets its targets."""
        self._teacher = [teacher] if teacher is not None else []

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer before each step: the last layer is frozen during the first
        ``freeze_last_layer_steps`` (appendix: "freezing the last layer during the first epoch")."""
        self.freeze_last_layer = step < self.cfg.freeze_last_layer_steps

    # --- forward ------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> pooled backbone features [B, D] (a ViT's final [CLS])."""
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images), freeze_last_layer=self.freeze_last_layer)

    def forward_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Head outputs [B, K] of each view. Consecutive views of one size go through the
        backbone as one batch (the official MultiCropWrapper), and the head sees all at once."""
        feats, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.features(torch.cat(views[start:end])))
            start = end
        out = self.head(torch.cat(feats), freeze_last_layer=self.freeze_last_layer)
        return list(out.chunk(len(views)))

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Algorithm 1 for one batch of views: H over all (teacher global, student other) pairs,
        with the collapse measures of §5.3 / Fig. 7 as metrics: the teacher's entropy and the
        KL divergence between teacher and student (both in nats, mean over pairs and images)."""
        if not self._teacher:
            raise RuntimeError("DINO.loss needs its teacher: train it with the DINOTeacher hook "
                               "(cvformers train dino), which attaches one")
        views = [v.to(self.mean.device) for v in batch["crops"]]
        if len(views) < 2:
            raise ValueError(f"DINO needs at least the 2 global views, got {len(views)}")
        targets = self._teacher[0].targets(views[:2], training=self.training)
        student = self.forward_views(views)
        loss = dino_loss(student, targets, self.cfg.student_temp)
        with torch.no_grad():
            entropy = torch.stack([-(p * p.clamp_min(1e-12).log()).sum(-1).mean() for p in targets]).mean()
            # KL(P_t || P_s) = H(P_t, P_s) - H(P_t): 0 when the student copies the teacher (Fig. 7)
            kl = loss.detach() - entropy
        return loss, {"teacher_entropy": float(entropy), "kl": float(kl),
                      "last_layer_frozen": float(self.freeze_last_layer)}
