"""The sparse attention patterns: fast path == dense reference, locality, KV-cache decode."""

import pytest
import torch

from cvformers.nn.attention import PATTERNS, build_pattern, dense_attention, paper_schedule
from cvformers.nn.transformer import KVCache, SelfAttention



# (text_len, grid_h, grid_w, conv kernel): square and non-square grids, 1-token text, 1-row grid,
# kernels smaller and larger than the grid
SHAPES = [(3, 4, 4, 3), (5, 3, 6, 3), (1, 5, 5, 5), (4, 1, 3, 3), (6, 8, 8, 11), (2, 7, 5, 5)]


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_path_equals_dense_reference(name, shape):
    T, H, W, kernel = shape
    pattern = build_pattern(name, T, H, W, conv_kernel=kernel)
    g = torch.Generator().manual_seed(hash((name, shape)) % 2**31)
    q, k, v = torch.randn(3, 2, 3, pattern.seq_len, 8, generator=g).unbind(0)
    ref = dense_attention(q, k, v, pattern.dense_mask())
    for path in ("blocked", "dense", "auto"):
        torch.testing.assert_close(pattern.attend(q, k, v, path=path), ref, atol=1e-5, rtol=0)


def test_masks_match_the_paper_definitions():
    T, H, W = 2, 4, 4
    S = T + H * W

    def img(r, c):
        return T + r * W + c

    row = build_pattern("row", T, H, W).dense_mask()
    col = build_pattern("column", T, H, W).dense_mask()
    conv = build_pattern("conv", T, H, W, conv_kernel=3).dense_mask()
    full = build_pattern("full", T, H, W).dense_mask()
    assert torch.equal(full, torch.ones(S, S, dtype=torch.bool).tril())
    for m in (row, col, conv, full):
        assert torch.equal(m[:T, :T], torch.ones(T, T, dtype=torch.bool).tril())  # text: causal text
        assert not m[:T, T:].any()  # text never sees the image
        assert m[T:, :T].all()  # every image token sees all text
        assert not m.triu(1).any()  # causal
    q = img(2, 1)
    # row: the previous W tokens in raster order and itself
    assert row[q, T:].nonzero().flatten().tolist() == list(range(q - W - T, q - T + 1))
    # column: own column in earlier rows and itself
    assert col[q, T:].nonzero().flatten().tolist() == [img(r, 1) - T for r in range(3)]
    # conv 3x3: earlier tokens of the 3x3 neighbourhood centred on (2,1)
    want = [img(1, 0), img(1, 1), img(1, 2), img(2, 0), img(2, 1)]
    assert conv[q, T:].nonzero().flatten().tolist() == [w - T for w in want]


def test_paper_schedule():
    s = paper_schedule(8)
    assert s == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    assert paper_schedule(64).count("conv") == 1 and paper_schedule(64)[-1] == "conv"


@pytest.mark.parametrize("name", PATTERNS)
def test_output_depends_exactly_on_the_pattern(name):
    """Perturb one input token: a query's output moves iff that token is in its pattern."""
    torch.manual_seed(0)
    T, H, W = 3, 4, 5
    pattern = build_pattern(name, T, H, W, conv_kernel=3)
    pattern.blocked_pays = lambda: True  # hold the blocked path itself to the pattern, on any grid
    attn = SelfAttention(16, 2, 8, pattern).eval()
    x = torch.randn(1, pattern.seq_len, 16)
    mask = pattern.dense_mask()
    with torch.no_grad():
        base = attn(x)
        for j in range(pattern.seq_len):
            x2 = x.clone()
            x2[0, j] += 1.0
            changed = (attn(x2) - base).abs().amax(-1)[0] > 1e-6
            assert torch.equal(changed, mask[:, j]), f"token {j}"


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("shape", [(3, 4, 4, 3), (2, 3, 5, 5)])
def test_kv_cache_decode_reproduces_full_forward(name, shape):
    T, H, W, kernel = shape
    torch.manual_seed(1)
    pattern = build_pattern(name, T, H, W, conv_kernel=kernel)
    pattern.blocked_pays = lambda: True
    attn = SelfAttention(16, 2, 8, pattern).eval()
    x = torch.randn(2, pattern.seq_len, 16)
    with torch.no_grad():
        full = attn(x)
        # token by token from the first position
        cache = KVCache.empty(2, 2, pattern.seq_len, 8)
        steps = torch.cat([attn(x[:, p : p + 1], cache, p) for p in range(pattern.seq_len)], 1)
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
        # prefill the text alone (plain causal attention over the caption), then decode the rest
        cache = KVCache.empty(2, 2, pattern.seq_len, 8)
        pre = attn(x[:, :T], cache, 0)
        rest = [attn(x[:, p : p + 1], cache, p) for p in range(T, pattern.seq_len)]
        torch.testing.assert_close(torch.cat([pre, *rest], 1), full, atol=1e-5, rtol=0)
        # prefill the text and two image rows, then decode the rest
        start = T + 2 * W
        cache = KVCache.empty(2, 2, pattern.seq_len, 8)
        pre = attn(x[:, :start], cache, 0)
        rest = [attn(x[:, p : p + 1], cache, p) for p in range(start, pattern.seq_len)]
        torch.testing.assert_close(torch.cat([pre, *rest], 1), full, atol=1e-5, rtol=0)


def test_decode_reads_only_the_window():
    pattern = build_pattern("row", 4, 8, 8)
    slots, valid = pattern.decode_index()
    assert slots.shape[1] == 4 + 8 + 1  # text + previous W + itself, not the whole sequence
    pos = pattern.seq_len - 1
    assert slots[pos][valid[pos]].tolist() == [0, 1, 2, 3] + list(range(pos - 8, pos + 1))


@pytest.mark.parametrize("name", ["row", "conv"])
@pytest.mark.parametrize("rows_per_block", [1, 2, 3, 4])
def test_row_blocks_of_several_rows_equal_dense(name, rows_per_block):
    """Query blocks of 1-4 grid rows (4 does not divide 6: falls back to 1), values and gradients."""
    pattern = build_pattern(name, 3, 6, 4, conv_kernel=5)
    pattern.rows_per_block = rows_per_block
    g = torch.Generator().manual_seed(rows_per_block)
    q, k, v = (torch.randn(2, 2, pattern.seq_len, 8, generator=g).requires_grad_() for _ in range(3))
    fast = pattern.attend(q, k, v, path="blocked")
    ref = dense_attention(q, k, v, pattern.dense_mask())
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    for a, b in zip(torch.autograd.grad(fast.square().sum(), (q, k, v)),
                    torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_gradients_match_dense():
    torch.manual_seed(2)
    pattern = build_pattern("conv", 3, 5, 5, conv_kernel=3)
    q, k, v = (torch.randn(1, 2, pattern.seq_len, 8, requires_grad=True) for _ in range(3))
    g_fast = torch.autograd.grad(pattern.attend(q, k, v, path="blocked").square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(dense_attention(q, k, v, pattern.dense_mask()).square().sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bad_pattern_names():
    with pytest.raises(ValueError, match="unknown attention pattern"):
        build_pattern("diagonal", 2, 4)
    with pytest.raises(ValueError, match="odd"):
        build_pattern("conv", 2, 4, conv_kernel=4)


def test_auto_path_takes_the_blocked_path_where_it_pays():
    assert build_pattern("row", 64, 32, 32).blocked_pays()
    assert build_pattern("column", 256, 32, 32).blocked_pays()
    assert not build_pattern("conv", 64, 16, 16, conv_kernel=11).blocked_pays()  # the window is most of it
