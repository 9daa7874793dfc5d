"""Models: a Config dataclass plus an nn.Module exposing loss(batch) -> (loss, metrics)."""
