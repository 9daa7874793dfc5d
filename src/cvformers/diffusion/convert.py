"""Load a diffusers ``UNet2DModel`` checkpoint into cvformers' ``UNet``.

Both networks are the DDPM U-Net (Ho et al. 2020, arXiv 2006.11239, appendix B) with the same
order of layers: input conv; per level ResBlocks (each followed by attention at the attention
levels) and a stride-2 conv; a middle of ResBlock, attention, ResBlock; an up path of one more
ResBlock per level, each reading the running features concatenated with one skip, and nearest ×2
plus a conv; GroupNorm, SiLU and the output conv. The weights therefore map one to one when the
diffusers model is configured as cvformers builds its U-Net:

- ``resnet_time_scale_shift="scale_shift"``: the timestep embedding is the scale and shift of
  each ResBlock's second GroupNorm (our ``ResBlock``). diffusers' default, ``"default"``, *adds*
  a projection of the embedding before that norm (DDPM's own form); cvformers has no such block
  (see ``cvformers.nn.unet_blocks.ResBlock`` for why), so those checkpoints do not map.
- attention blocks ``AttnDownBlock2D`` / ``AttnUpBlock2D`` at mirrored levels, with the same
  number of heads at every attention level and in the middle (diffusers fixes the head width,
  cvformers the head count); diffusers' separate ``to_q`` / ``to_k`` / ``to_v`` Linears become
  the rows of our fused 1×1 ``qkv`` conv, laid out (q|k|v, head, head_dim) like diffusers' split.
- sinusoidal ("positional") timestep embedding with ``flip_sin_to_cos=True`` and
  ``freq_shift=0`` (our [cos | sin] layout); an MLP to ``4 · block_out_channels[0]``.
- ``attn_norm_num_groups = norm_num_groups``: with "scale_shift", diffusers' middle attention has
  no GroupNorm unless this is set, and every cvformers attention layer has one.
- ``num_class_embeds = N`` becomes ``num_classes = N - 1``: cvformers reserves its last label
  row for "no label" (classifier-free guidance), which in the diffusers model is class N - 1.

What cannot map, and why: additive timestep conditioning (above); Fourier or learned timestep
embeddings, class embeddings other than a lookup table ("timestep", "identity"), and
BigGAN-style resampling (``downsample_type`` / ``upsample_type`` "resnet"), ``SkipDownBlock2D``
and the other block types: cvformers has no such layers. ``center_input_sample``, an output
channel count other than the input's, ``mid_block_scale_factor`` != 1 and ``add_attention=False``
change the computation in ways our config cannot express. Each raises a ``ConfigError`` naming
the option.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from cvformers.config import ConfigError
from cvformers.models.unet import UNet, UNetConfig

_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}

# UNet2DModel's defaults for the options this converter reads (diffusers 0.2x-0.4x)
_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "mid_block_type": "UNetMidBlock2D",
}

# options that must hold the given value for the computation to be ours
_REQUIRED = {
    "resnet_time_scale_shift": "scale_shift", "time_embedding_type": "positional", "flip_sin_to_cos": True,
    "freq_shift": 0, "center_input_sample": False, "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu", "add_attention": True,
    "class_embed_type": None, "mid_block_type": "UNetMidBlock2D",
}


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The ``UNetConfig`` of a diffusers ``UNet2DModel`` config (``model.config`` or its
    ``config.json``); a ``ConfigError`` names the first option that has no counterpart here."""
    c = {**_DEFAULTS, **{k: v for k, v in dict(config).items() if not k.startswith("_")}}
    for key, want in _REQUIRED.items():
        if c[key] != want:
            raise ConfigError(f"diffusers option {key}={c[key]!r} has no cvformers counterpart (needs {want!r})")
    if c["attn_norm_num_groups"] != c["norm_num_groups"]:
        # with "scale_shift" diffusers' middle attention normalises only when attn_norm_num_groups is set
        raise ConfigError(f"attn_norm_num_groups must equal norm_num_groups ({c['norm_num_groups']}), got "
                          f"{c['attn_norm_num_groups']}: every cvformers attention layer starts with a GroupNorm")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"cvformers' U-Net is square; sample_size {list(size)} is not")
        size = size[0]
    if size is None:
        raise ConfigError("the diffusers config has no sample_size")
    if c["out_channels"] != c["in_channels"]:
        raise ConfigError(f"cvformers' U-Net outputs as many channels as it reads; in_channels {c['in_channels']} "
                          f"!= out_channels {c['out_channels']}")
    widths = tuple(c["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths):
        raise ConfigError(f"block_out_channels {list(widths)} must all be multiples of the first (our base_channels)")
    if c["time_embedding_dim"] not in (None, 4 * base):
        raise ConfigError(f"time_embedding_dim {c['time_embedding_dim']} must be 4 x block_out_channels[0] = {4 * base}")
    down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
    if len(down) != len(widths) or len(up) != len(widths):
        raise ConfigError("down_block_types, up_block_types and block_out_channels must have one entry per level")
    for name, table in (("down_block_types", _DOWN), ("up_block_types", _UP)):
        for kind in c[name]:
            if kind not in table:
                raise ConfigError(f"diffusers block {kind!r} has no cvformers counterpart (known: {', '.join(table)})")
    attn = [_DOWN[k] for k in down]
    if attn != [_UP[k] for k in reversed(up)]:
        raise ConfigError(f"attention must sit at mirrored levels: down {list(down)} vs up {list(up)}")
    head_dim = c["attention_head_dim"]
    attn_widths = {w for w, a in zip(widths, attn) if a} | {widths[-1]}  # the middle always has attention
    heads = {w // (head_dim or w) for w in attn_widths}
    if len(heads) != 1 or any(w % (head_dim or w) for w in attn_widths):
        raise ConfigError(f"attention_head_dim {head_dim} gives a different head count at widths {sorted(attn_widths)}; "
                          "cvformers uses one head count everywhere")
    sides = [size // 2**i for i in range(len(widths))]
    n_class = c["num_class_embeds"] or 0
    if n_class == 1:
        raise ConfigError("num_class_embeds 1 leaves no class besides cvformers' 'no label' row")
    return UNetConfig(
        image_size=size, in_channels=c["in_channels"], base_channels=base,
        channel_mults=tuple(w // base for w in widths), num_res_blocks=c["layers_per_block"],
        attention_resolutions=tuple(s for s, a in zip(sides, attn) if a), heads=heads.pop(),
        dropout=c["dropout"], num_classes=max(n_class - 1, 0), groups=c["norm_num_groups"], norm_eps=c["norm_eps"],
    )


def _res_keys(ours: str, theirs: str) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
             "conv2": "conv2", "skip": "conv_shortcut"}
    return {f"{ours}.{a}.{p}": f"{theirs}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def _attn(sd: Mapping[str, torch.Tensor], ours: str, theirs: str) -> dict[str, torch.Tensor]:
    def w(name: str, p: str) -> torch.Tensor:
        return sd[f"{theirs}.{name}.{p}"]

    out = {f"{ours}.norm.{p}": w("group_norm", p) for p in ("weight", "bias")}
    out[f"{ours}.qkv.weight"] = torch.cat([w(n, "weight") for n in ("to_q", "to_k", "to_v")])[:, :, None, None]
    out[f"{ours}.qkv.bias"] = torch.cat([w(n, "bias") for n in ("to_q", "to_k", "to_v")])
    out[f"{ours}.proj.weight"] = w("to_out.0", "weight")[:, :, None, None]
    out[f"{ours}.proj.bias"] = w("to_out.0", "bias")
    return out


def convert_diffusers_state_dict(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DModel`` state dict renamed (and q/k/v fused) to the keys of ``UNet(cfg)``."""
    renames = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "input_conv": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
               "label_embed": "class_embedding"}
    pairs = {f"{a}.{p}": f"{b}.{p}" for a, b in renames.items() for p in ("weight", "bias")}
    out: dict[str, torch.Tensor] = {}
    levels = len(cfg.channel_mults)
    for i, side in enumerate(cfg.sides):
        for j in range(cfg.num_res_blocks):
            pairs |= _res_keys(f"down.{i}.blocks.{j}.res", f"down_blocks.{i}.resnets.{j}")
            if side in cfg.attention_resolutions:
                out |= _attn(sd, f"down.{i}.blocks.{j}.attn", f"down_blocks.{i}.attentions.{j}")
        pairs |= {f"down.{i}.resample.conv.{p}": f"down_blocks.{i}.downsamplers.0.conv.{p}" for p in ("weight", "bias")}
    pairs |= _res_keys("middle.res1", "mid_block.resnets.0") | _res_keys("middle.res2", "mid_block.resnets.1")
    out |= _attn(sd, "middle.attn", "mid_block.attentions.0")
    for i in range(levels):  # both count the up path deepest level first
        side = cfg.sides[levels - 1 - i]
        for j in range(cfg.num_res_blocks + 1):
            pairs |= _res_keys(f"up.{i}.blocks.{j}.res", f"up_blocks.{i}.resnets.{j}")
            if side in cfg.attention_resolutions:
                out |= _attn(sd, f"up.{i}.blocks.{j}.attn", f"up_blocks.{i}.attentions.{j}")
        pairs |= {f"up.{i}.resample.conv.{p}": f"up_blocks.{i}.upsamplers.0.conv.{p}" for p in ("weight", "bias")}
    out |= {ours: sd[theirs] for ours, theirs in pairs.items() if theirs in sd}
    return out


def from_diffusers_unet(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> UNet:
    """cvformers' ``UNet`` holding the weights of a diffusers ``UNet2DModel`` (its ``state_dict()`` and
    ``config``); the two give the same output for the same input, timestep and class label."""
    cfg = unet_config_from_diffusers(config)
    unet = UNet(cfg)
    converted = convert_diffusers_state_dict(state_dict, cfg)
    missing = sorted(set(unet.state_dict()) - set(converted))
    if missing:  # a key we expect that diffusers did not have: the layouts differ after all
        raise ConfigError(f"the diffusers state dict lacks weights for {missing[:3]} (and {max(len(missing) - 3, 0)} more)")
    left = sum(v.numel() for v in state_dict.values()) - sum(v.numel() for v in converted.values())
    if left:  # weights of a layer we do not have would be dropped silently
        raise ConfigError(f"{left} diffusers weights have no place in cvformers' U-Net")
    unet.load_state_dict(converted, strict=True)
    return unet


__all__ = ["convert_diffusers_state_dict", "from_diffusers_unet", "unet_config_from_diffusers"]
