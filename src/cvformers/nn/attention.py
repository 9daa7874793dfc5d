"""Causal self-attention over [text | image] with DALL-E's sparse patterns (appendix B.1, Fig. 11).

The sequence is ``T`` text tokens followed by an ``H×W`` grid of image tokens in raster order.
Every pattern is causal, text attends to earlier text, and every image token attends to *all*
text tokens plus (after Child et al. 2019, "Generating long sequences with sparse transformers"):

- ``row``:    the previous ``W`` image tokens in raster order and itself (the "local" pattern);
- ``column``: the image tokens of its own column in earlier rows, and itself;
- ``conv``:   the earlier image tokens inside the ``k×k`` neighbourhood centred on it;
- ``full``:   every earlier token (the dense baseline).

One ``AttentionPattern`` object does three jobs (docs/design.md):

1. ``dense_mask()`` builds the boolean ``[S, S]`` mask — the reference the tests hold the rest to;
2. ``attend(q, k, v)`` is the training fast path, whose cost grows with text + window, not with
   ``S``: row and conv cut the image queries into grid rows that see the text plus the few grid
   rows they can reach; column transposes the grid so each column is a short causal sequence;
   full is plain causal SDPA;
3. ``decode_attend(q, k_cache, v_cache, pos)`` is one KV-cache sampling step on [B·heads, ·, d]
   views (the query already scaled by 1/sqrt(d)): the query at ``pos``
   reads only its pattern's slots, as a few views of the cache (text + window rows; a strided
   column) — no gather, no mask built per step. ``decode_index()`` lists the same slots from the
   dense mask, the generic fallback.

All index tensors and small masks are built once per device and cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

PATTERNS = ("full", "row", "column", "conv")


def paper_schedule(depth: int) -> list[str]:
    """DALL-E appendix B.1: layer i (1-based) is column when (i - 2) % 4 == 0, else row; last is conv."""
    names = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, depth + 1)]
    names[-1] = "conv"
    return names


# --- patterns ---------------------------------------------------------------------------


class AttentionPattern:
    """Which earlier tokens each token of [text (T) | image (H×W raster)] may attend to."""

    name = "base"

    def __init__(self, text_len: int, grid_h: int, grid_w: int):
        if text_len < 1:
            raise ValueError("attention patterns need at least one text token (image rows attend to it)")
        self.text_len, self.grid_h, self.grid_w = text_len, grid_h, grid_w
        self.seq_len = text_len + grid_h * grid_w
        self._cache: dict = {}

    # The one place a pattern is defined: may image query (qr, qc) see earlier image key (kr, kc)?
    # Arguments are broadcastable integer tensors; qi/ki are raster indices. Causality is applied
    # by the caller, so this only says what the pattern adds to "earlier".
    def image_allowed(self, qr, qc, kr, kc, qi, ki) -> torch.Tensor:
        raise NotImplementedError

    def _cached(self, key, device, build):
        k = (key, str(device))
        if k not in self._cache:
            self._cache[k] = build()
        return self._cache[k]

    def _additive(self, key, bool_mask: torch.Tensor, dtype) -> torch.Tensor:
        """The cached 0 / -inf float version of a boolean mask (SDPA converts bool masks on every call)."""
        return self._cached((key, "additive", dtype), bool_mask.device, lambda: torch.zeros(
            bool_mask.shape, dtype=dtype, device=bool_mask.device).masked_fill(~bool_mask, float("-inf")))

    # (a) the reference ---------------------------------------------------------------------
    def dense_mask(self, device=None) -> torch.Tensor:
        """Boolean [S, S]; True where query (row) may attend to key (column)."""

        def build():
            T, W = self.text_len, self.grid_w
            i = torch.arange(self.seq_len, device=device)[:, None]
            j = torch.arange(self.seq_len, device=device)[None, :]
            causal = j <= i
            key_text = j < T
            qi, ki = (i - T).clamp(min=0), (j - T).clamp(min=0)
            image_image = self.image_allowed(qi // W, qi % W, ki // W, ki % W, qi, ki)
            # text queries: causal over text; image queries: all text + the pattern over the image
            return causal & (key_text | ((i >= T) & image_image))

        return self._cached("dense", device, build)

    # (b) the fast training path ------------------------------------------------------------
    def block_keys(self) -> int:
        """Keys each image query block reads on the blocked path (text included)."""
        raise NotImplementedError

    def blocked_pays(self) -> bool:
        """Blocked costs ~2·N·keys (gather + attention), masked dense ~S²: use it when clearly cheaper.

        On small grids a wide window (e.g. an 11x11 conv on 16x16) reaches most of the sequence anyway.
        """
        return 4 * (self.seq_len - self.text_len) * self.block_keys() < self.seq_len**2

    def attend(self, q, k, v, dropout_p: float = 0.0, path: str = "auto") -> torch.Tensor:
        """q, k, v: [B, heads, S, d] for the whole sequence -> [B, heads, S, d].

        ``path``: "blocked" (text + window per query block), "dense" (SDPA with the cached dense
        mask), or "auto" = blocked when ``blocked_pays()``.
        """
        if path == "dense" or (path == "auto" and not self.blocked_pays()):
            mask = self._additive("dense", self.dense_mask(q.device), q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        # split, not slices: the backward of a split is one cat, a slice's is a zero-filled full buffer
        sizes = [self.text_len, self.seq_len - self.text_len]
        (q_text, q_img), (k_text, _), (v_text, _) = (t.split(sizes, dim=2) for t in (q, k, v))
        text = F.scaled_dot_product_attention(q_text, k_text, v_text, dropout_p=dropout_p, is_causal=True)
        return torch.cat([text, self._attend_image(q_img, k, v, dropout_p)], dim=2)

    def _attend_image(self, q_img, k, v, dropout_p):
        """Image queries [B, heads, H·W, d] against the whole k, v [B, heads, S, d] -> [B, heads, H·W, d]."""
        raise NotImplementedError

    def _blocked(self, q_blocks, k, v, index, mask, dropout_p, edge: int = 0):
        """SDPA of query blocks [B, heads, nb, Lq, d] against keys gathered by ``index`` [nb, Lk].

        One ``index_select`` builds every block's keys (text included) in one copy, and its backward
        is one scatter-add. Slots a query may not see (e.g. rows above the grid) point anywhere and
        are masked. Tensors are 4-D so SDPA stays on its fused kernels (5-D falls back to math).
        ``mask`` is [1, nb, Lq, Lk]; blocks from ``edge`` on share the last block's mask, and SDPA
        runs several times faster with one mask broadcast over blocks, so they get their own call.
        """
        B, nh, nb, Lq, d = q_blocks.shape
        S, Lk = k.shape[2], index.shape[1]
        # on a 3-D [B·heads, S, d] view index_select copies whole rows (several times faster than on 4-D)
        k3, v3 = k.reshape(B * nh, S, d), v.reshape(B * nh, S, d)
        q_blocks = q_blocks.reshape(B * nh, nb, Lq, d)
        parts = [(0, edge, mask[:, :edge]), (edge, nb, mask[:, -1:])] if 0 < edge < nb else [(0, nb, mask)]
        outs = []
        for start, end, m in parts:  # at most two calls: edge blocks, then the rest
            idx = index[start:end].flatten()
            kb = k3.index_select(1, idx).view(B * nh, end - start, Lk, d)
            vb = v3.index_select(1, idx).view(B * nh, end - start, Lk, d)
            qb = q_blocks if len(parts) == 1 else q_blocks[:, start:end]
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, dropout_p=dropout_p))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.view(B, nh, nb, Lq, d)

    # (c) the KV-cache decode step ----------------------------------------------------------
    def decode_index(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [S, L], valid [S, L]): the cache slots query ``pos`` reads, padded to L = max count."""

        def build():
            mask = self.dense_mask(device)
            counts = mask.sum(1)
            width = int(counts.max())
            # stable sort puts allowed slots first, in increasing order
            order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
            valid = torch.arange(width, device=device)[None, :] < counts[:, None]
            return order.contiguous(), valid.contiguous()

        return self._cached("decode", device, build)

    def decode_slices(self, pos: int) -> list[slice] | None:
        """The slots of ``pos`` as a few (strided) slices of the cache, when the pattern has them."""
        return None

    def decode_attend(self, q, k_cache, v_cache, pos: int) -> torch.Tensor:
        """One query at ``pos`` against a cache filled up to ``pos``.

        q: [B·heads, 1, d], already multiplied by 1/sqrt(d); k_cache, v_cache: [B·heads, S, d].
        Returns [B·heads, 1, d].
        """
        if pos < self.text_len:  # text: every earlier text slot
            return attend_slices(q, k_cache, v_cache, [slice(0, pos + 1)])
        slices = self.decode_slices(pos)
        if slices is not None:
            return attend_slices(q, k_cache, v_cache, slices)
        slots, valid = self.decode_index(q.device)
        bias = self._additive("decode", valid, q.dtype)
        k = k_cache.index_select(1, slots[pos])
        v = v_cache.index_select(1, slots[pos])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[pos, None], scale=1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(text={self.text_len}, grid={self.grid_h}x{self.grid_w})"


