"""Sampling a DALL-E: image ids one at a time against a key/value cache (DALL-E §2.3 / §3).

Each step is one forward of a single token: ``DALLE.prefill`` runs the text prefix once per
batch, ``DALLE.decode_step`` then reads only the slots its attention pattern allows, so a step
costs the same at the first image id as at the last. Beyond the paper: temperature / top-k /
top-p, and classifier-free guidance (Ho & Salimans 2022) with the conditional and the
unconditional rows in one batched forward, logits mixed by a scale. Decoding the ids to pixels
and reranking candidates is the pipeline's job (``cvformers.pipelines.text_to_image``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from cvformers.config import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How image ids are drawn: one object from the CLI, a run's ``[sampling]`` table or Python
    down to ``sample_codes``, validated once when it is built.

    TOML has no null, so "off" is written as a value: ``top_k = 0`` (all ids), ``top_p = 1.0``
    (all mass), ``guidance = 1.0`` (conditional logits only), ``candidates = 0`` (as many as images).
    """

    temperature: float = 1.0  # softmax temperature; 0 = greedy (the most likely id every step)
    top_k: int = 0  # sample among the k most likely ids; 0 = all
    top_p: float = 1.0  # nucleus: the smallest set of ids whose probability reaches p; 1 = all
    guidance: float = 1.0  # classifier-free guidance s: cond + (s - 1)(cond - uncond); 1 = off
    candidates: int = 0  # images sampled before a reranker keeps the best; 0 = as many as asked for
    seed: int | None = 0  # seed of the sampling generator: same seed, same images; None = fresh randomness

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "guidance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"sampling.{name} must be a finite number, got {value!r}")
        for name in ("top_k", "candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"sampling.{name} must be an integer >= 0, got {value!r}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.guidance < 0:
            raise ConfigError(f"sampling.guidance must be >= 0 (1 is off), got {self.guidance}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ConfigError(f"sampling.seed must be an integer in [0, 2^64), got {self.seed!r}")

    def override(self, **changes) -> "SamplingConfig":
        """A copy with the given fields changed; ``None`` means "keep" (an unset command-line flag)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown sampling setting(s) {unknown}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_table(self) -> dict:
        """The TOML ``[sampling]`` table of a run: the model's defaults (seed and candidates are per call)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("seed", "candidates")}


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the k most likely ids and/or the smallest set whose probability reaches p; -inf elsewhere."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        # the k-th largest is the (V-k+1)-th smallest: kthvalue is ~4x faster than topk on CPU
        kth = logits.kthvalue(logits.shape[-1] - top_k + 1, dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop an id when the ids before it already reach p (the most likely id always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def gumbel_noise(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """-log(-log U) for U uniform: argmax(logits + noise) is an exact draw from softmax(logits)."""
    uniform = torch.rand(shape, generator=generator, device=device).clamp_(min=1e-20)
    return uniform.log_().neg_().log_().neg_()


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] ids. temperature 0 is greedy. ``noise``: this draw's ``gumbel_noise``
    [B, V] made ahead (the same numbers the generator would give here), else drawn now."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    # Gumbel-max: argmax(logits + Gumbel noise) is an exact draw from softmax(logits), and costs a
    # third of torch.multinomial per decode step on CPU; filtered ids stay at -inf
    if noise is None:
        noise = gumbel_noise(logits.shape, generator, logits.device)
    return (logits + noise).argmax(-1)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: cond + (s - 1)(cond - uncond); s = 1 is exactly the conditional logits."""
    return cond + (scale - 1.0) * (cond - uncond)


def sample_codes(model, text: torch.Tensor, sampling: SamplingConfig | None = None, *,
                 prompt_codes: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, packed: bool = True,
                 on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Sample the image ids of a DALLE for text ids [B, T] -> LongTensor[B, grid, grid].

    ``sampling`` gives temperature, top-k, top-p and guidance (its seed and candidates are the
    caller's: pass ``generator``). ``prompt_codes`` [B, r·grid] fixes the first r rows (image
    prompt, §3.3). Guidance != 1 appends the unconditional (all-pad) rows to the batch, so both
    run in one forward per step. ``use_cache=False`` recomputes the whole prefix every step (the
    slow baseline, for benchmarks); ``packed=False`` keeps the decode step's products on
    ``F.linear`` instead of oneDNN's packed weights (``cvformers.nn.decode_linear``; the same ids
    up to float rounding, for A/B timing). ``on_step(done, total)`` is called after each drawn
    image id (a progress bar; ``total`` counts the ids sampled, not those an image prompt fixed).
    """
    s = sampling or SamplingConfig()
    # inference mode skips autograd's bookkeeping (version counters, views' metadata) on every op,
    # which shows in a loop of ~80 small ops per token
    with torch.inference_mode():
        codes = _sample_codes(model, text, prompt_codes, s.temperature, s.top_k or None,
                              s.top_p if s.top_p < 1 else None, s.guidance, generator, use_cache, packed,
                              on_step)
    return codes.clone()  # a normal tensor again: callers may edit it or feed it to autograd


def _sample_codes(model, text, prompt_codes, temperature, top_k, top_p, guidance, generator, use_cache, packed,
                  on_step):
    cfg = model.cfg
    B, T, n, G = text.shape[0], cfg.text_len, cfg.grid_size**2, cfg.grid_size
    guided = guidance != 1.0
    if guided:
        text = torch.cat([text, model.unconditional_text(B)])

    def both(c: torch.Tensor) -> torch.Tensor:  # the same ids go to the conditional and unconditional rows
        return torch.cat([c, c]) if guided else c

    # The Gumbel noise of a whole grid row's steps is drawn at once: the generator gives the same
    # numbers in the same order as one draw per step, with a fifth of the small ops per step.
    V, noise = cfg.num_image_tokens, None

    def pick(logits: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal noise
        if guided:
            logits = guided_logits(*logits.chunk(2), guidance)
        if temperature == 0:
            return logits.argmax(-1)
        if (i - start) % G == 0:
            noise = gumbel_noise((min(G, n - i), B, V), generator, logits.device)
        return sample_from_logits(logits, temperature, top_k, top_p, noise=noise[(i - start) % G])

    codes = torch.zeros(B, n, dtype=torch.long, device=text.device)
    start = 0
    if prompt_codes is not None:
        start = prompt_codes.shape[1]
        codes[:, :start] = prompt_codes
    if start >= n:
        return codes.view(B, G, G)
    if use_cache:
        caches = model.new_caches(text.shape[0], packed=packed)
        logits = model.prefill(text, caches, both(codes[:, :start]) if start else None)
        for i in range(start, n):
            codes[:, i] = pick(logits, i)
            if on_step is not None:
                on_step(i + 1 - start, n - start)
            if i + 1 < n:
                logits = model.decode_step(both(codes[:, i]), T + i, caches)
    else:
        for i in range(start, n):
            h = model(text, both(codes[:, :i]) if i else None)
            codes[:, i] = pick(model.image_head(h[:, -1]), i)
            if on_step is not None:
                on_step(i + 1 - start, n - start)
    return codes.view(B, G, G)
