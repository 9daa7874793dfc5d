"""`cvformers train dvae|vqvae` end to end on a few steps, and `cvformers reconstruct` on the run."""

import pytest
import torch
from PIL import Image

from cvformers.cli import main
from cvformers.config import ConfigError
from cvformers.config import load_toml
from cvformers.eval.reconstruction import evaluate_reconstruction, reconstruct_run
from cvformers.loading import load_vae
from cvformers.tasks import TaskArgs, get_task
from cvformers.train.trainer import Trainer

TINY = {
    "dvae": dict(image_size=16, vocab_size=32, n_hid=8, n_blk_per_group=1, group_count=3, n_init=8),
    "vqvae": dict(image_size=16, vocab_size=32, code_dim=8, n_hid=8, n_blk_per_group=1, group_count=3, n_init=8),
}



def train(kind, out, steps=4):
    config = {"model": TINY[kind], "data": {"size": 32, "eval_size": 16},
              "train": {"warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2}}
    args = TaskArgs(out=out, data="shapes", config=config, steps=steps, batch_size=8)
    setup = get_task(kind)(args)
    assert setup.kind == kind and setup.model.grid_size == 4
    return Trainer.from_setup(setup, args).fit()


@pytest.mark.parametrize("kind", ["dvae", "vqvae"])
def test_train_then_reconstruct(kind, tmp_path, capsys):
    run = tmp_path / kind
    result = train(kind, run)
    assert result["step"] == 4 and "eval_psnr" in result
    grid = Image.open(run / "recon.png")
    # 16 held-out images in two rows of 8, above their reconstructions: 4 rows of 16 px + padding
    assert grid.size == (8 * 18 + 2, 2 * (2 * 18 + 2) + 2)
    vae, cfg = load_vae(run), load_toml(run / "config.toml")
    assert cfg["kind"] == kind and vae.num_tokens == 32
    metrics = reconstruct_run(run, tmp_path / "r.png", eval_images=16)
    assert metrics["images"] == 16 and 0 < metrics["perplexity"] <= 32 and 0 < metrics["usage"] <= 1
    assert main(["reconstruct", "--vae", str(run), "--out", str(tmp_path / "cli.png"), "--eval-images", "8"]) == 0
    assert "PSNR" in capsys.readouterr().out and (tmp_path / "cli.png").is_file()


def test_metrics_on_a_perfect_and_a_blank_tokenizer():
    class Identity(torch.nn.Module):
        """A 'tokenizer' whose codes are the pixels: reconstruction is exact."""

        num_tokens, grid_size = 256, 4

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return (x[:, 0] * 255).round().long()

        def decode(self, ids):
            return (ids.float() / 255)[:, None]

    data = [{"image": torch.full((1, 4, 4), v / 255)} for v in range(0, 256, 16)]
    m = evaluate_reconstruction(Identity(), data, batch_size=5)
    assert m["psnr"] > 90 and m["usage"] == 16 / 256 and m["perplexity"] == pytest.approx(16)


def test_bad_model_key_and_mismatched_data_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.vocab"):
        get_task("dvae")(TaskArgs(out=tmp_path, config={"model": {"vocab": 3}}))
    with pytest.raises(ConfigError, match="image_size"):
        get_task("dvae")(TaskArgs(out=tmp_path, config={"model": TINY["dvae"], "data": {"image_size": 32}}))


def test_reconstruct_refuses_a_run_that_is_not_a_tokenizer(tmp_path):
    assert main(["reconstruct", "--vae", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
