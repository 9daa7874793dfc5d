"""Shared layers, written once with stable state-dict keys (docs/design.md, the timm rule)."""
