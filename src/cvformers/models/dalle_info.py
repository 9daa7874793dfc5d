"""Plan a DALL-E run before renting machines: parameters, FLOPs per token, activation memory.

    from cvformers.models.dalle_info import model_info, resolve_dalle_config
    info = model_info(resolve_dalle_config("paper"))     # the 12B model of §2.2, counted on the meta device
    print(info.format())

How each figure is counted (all per *sample* = one [text | image] sequence of S tokens):

- **Parameters**: exact — the model is built on the meta device (no memory) and its tensors
  are counted, so the figure is the model's own, whatever its size.
- **FLOPs, forward**: matrix products only, each ``m×k @ k×n`` counted as ``2·m·n·k``
  (a multiply and an add). Per block: the fused QKV projection ``2·S·dim·3·inner``, the output
  projection ``2·S·inner·dim``, the MLP ``2·2·S·dim·hidden``; attention ``2·2·d_head·heads·P``
  (scores QKᵀ and the weighted sum of values) where P is the number of (query, key) pairs the
  layer's pattern *allows* — causal text, all text for every image token, and the pattern's image
  window — counted in closed form per pattern and layer by the schedule. The output heads
  ``2·dim·(V_text·(T−1) + V_image·N)``: the training loss reads T−1 text and N image logits.
  Layer norms, softmax, GELU, embeddings and the loss are elementwise and left out (< 1 % here).
  FLOPs per token = forward FLOPs per sample / S.
- **FLOPs, training** ≈ 3 × forward (the backward of a product costs two products: one for the
  input's gradient, one for the weight's); with activation checkpointing every block runs its
  forward once more, ≈ 4 × for the blocks.
- **Activation memory**: the tensors autograd keeps for the backward, as this implementation
  saves them (measured against torch in tests/test_model_info.py). Per block, in elements:
  ``S·(4·dim + 3·inner + 2·hidden)`` (the inputs of both layer norms and of qkv and fc1, the q/k/v
  projections, the GELU's input and output) plus the attention path's own tensors — plain causal
  SDPA (full, or a sparse pattern on a grid too small for its blocked path): its output ``S·inner``,
  which is also the output projection's input; the blocked paths: text and image outputs, the copy
  of the image queries, the gathered key and value blocks ``2·blocks·keys_per_block·inner`` and the
  output projection's input; plus LayerNorm statistics (2 per token) and softmax log-sum-exp (one
  per token and head), always fp32. After the blocks: the final norm's input, the heads' inputs and
  the log-probabilities ``(T−1)·V_text + N·V_image``.
  *With checkpointing* the forward keeps only each block's input ``S·dim``; the peak is then all of
  those plus the larger of one block's full set (recomputed in its backward) and the head part
  (whose tensors are freed before the first block is recomputed).
  *bf16* is torch autocast (what cvformers' bf16 option runs): the products save bf16 copies of
  their inputs and bf16 outputs, while the residual stream (the layer norms' inputs), the
  log-probabilities and all statistics stay fp32; it also keeps a bf16 copy of every weight matrix
  for the backward, once per step whatever the batch. (Pure bf16 would be about half the fp32 figure.)
  Not counted: dropout masks (the formula assumes ``dropout = 0``; with dropout SDPA also falls
  back to a kernel that stores the attention matrix), the per-pattern cached masks (shared by the
  whole batch), and gradients of activations during the backward (at most a few block tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cvformers.config import ConfigError, from_dict, load_toml, to_dict
from cvformers.errors import UserError
from cvformers.models.dalle import PRESETS, DalleConfig, meta_model
from cvformers.nn.attention import build_pattern
from cvformers.nn.layers import count_parameters

FP32, BF16 = 4, 2


# --- which config -------------------------------------------------------------------------


def resolve_dalle_config(spec: str | Path) -> DalleConfig:
    """A preset name (``tiny``, ``small``, ``paper``), a TOML file with a ``[model]`` table (an
    optional ``preset`` key in it names the base), or a dalle run folder -> DalleConfig."""
    spec_str = str(spec)
    if spec_str in PRESETS:
        return DalleConfig(**PRESETS[spec_str])
    path = Path(spec_str)
    if path.is_dir():
        path = path / "config.toml"
        if not path.is_file():
            raise UserError(f"{spec_str} is a folder without config.toml (not a run folder)")
    elif not path.is_file():
        raise UserError(f"unknown config {spec_str!r}: not a preset ({', '.join(PRESETS)}), "
                        "a TOML file or a run folder")
    data = load_toml(path)
    kind = data.get("kind", "dalle")
    if kind != "dalle":
        raise UserError(f"{path} describes a {kind!r} model; model-info counts dalle models")
    table = dict(data.get("model", {}))
    if not table and "kind" not in data:
        raise UserError(f"{path} has no [model] table")
    preset = table.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown dalle preset {preset!r}; known: {', '.join(PRESETS)}")
    base = to_dict(DalleConfig(**PRESETS[preset])) if preset else {}
    try:
        return from_dict(DalleConfig, {**base, **table}, "model")
    except ValueError as e:  # DalleConfig.__post_init__ checks
        raise ConfigError(f"{path}: {e}") from None


# --- counting -----------------------------------------------------------------------------


def attended_pairs(pattern: str, text_len: int, grid_h: int, grid_w: int, conv_kernel: int = 11) -> int:
    """(query, key) pairs a pattern allows over [text | H×W image], causality included (closed form)."""
    T, H, W = text_len, grid_h, grid_w
    N = H * W
    text = T * (T + 1) // 2 + N * T  # causal text; every image token reads all text (appendix B.1)
    if pattern == "full":
        image = N * (N + 1) // 2
    elif pattern == "row":  # itself and the previous W tokens in raster order
        image = sum(min(i, W) + 1 for i in range(N))
    elif pattern == "column":  # its column in earlier rows, and itself
        image = W * H * (H + 1) // 2
    elif pattern == "conv":  # k×k window: full rows above (up to k//2), the left half of its own row
        h = conv_kernel // 2
        width = [min(W - 1, c + h) - max(0, c - h) + 1 for c in range(W)]
        left = [c - max(0, c - h) + 1 for c in range(W)]
        image = sum(min(h, r) for r in range(H)) * sum(width) + H * sum(left)
    else:
        raise ValueError(f"unknown attention pattern {pattern!r}")
    return text + image


def _attention_saved(cfg: DalleConfig, name: str) -> tuple[int, int]:
    """(elements in the activation dtype, fp32 elements) the attention of one block keeps, per sample.

    Follows the path ``cvformers.nn.attention`` takes: the pattern object decides between plain /
    dense-masked SDPA over the whole sequence and its blocked fast path.
    """
    T, G = cfg.text_len, cfg.grid_size
    S, N, inner, heads = cfg.seq_len, G * G, cfg.heads * cfg.dim_head, cfg.heads
    pattern = build_pattern(name, T, G, G, cfg.conv_kernel)
    blocked_pays = getattr(pattern, "blocked_pays", lambda: True)
    if name == "full" or not blocked_pays():
        return S * inner, heads * S  # SDPA output (= out-projection input), log-sum-exp
    if name == "column":
        blocks, keys = G, T + G
    else:  # row / conv: one block per grid row, keys = text + the rows it reaches
        blocks, keys = G, T + (pattern.reach + 1) * G
    elems = T * inner + N * inner + N * inner + 2 * blocks * keys * inner + S * inner
    #       text out    q copy      image out    gathered k and v            out-projection input
    return elems, heads * S


@dataclass
class ModelInfo:
    """What a DALL-E config costs. FLOPs and bytes are per sample (one sequence) unless named per token."""

    config: DalleConfig
    seq_len: int
    schedule: list[str]
    params: int  # exact, from the model built on the meta device
    params_embedding: int  # token + position embeddings
    params_blocks: int  # the transformer blocks
    params_other: int  # final norm + output heads
    attended_pairs: dict[str, int]  # pattern -> (query, key) pairs per head per sample
    flops_linear: int  # forward, QKV + out projection + MLP, all layers, per sample
    flops_attention: int  # forward, scores + weighted values over the allowed pairs, per sample
    flops_heads: int  # forward, text + image output heads (training loss positions), per sample
    activation_bytes: dict[str, int]  # "fp32", "bf16" (autocast), "fp32+ckpt", "bf16+ckpt" -> bytes per sample
    autocast_weight_bytes: int  # bf16 autocast also keeps a bf16 copy of every matrix weight, once per step

    @property
    def flops_forward(self) -> int:
        return self.flops_linear + self.flops_attention + self.flops_heads

    @property
    def flops_per_token(self) -> float:
        return self.flops_forward / self.seq_len

    @property
    def train_flops_per_token(self) -> float:
        """≈ 3 × forward (backward = 2 products per forward product)."""
        return 3 * self.flops_per_token

    @property
    def train_flops_per_token_ckpt(self) -> float:
        """With activation checkpointing the blocks run their forward twice: ≈ 3× + one more of the blocks."""
        return (3 * self.flops_forward + self.flops_linear + self.flops_attention) / self.seq_len

    @property
    def adam_state_bytes(self) -> int:
        """fp32 weights + gradients + AdamW's two moments: 16 bytes per parameter."""
        return 16 * self.params

    def format(self, batch_size: int = 1) -> str:
        c = self.config
        counts = ", ".join(f"{n} x{self.schedule.count(n)}" for n in dict.fromkeys(self.schedule))
        sched = _compress(self.schedule) if len(self.schedule) <= 12 else \
            f"{counts} ({_compress(self.schedule[:8])}, ...)"
        lines = [
            f"DALL-E: dim {c.dim}, depth {c.depth}, {c.heads} heads x {c.dim_head}, mlp x{c.mlp_ratio:g}, "
            f"{c.text_len} text + {c.grid_size}x{c.grid_size} image tokens (S = {self.seq_len}), "
            f"vocab {c.num_text_tokens} text / {c.num_image_tokens} image",
            f"attention schedule: {sched}",
            "",
            "| quantity | value |",
            "|---|---|",
            f"| parameters | {self.params:,} ({_si(self.params)}) |",
            f"| - embeddings / blocks / norm+heads | {self.params_embedding:,} / {self.params_blocks:,} / "
            f"{self.params_other:,} |",
            f"| forward FLOPs per token | {_si(self.flops_per_token)} |",
            f"| - linear / attention / heads (per sample) | {_si(self.flops_linear)} / "
            f"{_si(self.flops_attention)} / {_si(self.flops_heads)} |",
            f"| training FLOPs per token (~3x forward) | {_si(self.train_flops_per_token)} |",
            f"| training FLOPs per token, checkpointing | {_si(self.train_flops_per_token_ckpt)} |",
            f"| training FLOPs per sample | {_si(3 * self.flops_forward)} |",
            f"| cross-check: 6 x block params per token | {_si(6 * self.params_blocks)} |",
        ]
        for key in ("fp32", "fp32+ckpt", "bf16", "bf16+ckpt"):
            per = self.activation_bytes[key]
            extra = f" (batch {batch_size}: {_bytes(per * batch_size)})" if batch_size != 1 else ""
            label = key.replace("bf16", "bf16 autocast").replace("+ckpt", ", checkpointing")
            lines.append(f"| activations per sample, {label} | {_bytes(per)}{extra} |")
        lines.append(f"| bf16 autocast: weight copies, once per step | {_bytes(self.autocast_weight_bytes)} |")
        lines.append(f"| fp32 weights + grads + AdamW moments | {_bytes(self.adam_state_bytes)} |")
        lines.append("")
        lines.append("FLOPs count matmuls as 2mnk; attention only over the pairs each layer's pattern allows. "
                     "Activations: tensors kept for backward (dropout 0).")
        return "\n".join(lines)


