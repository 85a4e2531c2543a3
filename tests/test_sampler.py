"""common/sampler.py against naive references: transformers' greedy generate, no-cache recomputation and sampled
frequencies vs the softmax. Tiny random models, CPU, fp32."""

import pytest
import torch
import torch.nn.functional as F

import common.model
from common.model import ModelConfig, Transformer, from_pretrained, linear
from common.sampler import filter_logits, generate, sample

PROMPTS = [[5, 9, 2, 7, 1, 3], [4], [8, 8, 6, 11], [3, 1, 4, 1, 5, 9, 2, 6, 5]]  # ragged


def tiny(model_type="llama", seed=0, vocab=64, **kw):
    torch.manual_seed(seed)
    cfg = dict(model_type=model_type, vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    if model_type == "gpt2":
        cfg.update(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    else:
        cfg.update(num_key_value_heads=2)
    cfg.update(kw)
    model = Transformer(ModelConfig(**cfg)).eval()
    with torch.no_grad():  # std 0.02 makes near-uniform logits; sharpen them so samples differ visibly
        model.norm.weight.mul_(25.0)
    return model


def gen(seed):
    return torch.Generator().manual_seed(seed)


def recompute_logps(model, prompts, ids, mask, **sampling):
    """Naive reference: for each row, no-cache forwards of the unpadded prompt + response prefix."""
    out = torch.zeros_like(mask)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            n = int(mask[b].sum())
            seq = torch.tensor([p + ids[b, :n].tolist()])
            logprobs = filter_logits(model(seq)[0, len(p) - 1:len(p) - 1 + n], **sampling)  # (n, V)
            out[b, :n] = logprobs.gather(-1, ids[b, :n, None])[:, 0]
    return out


@pytest.fixture(params=["F.linear", "skinny"])
def matmul_path(request, monkeypatch):
    """Runs a test twice: as is (tiny weights: every linear() is F.linear), and with linear()'s weight threshold
    at 0, so every decode-step projection takes the (W x^T)^T path that large models take."""
    if request.param == "skinny":
        monkeypatch.setattr(common.model, "LARGE_WEIGHT", 0)
    return request.param


# ---- parity with transformers -------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_greedy_matches_transformers_per_row(model_type, tmp_path, matmul_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       initializer_range=0.5)
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      initializer_range=0.5)
        hf = transformers.GPT2LMHeadModel(cfg)
    hf.eval().save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    ids, mask, logps = generate(ours, PROMPTS, 20, temperature=0.0)
    assert ids.shape == (len(PROMPTS), 20) and bool(mask.all()) and bool((logps == 0).all())
    for b, p in enumerate(PROMPTS):
        x = torch.tensor([p])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, pad_token_id=0, eos_token_id=95)
        assert ids[b].tolist() == ref[0, len(p):].tolist(), f"row {b}"
        alone, _, _ = generate(ours, [p], 20, temperature=0.0)   # the batch equals the row run alone
        assert alone[0].tolist() == ids[b].tolist()


# ---- KV cache vs recomputation ------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=10, top_p=0.9)])
def test_cached_logps_equal_recomputation(model_type, sampling, matmul_path):
    model = tiny(model_type)
    ids, mask, logps = generate(model, PROMPTS, 12, generator=gen(1), **sampling)
    ref = recompute_logps(model, PROMPTS, ids, mask, **sampling)
    torch.testing.assert_close(logps, ref, atol=1e-5, rtol=0)
    assert logps.dtype == torch.float32 and bool((logps[mask.bool()] <= 0).all()) and bool((logps < 0).any())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_dense_batch_without_mask_equals_recomputation(model_type, matmul_path):
    """Equal-length prompts take the unmasked path (causal prefill kernel, no mask in decode steps)."""
    model, dense = tiny(model_type), [[5, 9, 2, 7], [4, 4, 1, 0], [8, 8, 6, 11]]
    ids, mask, logps = generate(model, dense, 12, generator=gen(2))
    torch.testing.assert_close(logps, recompute_logps(model, dense, ids, mask), atol=1e-5, rtol=0)
    greedy, _, _ = generate(model, dense, 12, temperature=0.0)
    for b, p in enumerate(dense):   # each row equals itself inside a padded batch (the masked path)
        ragged, _, _ = generate(model, [p, [3]], 12, temperature=0.0)
        assert ragged[0].tolist() == greedy[b].tolist()


