import pytest
import torch

from cvformers.config import to_dict
from cvformers.vae.metrics import psnr
from cvformers.registry import build_model
from cvformers.vae.vqvae import VQVAE, EMAQuantizer, VQVAEConfig

from image_toys import squares

TINY = dict(image_size=16, vocab_size=32, code_dim=8, n_hid=16, n_blk_per_group=1, group_count=3, n_init=16)


def tiny(**kw) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**{**TINY, **kw}))


def quantizer_with(codebook, decay=0.5, threshold=0.0):
    q = EMAQuantizer(len(codebook), codebook.shape[1], decay=decay, eps=1e-5, dead_threshold=threshold)
    q.codebook.copy_(codebook)
    q.ema_sum.copy_(codebook)
    q.ema_count.fill_(1.0)
    q.initialized.fill_(True)
    return q


def test_face_shapes():
    m = tiny().eval()
    assert (m.num_tokens, m.grid_size, m.image_size, m.channels) == (32, 4, 16, 3)
    ids = m.encode(torch.rand(3, 3, 16, 16))
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.long
    out = m.decode(ids)
    assert out.shape == (3, 3, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_nearest_codebook_quantization():
    q = quantizer_with(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    points = torch.tensor([[1.0, 1.0], [9.0, -1.0], [2.0, 7.0], [-3.0, 0.0]])
    assert q.nearest(points).tolist() == [0, 1, 2, 0]


def test_ema_update_follows_the_formula():
    q = quantizer_with(torch.tensor([[0.0, 0.0], [10.0, 10.0]]), decay=0.5)
    points = torch.tensor([[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]])
    q.update(points, q.nearest(points))
    # counts: 0.5·1 + 0.5·[2, 1] ; sums: 0.5·code + 0.5·(sum of assigned points)
    torch.testing.assert_close(q.ema_count, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(q.ema_sum, torch.tensor([[2.0, 0.0], [9.5, 9.5]]))
    n, eps = 2.5, 1e-5
    smoothed = (q.ema_count + eps) / (n + 2 * eps) * n
    torch.testing.assert_close(q.codebook, q.ema_sum / smoothed[:, None])
    assert q.codebook[0, 0] == pytest.approx(2.0 / 1.5, rel=1e-4)  # moved towards the points at 1 and 3


def test_dead_code_restarts_on_an_encoder_output():
    torch.manual_seed(0)
    q = quantizer_with(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-50.0, 3.0]]), decay=0.5, threshold=0.75)
    points = torch.randn(16, 2)  # all near code 0: codes 1 and 2 get no assignment
    q.update(points, q.nearest(points))
    assert q.last_restarts == 2
    for k in (1, 2):  # each restarted code now sits exactly on one of the batch's vectors
        assert (points - q.codebook[k]).abs().sum(1).min() == 0
        assert float(q.ema_count[k]) == 0.75
    assert float(q.ema_count[0]) > 0.75
    # a live code is not touched by the restart, and the next batch uses the new codes
    q.update(points, q.nearest(points))
    assert q.nearest(points).unique().numel() > 1


def test_codebook_starts_on_encoder_outputs_and_straight_through_gradient():
    m = tiny()
    x = squares(4)
    z_e = m.features(x)[0].detach().requires_grad_(True)
    z_q, ids, commitment = m.quantizer(z_e)
    assert bool(m.quantizer.initialized)
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    # every code was initialised on some encoder vector (before its first EMA step)
    assert ids.shape == (4, 4, 4)
    z_q.sum().backward()
    torch.testing.assert_close(z_e.grad, torch.ones_like(z_e))  # straight-through: d z_q / d z_e = I
    assert flat.shape[0] == 64 and commitment.item() >= 0


def fit_one_batch(m: VQVAE, x: torch.Tensor, steps: int = 100) -> tuple[float, float, dict, float]:
    """Train on one batch (1 thread) -> (PSNR before, PSNR after, last metrics, restarts in all)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m.eval()
        start = float(psnr(m.decode(m.encode(x)), x))
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        restarts = 0.0
        for _ in range(steps):
            loss, metrics = m.loss({"image": x})
            restarts += metrics["restarts"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        return start, float(psnr(m.decode(m.encode(x)), x)), metrics, restarts
    finally:
        torch.set_num_threads(old)


def test_tiny_vqvae_learns_one_batch():
    m = tiny(ema_decay=0.9)  # a fast EMA so that dead codes are found within the short run
    start, end, metrics, restarts = fit_one_batch(m, squares(8))
    assert set(metrics) == {"recon_mse", "commitment", "psnr", "perplexity", "restarts"}
    assert end > start + 9, (start, end)  # measured: 6.4 -> 18.8 dB
    assert restarts > 0 and metrics["perplexity"] > 8  # restarts keep the codebook in use (measured 19.7)


def test_state_dict_round_trip_keeps_the_codebook(tmp_path):
    from safetensors.torch import load_file, save_file

    m = tiny()
    m.loss({"image": squares(4)})  # initialise + one EMA step
    m.eval()
    save_file(m.state_dict(), tmp_path / "m.safetensors")
    again = build_model("vqvae", to_dict(m.cfg))
    again.load_state_dict(load_file(tmp_path / "m.safetensors"))
    again.eval()
    x = squares(3, seed=1)
    assert torch.equal(m.encode(x), again.encode(x))
    assert torch.equal(m.decode(m.encode(x)), again.decode(again.encode(x)))


# --- factorised ids: (structure, colour) ------------------------------------------------------


def flat_square(colour, size=16, lo=3, hi=11) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size)
    x[0, :, lo:hi, lo:hi] = torch.tensor(colour)[:, None, None]
    return x


def test_factorised_structure_id_ignores_colour_and_colour_id_sees_it():
    m = tiny(colour_vocab_size=4)
    assert m.num_tokens == 32 * 4 and m.code_factors == (32, 4)
    images = torch.cat([flat_square((0.86, 0.12, 0.12)), flat_square((0.16, 0.31, 0.9)), squares(6)])
    m.loss({"image": images})  # initialise both codebooks on encoder outputs
    m.eval()
    ids = m.encode(images)
    assert int(ids.max()) < m.num_tokens
    structure, colour = m.split_ids(ids)
    assert torch.equal(m.join_ids([structure, colour]), ids) and torch.equal(structure, ids // 4)
    # a red and a blue square in the same place: the structure encoder gets the same input
    assert torch.equal(structure[0], structure[1])
    assert not torch.equal(colour[0], colour[1])  # the colour code tells them apart
    # decode reads both parts: swapping the colour ids changes the picture
    swapped = structure[:1] * 4 + colour[1:2]
    assert not torch.equal(m.decode(ids[:1]), m.decode(swapped))


def test_factorised_vqvae_learns_one_batch_and_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    m = tiny(colour_vocab_size=4, ema_decay=0.9)
    x = torch.cat([flat_square((0.86, 0.12, 0.12)), flat_square((0.16, 0.31, 0.9), lo=5, hi=9), squares(6)])
    start, end, metrics, _ = fit_one_batch(m, x)
    assert "colour_perplexity" in metrics and metrics["colour_perplexity"] > 1.5
    assert end > start + 8, (start, end)  # measured: 8.8 -> 20.1 dB
    save_file(m.state_dict(), tmp_path / "m.safetensors")
    again = build_model("vqvae", to_dict(m.cfg))
    again.load_state_dict(load_file(tmp_path / "m.safetensors"))
    again.eval()
    assert torch.equal(m.encode(x), again.encode(x))
    assert torch.equal(m.decode(m.encode(x)), again.decode(again.encode(x)))
