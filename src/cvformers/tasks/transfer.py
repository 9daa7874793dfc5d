"""Starting a model from another run's backbone: ``[model] init_from = "runs/dino"``.

A classifier, or a CLIP whose image tower is a registry backbone, can begin training from the
backbone of a finished dino run (its teacher, the network DINO evaluates) or classifier run.
The architectures must match — same family and same shapes; the head, the number of classes and
the regularisation rates (dropout, drop path) may differ — otherwise the run is refused with the
settings that differ. Only a new run loads them: ``--resume`` continues from its own checkpoint.
"""

from __future__ import annotations

# The reading and checking live in loading.py, shared with cvformers.create_model(checkpoint_path=…).
from cvformers.loading import FREE_SETTINGS, init_backbone_from, source_backbone  # noqa: F401

__all__ = ["FREE_SETTINGS", "init_backbone_from", "source_backbone"]
