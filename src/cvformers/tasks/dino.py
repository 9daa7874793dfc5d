"""``cvformers train dino``: self-supervised pre-training of a vision backbone (Caron et al. 2021).

    cvformers train dino --model vit_nano_patch4_28 --data fashion-mnist --out runs/dino

The task builds the student (``cvformers.models.dino.DINO``: the preset's backbone + the DINO
head), the multi-crop views (``[crops]``, ``cvformers.data.multicrop``), the teacher with its
centre and schedules (``[teacher]``, the ``DINOTeacher`` hook), the collapse monitor
(``[collapse]``) and, where the data has labels, the k-NN monitor: every ``train.eval_every``
steps the teacher's features of ``knn_train`` train images vote for ``knn_test`` test images
(weighted k-NN, k = 20, T = 0.07), logged as ``knn_top1``. Labels serve only that measure.

Training follows the paper's recipe where it is a setting (§3.1, appendix / the official
defaults): AdamW, lr warmed up then cosine, weight decay on a cosine from 0.04 to 0.4, the last
layer frozen during the first epoch, and gradient clipping. Departure: the clipping is of the
global gradient norm at 3.0 (the official code clips each parameter tensor's norm at 3.0),
because the one loop clips globally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvformers.config import ConfigError, from_dict, to_dict
from cvformers.data import DataConfig
from cvformers.data.multicrop import MultiCropCollate, MultiCropConfig
from cvformers.errors import UserError
from cvformers.models.dino import DINO, DINOConfig
from cvformers.models.vision import preset_config
from cvformers.tasks import TaskArgs, TaskSetup, register_task
from cvformers.train.hooks import TrainerHook
from cvformers.train.schedule import steps_per_epoch
from cvformers.train.teacher import CollapseConfig, CollapseMonitor, DINOTeacher, TeacherConfig

DEFAULT_PRESET = "vit_nano_patch4_28"
DEFAULT_DATA = "fashion-mnist"


@dataclass
class KNNMonitorConfig:
    """The ``[knn]`` table of a dino run: the k-NN accuracy measured at each evaluation."""

    train_images: int = 5000  # memory bank: the first N train images (0: no k-NN monitor)
    test_images: int = 2000  # queries: the first N test images
    k: int = 20  # neighbours (paper §4.1: 20)
    temperature: float = 0.07  # T of the exp(s / T) vote weights (paper: 0.07)


def default_train_config():
    """DINO's optimisation for small images: AdamW lr 5e-4 x batch / 256 (the paper's rule), weight
    decay 0.04 -> 0.4 on a cosine, clipping at 3.0, lr warmup then cosine to 1e-6 x ... (min ratio 0.002)."""
    from cvformers.train.trainer import TrainConfig

    return TrainConfig(steps=3000, batch_size=128, lr=5e-4 * 128 / 256, weight_decay=0.04, weight_decay_end=0.4,
                       warmup_steps=300, min_lr_ratio=0.002, grad_clip=3.0, betas=(0.9, 0.999), eval_every=500,
                       checkpoint_every=500, log_every=20, eval_batches=2)


class KNNMonitor(TrainerHook):
    """At each evaluation: weighted k-NN top-1 of the teacher's backbone features (§4.1)."""

    name = "knn-monitor"

    def __init__(self, teacher: DINOTeacher, train_data, test_data, config: KNNMonitorConfig):
        self.teacher, self.train_data, self.test_data, self.config = teacher, train_data, test_data, config

    @torch.no_grad()
    def on_evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        from cvformers.eval.knn import extract_features, knn_accuracy

        c = self.config
        net = self.teacher.teacher
        device = next(net.parameters()).device
        encode = lambda images: net.features(images.to(device)).cpu()  # noqa: E731
        with torch.random.fork_rng():
            train_f, train_y = extract_features(encode, self.train_data, limit=c.train_images)
            test_f, test_y = extract_features(encode, self.test_data, limit=c.test_images)
        return {"knn_top1": knn_accuracy(train_f, train_y, test_f, test_y, c.k, c.temperature)}