def _activation_elems(cfg: DalleConfig, schedule: list[str]) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """Per block [(stream, compute, stats) elements], and the same for the part after the blocks.

    stream: residual-stream tensors and log-probabilities (fp32 under autocast); compute: the
    products' inputs and outputs (bf16 under autocast); stats: layer-norm / softmax statistics (fp32).
    """
    T, N, S = cfg.text_len, cfg.grid_size**2, cfg.seq_len
    inner, hidden = cfg.heads * cfg.dim_head, int(cfg.dim * cfg.mlp_ratio)
    per_pattern = {name: _attention_saved(cfg, name) for name in set(schedule)}
    blocks = []
    for name in schedule:
        attn, attn_stats = per_pattern[name]
        # stream: the inputs of norm1 and norm2; compute: the inputs of qkv and fc1, q/k/v, the GELU's
        # input and output (= fc2's input), the attention path's tensors; stats: 2 per token per norm
        blocks.append((2 * S * cfg.dim, S * (2 * cfg.dim + 3 * inner + 2 * hidden) + attn, 4 * S + attn_stats))
    # final norm's input and the log-probabilities of both heads; the heads' inputs (copies of slices)
    head = (S * cfg.dim + (T - 1) * cfg.num_text_tokens + N * cfg.num_image_tokens, (T - 1 + N) * cfg.dim, 2 * S)
    return blocks, head