def test_top_k_1_equals_greedy():
    model = tiny()
    greedy = generate(model, PROMPTS, 10, temperature=0.0)[0]
    ids, _, logps = generate(model, PROMPTS, 10, top_k=1, generator=gen(3))
    assert torch.equal(ids, greedy) and bool((logps == 0).all())


def test_top_p_keeps_smallest_set_with_enough_mass():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()[None] + 3.0   # a constant shift must not matter
    for p, kept in [(0.4, [1]), (0.5, [1]), (0.75, [1, 3]), (0.81, [0, 1, 3]), (0.97, [0, 1, 2, 3])]:
        out = filter_logits(logits, top_p=p)[0].exp()
        assert torch.nonzero(out).flatten().tolist() == kept, p
        torch.testing.assert_close(out[kept], probs[kept] / probs[kept].sum())
    out = filter_logits(logits, top_k=2)[0].exp()   # top-k on the same vector
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8)


# ---- the decode-step matmul ----------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_F_linear_on_both_paths(bias, monkeypatch):
    """linear() against F.linear: 1, 8 and 64 rows (the (W x^T)^T path; F.linear is made to raise, so that path is
    proven taken), 65 rows and a small weight (F.linear itself); 2-D and 3-D inputs; O(1) values to 1e-5."""
    g = gen(0)
    big, small = torch.randn(1024, 512, generator=g), torch.randn(256, 512, generator=g)  # 2^19 and 2^17 entries
    b_big, b_small = (torch.randn(1024, generator=g), torch.randn(256, generator=g)) if bias else (None, None)
    inputs = [torch.randn(shape, generator=g) / 512 ** 0.5 for shape in [(1, 512), (8, 512), (4, 16, 512), (2, 1, 512)]]
    refs = [F.linear(x, big, b_big) for x in inputs]
    wide = torch.randn(65, 512, generator=g)
    ref_wide, ref_small = F.linear(wide, big, b_big), F.linear(inputs[1], small, b_small)

    def boom(*a, **k):
        raise AssertionError("F.linear called")
    with monkeypatch.context() as m:
        m.setattr(F, "linear", boom)
        for x, ref in zip(inputs, refs):
            y = linear(x, big, b_big)
            assert y.shape == ref.shape and y.is_contiguous()
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
        for x, w, bb in [(wide, big, b_big), (inputs[1], small, b_small)]:
            with pytest.raises(AssertionError, match="F.linear called"):
                linear(x, w, bb)
    torch.testing.assert_close(linear(wide, big, b_big), ref_wide, atol=0, rtol=0)
    torch.testing.assert_close(linear(inputs[1], small, b_small), ref_small, atol=0, rtol=0)


# ---- randomness ---------------------------------------------------------------------------------------

