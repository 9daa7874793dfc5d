"""Where the trainer's metrics go besides ``metrics.jsonl``, chosen by ``[train] loggers``.

``metrics.jsonl`` is the record of a run (``cvformers plot`` and ``--resume`` read it); a logger
only mirrors the same numbers into a tool people already watch. Today that is TensorBoard
(``loggers = ["tensorboard"]``: event files in ``RUN/tensorboard/``, through PyTorch's own
``SummaryWriter``; ``tensorboard --logdir runs`` shows every run under ``runs/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cvformers.errors import UserError

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLogger:
    """Scalars as ``train/<metric>`` and ``eval/<metric>`` against the optimizer step."""

    def __init__(self, run_dir: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("[train] loggers = [\"tensorboard\"] needs tensorboard: "
                            "pip install 'cvformers[tensorboard]'") from None
        # on resume, events logged after the checkpoint's step are dropped: those steps run again
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step or None)

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key not in ("step", "split"):
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


LOGGERS = {"tensorboard": TensorBoardLogger}


def build_loggers(names: Sequence[str], run_dir: Path, start_step: int) -> list[TensorBoardLogger]:
    """One logger per name of ``[train] loggers`` (the config has already checked the names)."""
    return [LOGGERS[name](Path(run_dir), start_step) for name in names]