def model_info(cfg: DalleConfig) -> ModelInfo:
    """Count parameters (meta device, exact), forward FLOPs and activation memory of a DalleConfig."""
    model = meta_model(cfg)
    params = count_parameters(model)
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in
                    ("text_emb", "image_emb", "text_pos", "image_row", "image_col"))
    blocks = count_parameters(model.blocks)
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))

    T, G = cfg.text_len, cfg.grid_size
    N, S = G * G, cfg.seq_len
    inner, hidden = cfg.heads * cfg.dim_head, int(cfg.dim * cfg.mlp_ratio)
    schedule = cfg.schedule()
    pairs = {name: attended_pairs(name, T, G, G, cfg.conv_kernel) for name in dict.fromkeys(schedule)}

    linear = cfg.depth * 2 * S * (cfg.dim * 3 * inner + inner * cfg.dim + 2 * cfg.dim * hidden)
    attention = sum(2 * 2 * cfg.dim_head * cfg.heads * pairs[name] for name in schedule)
    heads = 2 * cfg.dim * (cfg.num_text_tokens * (T - 1) + cfg.num_image_tokens * N)

    block_elems, head_elems = _activation_elems(cfg, schedule)
    act = {}
    # (label, bytes of a stream element, bytes of a compute element); stats are always fp32
    for label, stream_bytes, compute_bytes in (("fp32", FP32, FP32), ("bf16", FP32, BF16)):
        def size(e: tuple[int, int, int]) -> int:
            return e[0] * stream_bytes + e[1] * compute_bytes + e[2] * FP32

        full = sum(size(b) for b in block_elems) + size(head_elems)
        # checkpointing: every block keeps only its input; in the backward the head's tensors are freed
        # first, then one block at a time is recomputed
        kept = cfg.depth * S * cfg.dim * stream_bytes
        ckpt = kept + max(max(size(b) for b in block_elems), size(head_elems))
        act[label], act[f"{label}+ckpt"] = full, ckpt

    return ModelInfo(config=cfg, seq_len=S, schedule=schedule, params=params, params_embedding=embedding,
                     params_blocks=blocks, params_other=params - embedding - blocks, attended_pairs=pairs,
                     flops_linear=linear, flops_attention=attention, flops_heads=heads, activation_bytes=act,
                     autocast_weight_bytes=BF16 * matrices)


# --- printing -----------------------------------------------------------------------------


def _compress(schedule: list[str]) -> str:
    """['row', 'column', 'row', 'row', ...] -> 'row, column, row x2, ...' (runs collapsed)."""
    out, i = [], 0
    while i < len(schedule):
        j = i
        while j < len(schedule) and schedule[j] == schedule[i]:
            j += 1
        out.append(schedule[i] if j - i == 1 else f"{schedule[i]} x{j - i}")
        i = j
    return ", ".join(out)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def describe(spec: str | Path, batch_size: int = 1) -> str:
    """What ``cvformers model-info`` prints."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    return model_info(resolve_dalle_config(spec)).format(batch_size)


__all__ = ["ModelInfo", "attended_pairs", "describe", "model_info", "resolve_dalle_config"]
