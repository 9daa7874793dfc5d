"""Shared layers, written once with stable state-dict keys (DESIGN.md, the timm rule)."""
