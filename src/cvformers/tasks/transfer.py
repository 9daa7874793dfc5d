"""Starting a model from another run's backbone: ``[model] init_from = "runs/dino"``.

A classifier, or a CLIP whose image tower is a registry backbone, can begin training from the
backbone of a finished dino run (its teacher, the network DINO evaluates) or classifier run.
The architectures must match — same family and same shapes; the head, the number of classes and
the regularisation rates (dropout, drop path) may differ — otherwise the run is refused with the
settings that differ. Only a new run loads them: ``--resume`` continues from its own checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cvformers.config import load_toml, to_dict
from cvformers.errors import UserError

# backbone settings that change no shape: a transfer may change them
FREE_SETTINGS = {"num_classes", "dropout", "attn_dropout", "drop_path"}


def source_backbone(run: str | Path) -> tuple[str, dict[str, Any], dict]:
    """(family, backbone config table, backbone state dict) of a dino or classifier run."""
    from cvformers.loading import TEACHER_WEIGHTS, WEIGHTS, read_weights

    run = Path(run)
    config = run / "config.toml"
    if not config.is_file():
        raise UserError(f"init_from = {str(run)!r}: not a run folder (no config.toml)")
    cfg = load_toml(config)
    kind, model = cfg.get("kind"), cfg.get("model", {})
    if kind not in ("dino", "classifier"):
        raise UserError(f"init_from = {str(run)!r}: a {kind!r} run has no vision backbone to start from "
                        "(give a dino or classifier run)")
    weights = run / (TEACHER_WEIGHTS if kind == "dino" and (run / TEACHER_WEIGHTS).is_file() else WEIGHTS)
    state, _ = read_weights(weights)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return model.get("family", "vit"), dict(model.get("backbone", {})), backbone


def init_backbone_from(backbone: nn.Module, family: str, run: str | Path) -> None:
    """Load the backbone of ``run`` into ``backbone`` (a registry model of ``family``), refusing
    one whose architecture does not match, with the reason."""
    src_family, src_cfg, state = source_backbone(run)
    if src_family != family:
        raise UserError(f"init_from = {str(run)!r}: its backbone is a {src_family}, this model's a {family}")
    mine = to_dict(backbone.cfg)
    differ = [f"{k} {src_cfg.get(k)!r} there, {mine.get(k)!r} here" for k in sorted(set(mine) | set(src_cfg))
              if k not in FREE_SETTINGS and src_cfg.get(k) != mine.get(k)]
    if differ:
        raise UserError(f"init_from = {str(run)!r}: its {family} backbone does not match this model's ("
                        + "; ".join(differ) + ")")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise UserError(f"init_from = {str(run)!r}: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
