"""How well an image tokenizer (dVAE, VQ-VAE) gives images back, and how many codes it uses.

``evaluate_reconstruction(vae, dataset)`` -> PSNR (dB) of decode(encode(x)) against x, the
codebook perplexity (exp of the entropy of the code histogram: the effective number of codes)
and usage (fraction of the codebook that appears at all). ``cvformers reconstruct`` calls
``reconstruct_run``: it loads a run folder, measures held-out images, writes a PNG grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cvformers.errors import UserError
from cvformers.vae.metrics import code_histogram, perplexity_of, psnr


@torch.no_grad()
def reconstruct(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """decode(encode(images)): what the tokenizer keeps of each image."""
    return vae.decode(vae.encode(images))


@torch.no_grad()
def evaluate_reconstruction(vae: Any, dataset, num_images: int = 1000, batch_size: int = 64) -> dict[str, float]:
    """PSNR, perplexity and codebook usage over the first ``num_images`` items of ``dataset``."""
    device = next(vae.parameters()).device
    n = min(num_images, len(dataset)) if num_images else len(dataset)
    if n == 0:
        raise UserError("no images to evaluate")
    counts = torch.zeros(vae.num_tokens, dtype=torch.float64)
    psnr_sum = 0.0
    for start in range(0, n, batch_size):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, n))]).to(device)
        ids = vae.encode(images)
        recon = vae.decode(ids)
        psnr_sum += float(psnr(recon, images)) * len(images)
        counts += code_histogram(ids, vae.num_tokens)
    return {
        "psnr": psnr_sum / n,
        "perplexity": perplexity_of(counts),
        "usage": float((counts > 0).double().mean()),
        "images": float(n),
    }


def reconstruction_grid(originals: torch.Tensor, recons: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """One image: the originals' grid above the reconstructions' grid, a white line between."""
    from cvformers.images import image_grid

    top, bottom = image_grid(originals.cpu(), nrow=nrow), image_grid(recons.cpu(), nrow=nrow)
    line = torch.ones(top.shape[0], 2, top.shape[2])
    return torch.cat([top, line, bottom], dim=1)


def save_reconstruction_grid(originals: torch.Tensor, recons: torch.Tensor, path: str | Path,
                             metadata: dict[str, str] | None = None) -> Path:
    from cvformers.images import save_png

    return save_png(reconstruction_grid(originals, recons), path, metadata=metadata)


def reconstruct_run(run: str | Path, out: str | Path, data: str | None = None, split: str | None = None,
                    num: int = 16, eval_images: int = 1000, device: str | torch.device = "cpu") -> dict[str, float]:
    """Measure the tokenizer in ``run`` on held-out images and write ``out`` (originals above reconstructions).

    ``data`` / ``split`` default to the run's own ``[data]`` table (its eval split).
    """
    from cvformers.config import from_dict, load_toml
    from cvformers.data import DataConfig, build_from_config
    from cvformers.loading import load_vae

    vae = load_vae(run, device)
    cfg = load_toml(Path(run) / "config.toml")
    table = dict(cfg.get("data", {}))
    if data:
        table["name"] = data
    table.update(image_size=vae.image_size, channels=vae.channels)
    data_cfg = from_dict(DataConfig, table, "data")
    dataset = build_from_config(data_cfg, split or data_cfg.eval_split)
    metrics = evaluate_reconstruction(vae, dataset, num_images=eval_images)
    shown = torch.stack([dataset[i]["image"] for i in range(min(num, len(dataset)))]).to(device)
    save_reconstruction_grid(shown, reconstruct(vae, shown), out,
                             metadata={"psnr": f"{metrics['psnr']:.2f}", "run": str(run)})
    return metrics
