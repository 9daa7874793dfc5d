"""timm's classifier-head methods, shared by every vision backbone.

A backbone ends in a Linear (an ``nn.Identity`` when ``num_classes`` is 0) at the dotted path
``classifier_name``, fed ``num_features`` pooled features. ``get_classifier`` returns it and
``reset_classifier(n)`` replaces it with a fresh Linear to ``n`` classes (or removes it with 0), as
timm's models do, e.g. to fine-tune a pre-trained backbone on a new label set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from cvformers.errors import UserError


class ClassifierMixin:
    classifier_name = "head"  # dotted path of the final Linear
    num_features: int  # width of what the head reads
    cfg: Any  # the backbone's config dataclass (has num_classes)

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int) -> None:
        """A new head to ``num_classes`` outputs (PyTorch's default Linear init, as timm); 0 = no head."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise UserError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        ref = next(self.parameters())
        head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                if num_classes > 0 else nn.Identity())
        parent_name, _, attr = self.classifier_name.rpartition(".")
        setattr(self.get_submodule(parent_name) if parent_name else self, attr, head)
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)  # the config keeps describing the model
