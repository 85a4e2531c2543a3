"""Tests of common/losses.py against the naive full-logits computation (CPU, fast)."""

import os
import sys

import pytest
import torch
from torch import nn

from common import losses
from common.losses import sequence_logprobs, token_logprobs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from bench_logprobs import LiveBytes  # noqa: E402  (the benchmark's tracker, tested here)


def naive_logprobs(hidden, weight, targets):
    logits = hidden @ weight.T  # (N, V)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)


def make(N, d, V, dtype=torch.float32, seed=0):
    """Inputs with a realistic logit scale (std 2), where fp32 rounding of either path is << 1e-5."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(V, d, generator=gen, dtype=dtype) * 2 * d**-0.5).requires_grad_()
    t = torch.randint(V, (N,), generator=gen)
    g = torch.randn(N, generator=gen, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return h, w, t, g


def value_and_grads(fn, h, w, t, g, *args, **kwargs):
    lp = fn(h, w, t, *args, **kwargs)
    return (lp, *torch.autograd.grad(lp, (h, w), g))


# --- token_logprobs ---

@pytest.mark.parametrize("N, d, V, chunk_rows, chunk_cols", [
    (1, 8, 11, None, None),  # one tile
    (37, 16, 100, 5, None),  # row chunks only, N not divisible by 5
    (37, 16, 100, None, 7),  # vocab blocks only, V not divisible by 7
    (64, 32, 1000, 16, 128),  # 4 x 8 tiles
    (100, 8, 257, 30, 64),  # ragged tiles in both directions (4 x 5)
    (300, 16, 3000, None, None),  # default tiling
])
def test_token_logprobs_matches_naive(N, d, V, chunk_rows, chunk_cols):
    h, w, t, g = make(N, d, V)
    ours = value_and_grads(token_logprobs, h, w, t, g, chunk_rows=chunk_rows, chunk_cols=chunk_cols)
    ref = value_and_grads(naive_logprobs, h, w, t, g)
    assert ours[0].dtype == torch.float32 and ours[0].shape == (N,)
    for name, a, b in zip(("logp", "grad_hidden", "grad_weight"), ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_default_tiles_fit_the_budget():
    assert losses._tile(1024, 151936, 4, losses.CHUNK_BYTES) == (1024, 16384)  # Qwen2.5 head: all rows
    assert losses._tile(1024, 151936, 4, losses.CPU_CHUNK_BYTES) == (1024, 4096)
    for N, V, bpl in [(1, 151936, 4), (100_000, 151936, 4), (4096, 32000, 6), (500, 300, 4), (0, 10, 4)]:
        for budget in (losses.CHUNK_BYTES, losses.CPU_CHUNK_BYTES):
            rows, cols = losses._tile(N, V, bpl, budget)
            assert rows * cols * bpl <= budget and 1 <= rows <= max(N, 1) and 1 <= cols <= V
            assert rows == max(N, 1) or cols >= losses.MIN_CHUNK_COLS


def test_token_logprobs_empty():
    h, w, t, g = make(0, 8, 13)
    lp, gh, gw = value_and_grads(token_logprobs, h, w, t, g)
    assert lp.shape == (0,) and gh.shape == (0, 8)
    assert torch.equal(gw, torch.zeros(13, 8))


def test_token_logprobs_gradcheck_float64():
    h, w, t, _ = make(7, 3, 5, dtype=torch.float64)
    assert token_logprobs(h, w, t, chunk_rows=3).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda h, w: token_logprobs(h, w, t, chunk_rows=3, chunk_cols=2), (h, w))


def test_token_logprobs_one_input_needs_grad():
    h, w, t, g = make(20, 8, 30)
    ref = value_and_grads(naive_logprobs, h, w, t, g)
    (gh,) = torch.autograd.grad(token_logprobs(h, w.detach(), t, chunk_rows=6, chunk_cols=7), (h,), g)
    (gw,) = torch.autograd.grad(token_logprobs(h.detach(), w, t, chunk_rows=6, chunk_cols=7), (w,), g)
    torch.testing.assert_close(gh, ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ref[2], atol=1e-5, rtol=1e-5)


def test_token_logprobs_deterministic():
    h, w, t, g = make(50, 16, 200)
    a = value_and_grads(token_logprobs, h, w, t, g, chunk_rows=16, chunk_cols=64)
    b = value_and_grads(token_logprobs, h, w, t, g, chunk_rows=16, chunk_cols=64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_token_logprobs_bf16_inputs():
    h, w, t, g = make(40, 16, 64)
    hb, wb = (x.detach().bfloat16().requires_grad_() for x in (h, w))
    lp, gh, gw = value_and_grads(token_logprobs, hb, wb, t, g, chunk_rows=16, chunk_cols=16)
    assert lp.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # reference: fp32 math on the same (bf16-representable) inputs; only matmul rounding differs
    ref = value_and_grads(naive_logprobs, *(x.detach().float().requires_grad_() for x in (hb, wb)), t, g)
    for a, b in zip((lp, gh, gw), ref):
        torch.testing.assert_close(a.float(), b, atol=0.1, rtol=0.02)


def test_token_logprobs_under_autocast():
    h, w, t, g = make(40, 16, 64)
    ref = value_and_grads(naive_logprobs, h, w, t, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, gh, gw = value_and_grads(token_logprobs, h, w, t, g, chunk_rows=16, chunk_cols=16)
    assert lp.dtype == gh.dtype == gw.dtype == torch.float32  # grads in the dtypes of the inputs
    assert not torch.equal(lp, ref[0])  # the matmuls did run in bf16
    for a, b in zip((lp, gh, gw), ref):
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("h_shape, w_shape, t_shape, t_dtype", [
    ((4, 8), (10, 7), (4,), torch.long),  # d mismatch
    ((4, 8), (10, 8), (5,), torch.long),  # N mismatch
    ((4, 8), (10, 8), (4,), torch.float32),  # targets not long
    ((2, 4, 8), (10, 8), (4,), torch.long),  # hidden not 2-D
])
def test_token_logprobs_bad_input(h_shape, w_shape, t_shape, t_dtype):
    with pytest.raises(ValueError, match="token_logprobs: expected hidden"):
        token_logprobs(torch.randn(h_shape), torch.randn(w_shape), torch.zeros(t_shape, dtype=t_dtype))


# --- memory: live tensor bytes counted at the dispatcher (bench/bench_logprobs.py's LiveBytes) ---

def test_live_bytes_tracker_counts_and_releases():
    with LiveBytes() as m:
        x = torch.empty(1000)  # 4000 bytes
        y = x[10:].mul_(2)  # view + in-place: nothing new
        z = x + 1  # 4000 more
        del x, y, z
        torch.empty(250)  # 1000 bytes, freed at once
    assert (m.peak, m.live) == (8000, 0)


def extra_peak_bytes(fn, h, w, t, g, **kwargs):
    """Peak live bytes of forward + backward, above the two returned gradients."""
    with LiveBytes() as m:
        lp = fn(h, w, t, **kwargs)
        grads = torch.autograd.grad(lp, (h, w), g)
        del lp
    return m.peak - sum(x.numel() * x.element_size() for x in grads)


def test_memory_far_below_naive(monkeypatch):
    N, d, V = 256, 64, 32768
    h, w, t, g = make(N, d, V)
    naive = extra_peak_bytes(naive_logprobs, h, w, t, g)
    monkeypatch.setattr(losses, "CPU_CHUNK_BYTES", 2**20)  # default tiling under a 1 MiB budget: 128 x 2048 tiles
    ours = extra_peak_bytes(token_logprobs, h, w, t, g)
    assert naive >= 2 * N * V * 4  # the tracker sees the (N, V) logits and their log_softmax
    assert ours <= 0.1 * naive, (ours, naive)


# --- sequence_logprobs ---

class TinyLM(nn.Module):
    """Stand-in with the two members sequence_logprobs uses; causal, honours attention_mask."""

    def __init__(self, V=50, d=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.mix, self.norm = nn.Embedding(V, d), nn.Linear(d, d), nn.LayerNorm(d)
        nn.init.normal_(self.emb.weight, std=0.5)  # logits of std ~2

    def hidden_states(self, input_ids, attention_mask=None, lora=None):
        x = self.emb(input_ids)  # (B, T, d)
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        m = m[..., None].float()  # (B, T, 1)
        x = (x * m).cumsum(1) / m.cumsum(1).clamp(min=1)  # causal mean over attended positions
        return self.norm(torch.tanh(self.mix(x)) + x)  # (B, T, d)

    @property
    def lm_head_weight(self):
        return self.emb.weight  # (V, d), tied


def ragged_batch(V=50, pad=0, seed=1):
    """Left-padded prompts + right-padded responses; returns ids, attention_mask, response_mask."""
    gen = torch.Generator().manual_seed(seed)
    lens = [(3, 4), (5, 1), (1, 6)]  # (prompt, response) lengths
    T = max(p for p, _ in lens) + max(r for _, r in lens)
    ids = torch.full((len(lens), T), pad)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    P = max(p for p, _ in lens)
    for b, (p, r) in enumerate(lens):
        ids[b, P - p: P + r] = torch.randint(1, V, (p + r,), generator=gen)
        attn[b, P - p: P + r] = 1
        resp[b, P: P + r] = 1
    return ids, attn, resp


def naive_sequence_logprobs(model, ids, attn, resp):
    logits = model.hidden_states(ids, attn) @ model.lm_head_weight.T  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    logp = nn.functional.pad(logp * resp[:, 1:], (1, 0))  # (B, T)
    return logp, logp.sum(1)


def test_sequence_logprobs_matches_naive():
    model = TinyLM()
    ids, attn, resp = ragged_batch()
    tok, summed = sequence_logprobs(model, ids, attn, resp)
    tok_ref, summed_ref = naive_sequence_logprobs(model, ids, attn, resp)
    assert tok.dtype == torch.float32 and tok.shape == ids.shape and summed.shape == (3,)
    torch.testing.assert_close(tok, tok_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summed, summed_ref, atol=1e-5, rtol=1e-5)
    params = list(model.parameters())
    weights, token_weights = torch.tensor([0.3, -1.2, 0.7]), torch.randn(ids.shape)
    grads = torch.autograd.grad((summed * weights).sum() + (tok * token_weights).sum(), params)
    grads_ref = torch.autograd.grad((summed_ref * weights).sum() + (tok_ref * token_weights).sum(), params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_masked_positions():
    model = TinyLM()
    ids, attn, resp = ragged_batch()
    tok, _ = sequence_logprobs(model, ids, attn, resp)
    masked = resp == 0
    assert torch.all(tok[masked] == 0) and torch.all(tok[~masked] < 0)
    # a loss on masked positions only has exactly zero gradient
    noise = torch.randn(ids.shape) * masked
    grads = torch.autograd.grad((tok * noise).sum(), list(model.parameters()), allow_unused=True)
    assert all(gr is None or torch.count_nonzero(gr) == 0 for gr in grads)
    # padding token ids do not matter (right padding is never scored; left padding is not attended)
    ids2 = torch.where(attn.bool(), ids, torch.randint_like(ids, 1, 50))
    tok2, _ = sequence_logprobs(model, ids2, attn, resp)
    assert torch.equal(tok, tok2)


def test_sequence_logprobs_bad_input():
    model = TinyLM()
    ids, attn, resp = ragged_batch()
    bad = resp.clone()
    bad[0, 0] = 1
    with pytest.raises(ValueError, match=r"response_mask\[:, 0\]"):
        sequence_logprobs(model, ids, attn, bad)
    with pytest.raises(ValueError, match="sequence_logprobs: expected"):
        sequence_logprobs(model, ids, attn, resp[:, 1:])


def test_sequence_logprobs_no_response_tokens():
    model = TinyLM()
    ids, attn, resp = ragged_batch()
    tok, summed = sequence_logprobs(model, ids, None, torch.zeros_like(resp))
    assert torch.equal(tok, torch.zeros(ids.shape)) and torch.equal(summed, torch.zeros(3))
    summed.sum().backward()  # still differentiable (an empty token_logprobs call)