def _model_config(args: TaskArgs, table: dict[str, Any]) -> DINOConfig:
    if args.resume and table.get("backbone"):
        return from_dict(DINOConfig, table, "model")  # a resumed run rebuilds exactly what it saved
    if args.model and table.get("preset") and args.model != table["preset"]:
        raise ConfigError(f"--model {args.model} and [model] preset = {table['preset']!r} disagree; give one")
    preset = args.model or table.get("preset") or DEFAULT_PRESET
    family, backbone = preset_config(preset)
    merged = {"family": family, "preset": preset, **{k: v for k, v in table.items() if k != "backbone"},
              "backbone": {**to_dict(backbone), **table.get("backbone", {}), "num_classes": 0}}
    return from_dict(DINOConfig, merged, "model")


@register_task("dino", tables=("crops", "teacher", "collapse", "knn"))
def dino_task(args: TaskArgs) -> TaskSetup:
    """Self-supervised DINO pre-training (student, EMA teacher, multi-crop) with a k-NN monitor."""
    from cvformers.data.labels import classification_dataset
    from cvformers.train.trainer import train_config_from

    table = dict(args.config.get("model", {}))
    model_cfg = _model_config(args, table)
    backbone = model_cfg.backbone
    data_table = dict(args.config.get("data", {}))
    spec = args.data or data_table.get("name") or DEFAULT_DATA
    data_cfg = from_dict(DataConfig, {**data_table, "name": spec, "image_size": backbone["image_size"],
                                      "channels": backbone["in_chans"],
                                      "eval_split": data_table.get("eval_split", "test")}, "data")
    crops = from_dict(MultiCropConfig, dict(args.config.get("crops", {})), "crops")
    teacher_cfg = from_dict(TeacherConfig, dict(args.config.get("teacher", {})), "teacher")
    collapse_cfg = from_dict(CollapseConfig, dict(args.config.get("collapse", {})), "collapse")
    knn_cfg = from_dict(KNNMonitorConfig, dict(args.config.get("knn", {})), "knn")
    train_cfg = train_config_from(args, default_train_config())

    if model_cfg.family != "vit":
        # only a ViT takes views of another size (interpolated position embeddings): the other
        # families see their local views at the full size
        if crops.local_size and crops.local_size != backbone["image_size"]:
            raise ConfigError(f"crops.local_size: a {model_cfg.family} takes {backbone['image_size']} px views only")
        crops.local_size = backbone["image_size"]
    patch = backbone.get("patch_size", 4) if model_cfg.family == "vit" else 1
    collate = MultiCropCollate(crops, backbone["image_size"], patch)

    try:  # labelled data: the k-NN monitor; a folder without class sub-folders trains without it
        train_data = classification_dataset(data_cfg, "train")
        test_data = classification_dataset(data_cfg, data_cfg.eval_split)
        labelled = True
    except UserError:
        from cvformers.tasks import train_and_eval_data

        train_data, test_data = train_and_eval_data(data_cfg)
        labelled = False
    if len(train_data) == 0:
        raise UserError(f"{data_cfg.name}: the training split is empty")
    if train_cfg.steps < 1:
        raise ConfigError("train.steps must be >= 1")
    epoch = steps_per_epoch(len(train_data), train_cfg.batch_size * train_cfg.grad_accum)
    if "freeze_last_layer_steps" not in table:
        model_cfg.freeze_last_layer_steps = min(epoch, train_cfg.steps // 10)  # the first epoch, at most 10% of a short run
    if teacher_cfg.warmup_temp_steps < 0:
        teacher_cfg.warmup_temp_steps = round(0.3 * train_cfg.steps)
    collapse_cfg.after_steps = collapse_cfg.after_steps or min(epoch, train_cfg.steps // 10)

    model = DINO(model_cfg)
    teacher = DINOTeacher(teacher_cfg, train_cfg.steps, model_cfg.out_dim)
    hooks: list[TrainerHook] = [teacher, CollapseMonitor(model_cfg.out_dim, collapse_cfg)]
    if labelled and knn_cfg.train_images > 0 and test_data is not None and len(test_data):
        hooks.append(KNNMonitor(teacher, train_data, test_data, knn_cfg))
    return TaskSetup(kind="dino", model=model, model_config=model_cfg, train_config=train_cfg,
                     train_data=train_data, eval_data=test_data if test_data is not None and len(test_data) else None,
                     collate=collate, hooks=hooks,
                     extra_config={"data": to_dict(data_cfg), "crops": to_dict(crops), "teacher": to_dict(teacher_cfg),
                                   "collapse": to_dict(collapse_cfg), "knn": to_dict(knn_cfg)})
