"""Held-out bits per image token: cvformers' DALL-E vs DALLE-pytorch 1.6.6 on shapes or a caption folder.

One run, one thread, both models at the same size (dim 192, depth 4, 6 heads of 32), on the same
data, token grid, batches (same order), optimizer, schedule and number of steps:

1. a frozen image tokenizer (``--vae``, e.g. runs/ship_vqvae: 32 px -> 8x8 ids of 512) encodes
   ``--train-images`` train and ``--test-images`` test images once: the shapes splits, or for
   ``--data folder:PATH`` (e.g. the OpenClipart set of ``cvformers data openclipart``) the
   train/test sides of a ``--holdout`` split by path hash (the split ``[data] holdout`` makes);
2. a BPE caption tokenizer (vocab 1024, text_len 20) is trained on the train captions;
3. each model is trained ``--steps`` steps with AdamW (lr 1e-3, betas (0.9, 0.96), weight decay
   4.5e-2 on matrices only, not on embeddings/biases/norms), linear warmup 100 then cosine to lr/10
   (``cvformers.train.schedule.lr_at``), gradient clip 1.0, batch 64;
4. held-out loss = cross-entropy of the image positions only, from each model's own logits on the
   test set, / ln 2. Both training losses weight text 1/8 and image 7/8 (DALL-E §2.2; DALLE-pytorch's
   ``loss_img_weight=7`` gives the same weights), but the text part is not compared.

Caption ids for DALLE-pytorch: it treats id 0 as padding and replaces it with its own per-position
pad ids. Our BPE ids 0..V-1 are real tokens and our pads are V+i at position i, so the peer gets
``real id + 1`` and 0 for every pad, with ``num_text_tokens = V + 1``: the same information, and
each model pads the way it was written to. cvformers' classifier-free caption dropout is off
(``caption_drop_prob=0``), since the peer does not drop captions by default.

DALLE-pytorch is used as released (rotary embeddings and token shift on, its defaults), with full
attention (its default ``attn_types``). Its DiscreteVAE is built only to give it the sizes
(512 codes, 32 px, 2 downsamplings -> 8x8); it receives the precomputed ids as a LongTensor [B, 64].

Run with the peer venv, which also imports cvformers:
    OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/dalle_heldout_loss.py --vae runs/ship_vqvae --steps 500
    OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/dalle_heldout_loss.py --data folder:data/openclipart \
        --vae runs/openclipart_vqvae --steps 500
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIM, DEPTH, HEADS, DIM_HEAD, TEXT_LEN, BPE_VOCAB = 192, 4, 6, 32, 20, 1024


# --- data: ids computed once, batches drawn once ---------------------------------------------


def encode_split(vae, spec: str, split: str, count: int, holdout: float):
    """(captions, image ids [n, h*w]) of the first ``count`` images of ``split`` of dataset ``spec``."""
    from cvformers.data import build_dataset
    from cvformers.tasks.dalle import encode_dataset

    if spec == "shapes":
        data = build_dataset(spec, split=split, image_size=vae.image_size, size=count)
    else:
        data = build_dataset(spec, split=split, image_size=vae.image_size, holdout=holdout)
        data = torch.utils.data.Subset(data, range(min(count, len(data))))
    codes, index = encode_dataset(vae, data, desc=f"encode {split}")
    captions = [data[int(i)]["caption"] for i in index]
    return captions, codes.long().flatten(1)


def batch_order(n: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Index batches for every step: shuffled epochs, drawn once so both models see the same ones."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * batch / n))])
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


# --- the two models behind one face: loss(text, codes) for training, image logits for eval ----


class OursAdapter:
    def __init__(self, tokenizer, num_image_tokens: int, grid: int, attention: str):
        from cvformers.models.dalle import DALLE, DalleConfig

        cfg = DalleConfig(num_text_tokens=tokenizer.num_text_tokens, text_len=TEXT_LEN,
                          num_image_tokens=num_image_tokens, grid_size=grid, dim=DIM, depth=DEPTH,
                          heads=HEADS, dim_head=DIM_HEAD, attention=attention, caption_drop_prob=0.0)
        self.model = DALLE(cfg)
        self.name = f"cvformers DALLE (attention={attention})"

    def loss(self, text, codes):
        return self.model.loss({"text": text, "codes": codes})[0]

    def image_logits(self, text, codes):
        h = self.model(text, codes)
        return self.model.image_head(h[:, TEXT_LEN - 1:-1])  # output t predicts token t+1


class PeerAdapter:
    def __init__(self, tokenizer, num_image_tokens: int, grid: int, image_size: int):
        from dvae_peer import import_dalle_pytorch

        dp = import_dalle_pytorch()
        num_layers = int(math.log2(image_size // grid))
        # only its sizes are read; tiny widths keep its (frozen, unused) weights small
        vae = dp.DiscreteVAE(image_size=image_size, num_tokens=num_image_tokens, codebook_dim=16,
                             num_layers=num_layers, hidden_dim=8, num_resnet_blocks=0)
        self.model = dp.DALLE(dim=DIM, vae=vae, num_text_tokens=tokenizer.vocab_size + 1,
                              text_seq_len=TEXT_LEN, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD)
        assert self.model.image_seq_len == grid * grid
        self.vocab = tokenizer.vocab_size
        self.name = "DALLE-pytorch 1.6.6 (full attention)"

    def peer_text(self, text):
        # real BPE ids shift up by one; our per-position pads (>= vocab) become its padding id 0
        return torch.where(text >= self.vocab, torch.zeros_like(text), text + 1)

    def loss(self, text, codes):
        return self.model(self.peer_text(text), codes, return_loss=True)

    def image_logits(self, text, codes):
        logits = self.model(self.peer_text(text), codes)  # [B, T + n, text vocab + image vocab]
        # positions T.. predict image ids 0..n-1; the text columns are masked there anyway
        return logits[:, TEXT_LEN:, self.model.num_text_tokens:]


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, lr: float) -> torch.optim.AdamW:
    """AdamW, decay on matrices of Linear layers only (not embeddings, biases, norms), for both."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in trainable_params(model):
        (decay if p.ndim >= 2 and id(p) not in embed_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": 4.5e-2}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.96))


def train(adapter, text, codes, batches, lr: float, warmup: int) -> float:
    from cvformers.train.schedule import lr_at

    model = adapter.model
    model.train()
    opt = make_optimizer(model, lr)
    params = trainable_params(model)
    start = time.perf_counter()
    for step, idx in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=lr, total_steps=len(batches), warmup_steps=warmup)
        loss = adapter.loss(text[idx], codes[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == len(batches) - 1:
            print(f"{adapter.name}: step {step} train loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return time.perf_counter() - start


@torch.no_grad()
def heldout_bits(adapter, text, codes, batch: int = 200) -> float:
    adapter.model.eval()
    nats, count = 0.0, 0
    for i in range(0, len(codes), batch):
        logits = adapter.image_logits(text[i:i + batch], codes[i:i + batch])
        target = codes[i:i + batch]
        nats += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        count += target.numel()
    return nats / count / math.log(2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shapes", help="shapes, or folder:PATH (captioned images)")
    p.add_argument("--holdout", type=float, default=0.05, help="test share of a folder (by path hash)")
    p.add_argument("--vae", default="runs/ship_vqvae", help="frozen image tokenizer run folder")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--train-images", type=int, default=8000)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--paper", action="store_true", help="also train cvformers with the paper's attention schedule")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    from cvformers.loading import load_vae
    from cvformers.text import BPETokenizer, CaptionTruncatedWarning

    vae = load_vae(args.vae)
    train_caps, train_codes = encode_split(vae, args.data, "train", args.train_images, args.holdout)
    test_caps, test_codes = encode_split(vae, args.data, "test", args.test_images, args.holdout)
    tokenizer = BPETokenizer.train(train_caps, vocab_size=BPE_VOCAB, text_len=TEXT_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptionTruncatedWarning)
        train_text, test_text = tokenizer.encode(train_caps), tokenizer.encode(test_caps)
    batches = batch_order(len(train_codes), args.steps, args.batch_size, args.seed)

    grid, image_size = vae.grid_size, vae.image_size
    makers = [lambda: OursAdapter(tokenizer, vae.num_tokens, grid, "full")]
    if args.paper:
        makers.append(lambda: OursAdapter(tokenizer, vae.num_tokens, grid, "paper"))
    makers.append(lambda: PeerAdapter(tokenizer, vae.num_tokens, grid, image_size))

    rows = []
    for make in makers:
        torch.manual_seed(args.seed)
        adapter = make()
        n = sum(p.numel() for p in trainable_params(adapter.model))
        seconds = train(adapter, train_text, train_codes, batches, args.lr, args.warmup)
        bits = heldout_bits(adapter, test_text, test_codes)
        rows.append((adapter.name, n, seconds, bits))
        print(f"{adapter.name}: {bits:.4f} bits/image token", file=sys.stderr)

    command = "OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/dalle_heldout_loss.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print(f"\n{args.data}, {vae.image_size} px -> {grid}x{grid} ids of {vae.num_tokens} ({args.vae}); "
          f"{len(train_codes)} train / {len(test_codes)} test images; BPE {tokenizer.vocab_size} x {TEXT_LEN}; "
          f"batch {args.batch_size}; one thread\n")
    print("| model | parameters | steps | train s | held-out bits / image token |")
    print("|---|---:|---:|---:|---:|")
    for name, n, seconds, bits in rows:
        print(f"| {name} | {n / 1e6:.2f} M | {args.steps} | {seconds:.0f} | {bits:.4f} |")
    print(f"\ncommand: `{command}`")


if __name__ == "__main__":
    main()
