"""``cvformers train classifier``: a vision backbone on labelled images, through the one loop.

    cvformers train classifier --model vit_nano_patch4_28 --data fashion-mnist --out runs/vit

The task picks the preset (``--model``, or ``[model] preset`` in the TOML), sets the number of
classes and channels from the data, turns flips off for digits, and records ``[model]`` (the
family + its config table) and ``[data]`` so that the run reloads (``load_run``) and
resumes. Labels come from the data: MNIST / Fashion-MNIST classes; for ``shapes`` the shape
of a single-object scene (circle, square, triangle, plus); for ``folder:PATH`` the top-level
sub-folder of each (captioned) image names its class. The eval split (``test``; every 10th image for a folder) is scored every
``train.eval_every`` steps and its accuracy lands in ``metrics.jsonl``.
"""

from __future__ import annotations

from typing import Any

from cvformers.config import ConfigError, from_dict, to_dict
from cvformers.data import DataConfig
from cvformers.data.labels import classification_dataset, count_classes
from cvformers.errors import UserError
from cvformers.models.vision import ClassifierConfig, ImageClassifier, classifier_config
from cvformers.tasks import TaskArgs, TaskSetup, register_task

DEFAULT_PRESET = "vit_nano_patch4_28"
DEFAULT_DATA = "fashion-mnist"


def default_train_config():
    """Small-image classifier defaults: AdamW lr 1e-3, wd 0.05, batch 128, warmup + cosine."""
    from cvformers.train.trainer import TrainConfig

    return TrainConfig(steps=4000, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_steps=200,
                       min_lr_ratio=0.01, eval_every=1000, checkpoint_every=1000, log_every=20)


def _merge_model_table(preset_cfg: ClassifierConfig, table: dict[str, Any]) -> ClassifierConfig:
    merged = to_dict(preset_cfg)
    backbone = {**merged["backbone"], **table.get("backbone", {})}
    merged.update({k: v for k, v in table.items() if k != "backbone"})
    merged["backbone"] = backbone
    return from_dict(ClassifierConfig, merged, "model")


@register_task("classifier")
def classifier_task(args: TaskArgs) -> TaskSetup:
    """An image classifier (ViT, Mixer, ConvMixer, Swin, hybrids) on labelled images."""
    from cvformers.train.trainer import train_config_from

    table = dict(args.config.get("model", {}))
    data_table = dict(args.config.get("data", {}))
    if args.resume and table.get("backbone"):
        # a resumed run rebuilds exactly what it saved
        model_cfg = from_dict(ClassifierConfig, table, "model")
        data_cfg = from_dict(DataConfig, data_table, "data")
    else:
        if args.model and table.get("preset") and args.model != table["preset"]:
            raise ConfigError(f"--model {args.model} and [model] preset = {table['preset']!r} disagree; give one")
        preset = args.model or table.get("preset") or DEFAULT_PRESET
        model_cfg = _merge_model_table(classifier_config(preset), table)
        spec = args.data or data_table.get("name") or DEFAULT_DATA
        backbone = model_cfg.backbone
        data_cfg = from_dict(DataConfig, {**data_table, "name": spec, "image_size": backbone["image_size"],
                                          "channels": backbone["in_chans"],
                                          "eval_split": data_table.get("eval_split", "test")}, "data")
        if backbone["in_chans"] not in (1, 3):
            raise ConfigError(f"model.backbone.in_chans must be 1 or 3 for image data, got {backbone['in_chans']}")
        if "hflip" not in table and spec.partition(":")[0] == "mnist":
            model_cfg.hflip = False  # a mirrored digit is another glyph (or none)
    train_data = classification_dataset(data_cfg, "train")
    eval_data = classification_dataset(data_cfg, data_cfg.eval_split)
    if len(train_data) == 0:
        raise UserError(f"{data_cfg.name}: the training split is empty")
    model_cfg.backbone["num_classes"] = count_classes(data_cfg.name, train_data)
    model = ImageClassifier(model_cfg)
    if model_cfg.init_from and not args.resume:  # a resumed run has its own weights
        from cvformers.tasks.transfer import init_backbone_from

        init_backbone_from(model.backbone, model_cfg.family, model_cfg.init_from)
    train_cfg = train_config_from(args, default_train_config())
    return TaskSetup(kind="classifier", model=model, model_config=model_cfg, train_config=train_cfg,
                     train_data=train_data, eval_data=eval_data if len(eval_data) else None,
                     extra_config={"data": to_dict(data_cfg)})