def test_sample_inverse_cdf_frequencies_and_removed_tokens():
    """sample() on a batch of identical rows: removed tokens (-inf, at both ends and inside) are never drawn,
    every other frequency is within 5 standard errors of its probability; a row with a single kept token (first
    or last in the vocabulary) always draws it; on a 151936-token uniform row the draw is the exact inverse CDF."""
    n = 40000
    logits = torch.tensor([float("-inf"), 0.3, 2.0, float("-inf"), -1.0, 1.2, float("-inf")])
    p = logits.softmax(-1).double()
    ids = sample(logits.log_softmax(-1).expand(n, -1), gen(3))
    assert ids.shape == (n,) and ids.dtype == torch.long
    freq = torch.bincount(ids, minlength=7).double() / n
    assert bool((freq[p == 0] == 0).all())
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 5 * se + 1e-9).all()), (freq, p)
    for keep in (0, 6):
        one = torch.full((100, 7), float("-inf"))
        one[:, keep] = 0.0
        assert bool((sample(one, gen(4)) == keep).all())
    V, rows = 151936, 64        # uniform over a Qwen-sized vocabulary: the draw must be floor(u * V) for its u
    ids = sample(torch.full((rows, V), -torch.log(torch.tensor(float(V)))), gen(5))
    u = torch.rand(rows, 1, generator=gen(5)).double()[:, 0]                 # the uniforms sample() drew
    assert (ids - (u * V).floor().long()).abs().max() <= 1, "not the inverse CDF"


def test_outputs_are_ordinary_tensors_usable_by_autograd():
    """generate runs under inference_mode but returns ordinary tensors: a training step can consume them."""
    model = tiny()
    ids, mask, logps = generate(model, PROMPTS, 6, generator=gen(0))
    assert not any(t.is_inference() for t in (ids, mask, logps))
    logits = model(ids)                                         # embedding saves ids for backward
    (logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0] * mask).sum().backward()
    assert model.embed_tokens.weight.grad is not None


def test_seeds():
    model = tiny()
    a, b, c = (generate(model, PROMPTS, 16, generator=gen(s))[0] for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_first_token_frequencies_match_softmax():
    """4000 draws of the first token; every frequency within 5 standard errors of softmax(logits / T)."""
    model, T, n = tiny(vocab=12), 0.8, 4000
    prompt = [3, 1, 4]
    with torch.no_grad():
        p = (model(torch.tensor([prompt]))[0, -1] / T).softmax(-1)
    ids, _, _ = generate(model, [prompt] * n, 1, temperature=T, generator=gen(0))
    freq = torch.bincount(ids[:, 0], minlength=12).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert bool(((freq - p.double()).abs() <= 5 * se + 1e-3).all()), (freq, p)
    assert p.max() < 0.9 and (p > 0.02).sum() >= 4   # the test distribution is not degenerate


# ---- EOS, mask, trimming, errors ----------------------------------------------------------------------

def test_per_row_eos_mask_and_pad():
    model = tiny(vocab=16)
    eos, pad = [2, 5], 15
    ids, mask, logps = generate(model, PROMPTS * 4, 30, eos_id=eos, pad_id=pad, generator=gen(0))
    lengths = mask.sum(1).long()
    assert ids.shape[1] == int(lengths.max()) and lengths.min() < lengths.max()   # trimmed, ragged stops
    for b in range(ids.shape[0]):
        n = int(lengths[b])
        row = ids[b].tolist()
        assert mask[b, :n].eq(1).all() and mask[b, n:].eq(0).all()
        hit = [i for i, t in enumerate(row[:n]) if t in eos]
        assert hit == ([n - 1] if row[n - 1] in eos else [])   # EOS counted, and only at the end
        assert n == 30 or row[n - 1] in eos                     # a row stops only at EOS or the budget
        assert all(t == pad for t in row[n:]) and logps[b, n:].eq(0).all()
    assert (lengths < 30).sum() > 0


def test_all_rows_stop_early_and_int_eos():
    model = tiny(vocab=16)
    greedy = generate(model, PROMPTS, 5, temperature=0.0)[0]
    eos = int(greedy[0, 2])   # row 0 stops at its third token at the latest
    ids, mask, _ = generate(model, PROMPTS, 40, temperature=0.0, eos_id=eos)
    assert mask[0].sum() <= 3 and ids.shape[1] == int(mask.sum(1).max())


def test_bad_prompts_raise():
    model = tiny()   # max_position_embeddings 64
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1] * 60], 5)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1, 2], []], 5)
    generate(model, [[1] * 59], 5)   # exactly at the limit is fine