def attend_slices(q, k_cache, v_cache, slices: list[slice], bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B·heads, 1, d] (pre-scaled) over the cache slots named by a few slices.

    The caches are [B·heads, S, d]; reading views of them (scores per slice, one softmax, weighted
    sums per slice) moves less memory per decode step than gathering the slots into a new tensor
    for SDPA, and a strided slice (a column) is still a BLAS matrix whose leading dimension is the
    stride, so 3-D ``bmm`` takes it without a copy. ``bias`` (additive, over all the slices' slots
    in order) masks slots inside a slice.
    """
    if len(slices) == 1:
        scores = torch.bmm(q, k_cache[:, slices[0]].transpose(1, 2))
    else:
        scores = torch.cat([torch.bmm(q, k_cache[:, sl].transpose(1, 2)) for sl in slices], dim=-1)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if len(slices) == 1:
        return torch.bmm(probs, v_cache[:, slices[0]])
    out, start = None, 0
    for sl in slices:
        values = v_cache[:, sl]
        n = values.shape[1]
        part = torch.bmm(probs[..., start : start + n], values)
        out = part if out is None else out.add_(part)
        start += n
    return out


class FullPattern(AttentionPattern):
    name = "full"

    def image_allowed(self, qr, qc, kr, kc, qi, ki):
        return torch.ones_like(qi * ki, dtype=torch.bool)

    def attend(self, q, k, v, dropout_p: float = 0.0, path: str = "auto"):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)

    def decode_attend(self, q, k_cache, v_cache, pos: int):
        # every earlier slot: one contiguous view, no gather and no mask
        return attend_slices(q, k_cache, v_cache, [slice(0, pos + 1)])


class _RowBlockedPattern(AttentionPattern):
    """Patterns whose image reach is the query's own grid row and the ``reach`` rows above.

    Fast path: the image queries of ``rows_per_block`` consecutive grid rows form one block; its
    keys are the T text keys plus the image keys of rows first-reach .. last, with one small static
    mask. Cost per query: about T + (reach + rows_per_block)·W keys instead of up to S.
    """

    reach = 1
    # Rows per query block: more rows gather the text keys fewer times and give SDPA longer blocks,
    # at the price of more masked-out keys per query (rows_per_block - 1 rows of them). Two rows
    # against one at a 32x32 grid with 64 text tokens: conv 1.3x -> 1.9x of dense, row level
    # (benchmarks/attention_scaling.py --rows-per-block 1 2); a grid whose row count it does not
    # divide falls back to one.
    rows_per_block = 2

    def _rows_per_block(self) -> int:
        b = self.rows_per_block
        return b if self.grid_h % b == 0 else 1

    def block_keys(self) -> int:
        return self.text_len + (self.reach + self._rows_per_block()) * self.grid_w

    def _block_keys(self, device):
        """(index [nb, T + (m+b)W] of each block's keys, additive mask [1, nb, b·W, T + (m+b)W])."""

        def build():
            T, H, W, m, b = self.text_len, self.grid_h, self.grid_w, self.reach, self._rows_per_block()
            nb = H // b
            ar = lambda n: torch.arange(n, device=device)  # noqa: E731
            # axes: block, query row in block, query column, key row in block, key column
            first = (ar(nb) * b)[:, None, None, None, None]
            qr = first + ar(b)[None, :, None, None, None]
            qc = ar(W)[None, None, :, None, None]
            kr = first - m + ar(m + b)[None, None, None, :, None]  # rows first-m .. first+b-1
            kc = ar(W)[None, None, None, None, :]
            qi, ki = qr * W + qc, kr * W + kc
            image = (kr >= 0) & (ki <= qi) & self.image_allowed(qr, qc, kr, kc, qi, ki)
            mask = torch.cat([torch.ones(nb, b * W, T, dtype=torch.bool, device=device),
                              image.reshape(nb, b * W, (m + b) * W)], dim=-1)
            text_slots = ar(T).expand(nb, T)
            image_slots = (T + ki.clamp(min=0))[:, 0, 0].reshape(nb, (m + b) * W)  # rows above the grid: masked
            return torch.cat([text_slots, image_slots], dim=1), mask[None]

        return self._cached(("block", self._rows_per_block()), device, build)

    def _attend_image(self, q_img, k, v, dropout_p):
        index, mask = self._block_keys(q_img.device)
        nb = index.shape[0]
        q = rearrange(q_img, "b n (nb l) d -> b n nb l d", nb=nb)
        # only the first blocks miss rows above them: the rest share one mask
        edge = -(-self.reach // self._rows_per_block())
        out = self._blocked(q, k, v, index, self._additive(("block", nb), mask, q.dtype), dropout_p, edge=edge)
        return rearrange(out, "b n nb l d -> b n (nb l) d")


class RowPattern(_RowBlockedPattern):
    """The previous W image tokens in raster order and itself (appendix B.1, Fig. 11a)."""

    name = "row"
    reach = 1

    def __init__(self, text_len, grid_h, grid_w):
        super().__init__(text_len, grid_h, grid_w)
        self.reach = min(1, grid_h - 1)

    def image_allowed(self, qr, qc, kr, kc, qi, ki):
        return qi - ki <= self.grid_w

    def decode_slices(self, pos: int) -> list[slice]:
        T = self.text_len
        return [slice(0, T), slice(max(T, pos - self.grid_w), pos + 1)]


class ConvPattern(_RowBlockedPattern):
    """Earlier image tokens inside the k×k neighbourhood centred on the query (Fig. 11d)."""

    name = "conv"

    def __init__(self, text_len, grid_h, grid_w, kernel: int = 11):
        super().__init__(text_len, grid_h, grid_w)
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"conv attention kernel must be odd and >= 1, got {kernel}")
        self.kernel = kernel
        self.reach = min(kernel // 2, grid_h - 1)

    def image_allowed(self, qr, qc, kr, kc, qi, ki):
        half = self.kernel // 2
        return ((qr - kr).abs() <= half) & ((qc - kc).abs() <= half)

    def _window_start(self, pos: int) -> int:
        return self.text_len + max(0, (pos - self.text_len) // self.grid_w - self.reach) * self.grid_w

    def _decode_bias(self, device, dtype):
        """[S, T + (reach+1)·W]: additive mask over text + the contiguous rows r-reach .. pos."""

        def build():
            T, S = self.text_len, self.seq_len
            width = T + (self.reach + 1) * self.grid_w
            table = torch.full((S, width), float("-inf"), dtype=dtype, device=device)
            mask = self.dense_mask(device)
            for pos in range(T, S):  # once per pattern, not per step
                start = self._window_start(pos)
                allowed = torch.cat([mask[pos, :T], mask[pos, start : pos + 1]])
                table[pos, : allowed.numel()] = torch.zeros_like(allowed, dtype=dtype).masked_fill(~allowed, float("-inf"))
            return table

        return self._cached(("decode_bias", dtype), device, build)

    def decode_attend(self, q, k_cache, v_cache, pos: int) -> torch.Tensor:
        if pos < self.text_len:
            return super().decode_attend(q, k_cache, v_cache, pos)
        # text + the rows r-reach .. r up to pos: two contiguous views, the columns masked by a bias
        start = self._window_start(pos)
        n = self.text_len + pos + 1 - start
        bias = self._decode_bias(q.device, q.dtype)[pos, :n]
        return attend_slices(q, k_cache, v_cache, [slice(0, self.text_len), slice(start, pos + 1)], bias)


class ColumnPattern(AttentionPattern):
    """Image tokens of its own column in earlier rows, and itself (Fig. 11b/c).

    Fast path (the paper's Fig. 11c trick): transpose the grid so that every column is a
    contiguous sequence of H tokens; each column is then plain causal attention + the text.
    """

    name = "column"

    def image_allowed(self, qr, qc, kr, kc, qi, ki):
        return qc == kc

    def decode_slices(self, pos: int) -> list[slice]:
        T, W = self.text_len, self.grid_w
        return [slice(0, T), slice(T + (pos - T) % W, pos + 1, W)]  # own column, rows 0 .. r

    def block_keys(self) -> int:
        return self.text_len + self.grid_h

    def _column_keys(self, device):
        """(index [W, T + H]: text then column c top to bottom, additive causal mask [1, 1, H, T + H])."""

        def build():
            T, H, W = self.text_len, self.grid_h, self.grid_w
            text_slots = torch.arange(T, device=device).expand(W, T)
            column_slots = T + torch.arange(W, device=device)[:, None] + W * torch.arange(H, device=device)[None, :]
            causal = torch.ones(H, H, dtype=torch.bool, device=device).tril()
            mask = torch.cat([torch.ones(H, T, dtype=torch.bool, device=device), causal], dim=1)
            return torch.cat([text_slots, column_slots], dim=1), mask[None, None]

        return self._cached("column", device, build)

    def _attend_image(self, q_img, k, v, dropout_p):
        index, mask = self._column_keys(q_img.device)
        q = rearrange(q_img, "b n (h w) d -> b n w h d", h=self.grid_h)
        out = self._blocked(q, k, v, index, self._additive("column", mask, q.dtype), dropout_p)
        return rearrange(out, "b n w h d -> b n (h w) d")


def build_pattern(name: str, text_len: int, grid_h: int, grid_w: int | None = None,
                  conv_kernel: int = 11) -> AttentionPattern:
    grid_w = grid_h if grid_w is None else grid_w
    if name == "full":
        return FullPattern(text_len, grid_h, grid_w)
    if name == "row":
        return RowPattern(text_len, grid_h, grid_w)
    if name == "column":
        return ColumnPattern(text_len, grid_h, grid_w)
    if name == "conv":
        return ConvPattern(text_len, grid_h, grid_w, conv_kernel)
    raise ValueError(f"unknown attention pattern {name!r}; known: {', '.join(PATTERNS)}")


def dense_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """The reference: SDPA over the whole sequence with the dense boolean mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_flops(pattern: AttentionPattern) -> int:
    """Number of (query, key) pairs the pattern allows: the useful work of one head."""
    return int(pattern.dense_mask().sum())
