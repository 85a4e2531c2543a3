"""Policies: the tabular policy, and the LM policy's exact distribution over candidates (+ invalid mass) against
a naive computation and against sampled frequencies."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.arena import ARENA_DIR, evaluate, load_games
from common.chat import encode_prompt, encode_response
from common.lm_policy import LMPolicy
from common.policy import Samples, TabularPolicy


@pytest.fixture(scope="module")
def games():
    return load_games()


@pytest.fixture(scope="module")
def sft():
    return LMPolicy.load(ARENA_DIR)


# ---- tabular -----------------------------------------------------------------------------------------------

def test_tabular_starts_at_ref_and_samples_it(games):
    """Initial distribution = the games' ref; 20000 draws per game within 5 standard errors of it."""
    pol = TabularPolicy(games)
    for g, p in zip(games, pol.distribution(games)):
        np.testing.assert_allclose(p, g.ref, atol=1e-14)
    sub = [games[0], games[40]]
    N = 20000
    s = pol.sample(sub, N, generator=torch.Generator().manual_seed(0))
    assert len(s) == 2 * N and s.game_ids[:N] == [sub[0].id] * N and s.game_ids[N:] == [sub[1].id] * N
    assert s.texts[0] == sub[0].candidates[int(s.actions[0])]
    for k, g in enumerate(sub):
        freq = np.bincount(s.actions[k * N:(k + 1) * N].numpy(), minlength=g.n) / N
        assert np.all(np.abs(freq - g.ref) <= 5 * np.sqrt(g.ref * (1 - g.ref) / N))
    s2 = pol.sample(sub, N, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.actions, s2.actions)


def test_tabular_logprobs_gradients_copy_save_load(games, tmp_path):
    pol = TabularPolicy(games)
    s = pol.sample(list(games)[:5], 3, generator=torch.Generator().manual_seed(1))
    lp = pol.logprobs(s)
    assert lp.shape == (15,) and lp.requires_grad
    np.testing.assert_allclose(lp.exp().detach().numpy(),
                               [games.by_id(i).ref[a] for i, a in zip(s.game_ids, s.actions.tolist())], rtol=1e-12)
    lp.sum().backward()
    assert pol.theta.grad is not None and pol.theta.grad[~pol.valid].abs().max() == 0
    frozen = pol.frozen_copy()
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        pol.theta.add_(torch.randn(pol.theta.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    pol.save(tmp_path / "run")
    obj = json.loads((tmp_path / "run" / "policy.json").read_text())
    assert set(obj) == {g.id for g in games} and all(abs(sum(v) - 1) < 1e-12 for v in obj.values())
    back = TabularPolicy.load(str(tmp_path / "run"), games)
    for p, q in zip(pol.distribution(games), back.distribution(games)):
        np.testing.assert_allclose(p, q, rtol=1e-12)
    # frozen copy did not move; the text path agrees with the action path
    for g, p in zip(games, frozen.distribution(games)):
        np.testing.assert_allclose(p, g.ref, atol=1e-14)
    enc = pol.encode([s.game_ids[0]], [s.texts[0]])
    assert enc.actions.tolist() == [int(s.actions[0])]
    with pytest.raises(ValueError, match="not a candidate"):
        pol.encode([games[0]], ["definitely not a candidate"])


def test_tabular_save_into_existing_run_dir_keeps_other_files(games, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    TabularPolicy(games).save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "policy.json"]


def test_tabular_reference_metrics(games):
    """At π = π_ref: win_vs_ref = ½ exactly, valid = 1, DG > 0 (π_ref is not the equilibrium)."""
    m = evaluate(TabularPolicy(games), games)
    assert abs(m["eval/win_vs_ref"] - 0.5) < 1e-12 and m["eval/valid"] == 1.0 and m["eval/dual_gap"] > 0


# ---- LM ----------------------------------------------------------------------------------------------------

def test_lm_distribution_equals_naive_and_sums_to_one(games, sft):
    """Batched exact distribution vs a naive per-candidate log_softmax over full logits; candidates' mass ≤ 1
    (the invalid mass, 1 − Σ, is ≥ 0 up to float32 error) and every entry sums to 1 with it."""
    dist = sft.distribution(games)
    for g, p in zip(games, dist):
        assert p.shape == (g.n + 1,) and abs(p.sum() - 1) < 1e-12
        assert p[:g.n].sum() <= 1 + 1e-5 and p[g.n] >= 0
    for g, p in list(zip(games, dist))[::16]:
        x = encode_prompt(sft.tokenizer, g.prompt)
        for i, c in enumerate(g.candidates):
            y = encode_response(sft.tokenizer, c) + [sft.eos_id]
            ids = torch.tensor([x + y])
            with torch.no_grad():
                logp = F.log_softmax(sft.model(ids).double(), -1)[0]            # (T, V)
            naive = sum(logp[len(x) - 1 + t, tok].item() for t, tok in enumerate(y))
            assert abs(np.log(p[i]) - naive) < 1e-4
    valid = np.mean([1 - p[-1] for p in dist])
    assert 0.5 < valid < 0.999  # the SFT is imperfect on purpose: some invalid mass


def test_lm_distribution_matches_sampled_frequencies(games, sft):
    """4000 responses (2000 for each of 2 prompts) sampled with common/sampler.py: the frequency of each candidate
    (its exact tokens + EOS) and of 'invalid' (anything else) is within 5 standard errors sqrt(p(1 − p)/N) of the
    exact probability (each check fails by chance with probability < 6e-7). Generation stops after the longest
    candidate + EOS: a longer response is invalid whatever follows, so the frequencies are unchanged."""
    sub = [games[0], games[77]]
    N = 2000
    longest = max(len(encode_response(sft.tokenizer, c)) for g in sub for c in g.candidates) + 1
    s = sft.sample(sub, N, generator=torch.Generator().manual_seed(0), max_new_tokens=longest)
    assert isinstance(s, Samples) and len(s) == 2 * N
    for k, (g, p) in enumerate(zip(sub, sft.distribution(sub))):
        acts = s.actions[k * N:(k + 1) * N].numpy()
        freq = np.bincount(np.where(acts < 0, g.n, acts), minlength=g.n + 1) / N
        se = np.sqrt(p * (1 - p) / N)
        assert np.all(np.abs(freq - p) <= 5 * se + 1e-12), (g.id, freq, p)


def test_lm_samples_logprobs_and_texts(games, sft):
    sub = [games[3], games[50]]
    s = sft.sample(sub, 8, generator=torch.Generator().manual_seed(1), temperature=1.0)
    for k in range(len(s)):
        g = sub[k // 8]
        assert s.prompts[k] == g.prompt and s.game_ids[k] == g.id
        if s.actions[k] >= 0:
            assert s.texts[k] == g.candidates[int(s.actions[k])]
    lp = sft.logprobs(s)
    assert lp.shape == (16,) and torch.all(lp <= 0)
    # log-probs of sampled rows equal those of the same texts re-encoded, for candidate rows
    rows = [k for k in range(len(s)) if s.actions[k] >= 0]
    enc = sft.encode([sub[k // 8] for k in rows], [s.texts[k] for k in rows])
    torch.testing.assert_close(sft.logprobs(enc), lp[rows], atol=1e-5, rtol=0)
    sel = s.select([3, 1])
    assert sel.texts == [s.texts[3], s.texts[1]] and torch.equal(sel.input_ids, s.input_ids[[3, 1]])


def test_lm_frozen_copy_save_load(games, sft, tmp_path):
    pol = sft.frozen_copy()
    assert not any(p.requires_grad for p in pol.parameters())
    trainable = LMPolicy(sft.frozen_copy().model.requires_grad_(True), sft.tokenizer, sft.eos_id, sft.pad_id)
    enc = trainable.encode([games[0]] * 2, list(games[0].candidates[:2]))
    trainable.logprobs(enc).sum().backward()
    assert trainable.model.lm_head_weight.grad is not None
    (tmp_path / "args.json").write_text("{}")
    sft.save(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "args.json"} <= set(os.listdir(tmp_path))
    back = LMPolicy.load(str(tmp_path))
    for p, q in zip(sft.distribution(games[:8]), back.distribution(games[:8])):
        np.testing.assert_array_equal(p, q)


def test_lm_reference_metrics(games, sft):
    """The SFT against itself: win_vs_ref = ½, valid = its candidate mass, DG > 0; an LM needs an LM reference."""
    dist = sft.distribution(games)
    m = evaluate(dist, games, dist)
    assert abs(m["eval/win_vs_ref"] - 0.5) < 1e-12 and m["eval/dual_gap"] > 0
    assert abs(m["eval/valid"] - np.mean([1 - p[-1] for p in dist])) < 1e-12
    with pytest.raises(ValueError, match="LM"):
        evaluate(dist, games)  # the games' ref has no invalid entry


def test_tabular_matrices_place_each_game_at_its_row(games):
    pol = TabularPolicy(games)
    train = list(games.select(split="train"))
    P = pol.matrices(train)
    assert P.shape == pol.theta.shape + pol.theta.shape[-1:] and P.dtype == torch.float64
    for g in games:
        k = pol.index[g.id]
        want = np.zeros((P.shape[-1],) * 2)
        if g.split == "train":
            want[:g.n, :g.n] = g.P
        assert np.array_equal(P[k].numpy(), want), g.id


# ---- distinct responses and length buckets -------------------------------------------------------------------

def test_unique_responses_groups_identical_rows_of_a_prompt(games, sft):
    from common.policy import unique_responses
    gen = torch.Generator().manual_seed(3)
    for pol in (TabularPolicy(games), sft):
        K = 12
        y = pol.sample([games[0], games[1], games[2]], K, generator=gen)
        rows, counts = unique_responses(y, K)
        if y.response_mask is not None:
            keys = [(r // K, tuple(y.input_ids[r][y.response_mask[r].bool()].tolist())) for r in range(len(y))]
        else:
            keys = [(r // K, int(y.actions[r])) for r in range(len(y))]
        naive = {}
        for r, k in enumerate(keys):
            naive.setdefault(k, []).append(r)
        assert rows.tolist() == [v[0] for v in naive.values()]            # first row of each, in order
        assert counts.tolist() == [len(v) for v in naive.values()]
        assert len(rows) < len(y)                                          # duplicates exist: not vacuous
        group = rows // K
        assert torch.equal(torch.zeros(3, dtype=torch.long).index_add_(0, group, counts), torch.full((3,), K))
        f = torch.randn(len(y), generator=gen)                             # a function of (prompt, response):
        f = torch.tensor([f[naive[k][0]] for k in keys])                   # equal on identical rows
        assert torch.allclose((counts * f[rows]).sum(), f.sum())
    with pytest.raises(ValueError, match="groups of 5"):
        unique_responses(y, 5)


def test_lm_length_buckets_equal_one_padded_pass(games, sft):
    """logprobs/token_logprobs sort rows into length buckets of BUCKET_ROWS and trim padding; values and
    parameter gradients equal one padded sequence_logprobs pass (fp32 rounding only)."""
    from common.losses import sequence_logprobs
    y = sft.sample(list(games)[:40], 8, generator=torch.Generator().manual_seed(0))  # 320 rows > BUCKET_ROWS
    assert len(y) > 2 * sft.BUCKET_ROWS
    lengths = y.attention_mask.sum(1)
    assert lengths.max() - lengths.min() >= 8                                        # ragged: buckets differ
    params = list(sft.model.parameters())
    tok, tot = sequence_logprobs(sft.model, y.input_ids, y.attention_mask, y.response_mask)
    g_naive = torch.autograd.grad(tot.sum(), params)
    b_tot = sft.logprobs(y)
    g_bucket = torch.autograd.grad(b_tot.sum(), params)
    assert (b_tot - tot).abs().max() <= 1e-4 and torch.allclose(b_tot, tot, rtol=1e-5, atol=1e-5)
    b_tok = sft.token_logprobs(y)
    assert b_tok.shape == tok.shape and torch.equal(b_tok == 0, tok == 0)
    assert torch.allclose(b_tok, tok, atol=1e-5)
    for a, b in zip(g_naive, g_bucket):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_bf16_frozen_copy_equals_the_policy_under_autocast(games, sft):
    """frozen_copy(bfloat16), π_ref on CUDA: only the Linear weights are bf16, so under bf16 autocast (here the CPU's,
    standing in for CUDA's) its log-probs equal the fp32 policy's to the bit: at t = 1, π_t = π_ref gives zero log-ratio
    terms. A copy cast whole to bf16 (a bf16 residual stream) does not."""
    import copy
    rows = sft.encode([g for g in list(games)[:8] for _ in range(2)],
                      [c for g in list(games)[:8] for c in g.candidates[:2]])
    ref = sft.frozen_copy(torch.bfloat16)
    assert ref.model.embed_tokens.weight.dtype == torch.float32
    assert ref.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    whole = sft.frozen_copy()
    whole.model = copy.deepcopy(sft.model).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs, cast_whole = sft.logprobs(rows), ref.logprobs(rows), whole.logprobs(rows)
    assert torch.equal(ours, theirs)
    assert (ours - cast_whole).abs().max() > 1e-3


def test_samples_state_round_trip_keeps_chat_prompts():
    """A checkpoint's Samples (tanpo.py's D): to_state / from_state give back the same rows, Conversation prompts
    included, with the actions on the CPU and the token tensors on the device asked for."""
    from common.chat import conversation
    from common.policy import Samples
    convs = [conversation("Hi"), conversation([{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "2+2?"}])]
    s = Samples(prompts=[convs[0], "a game prompt", convs[1]], texts=["a", "b", "c"], game_ids=[None, "g0", None],
                actions=torch.tensor([-1, 3, -1]), input_ids=torch.arange(12).view(3, 4),
                attention_mask=torch.ones(3, 4, dtype=torch.long), response_mask=torch.tensor([[0, 0, 1, 1]] * 3))
    tensors, lists = s.to_state()
    back = Samples.from_state(tensors, json.loads(json.dumps(lists)), device="meta")
    assert back.prompts == s.prompts and back.texts == s.texts and back.game_ids == s.game_ids
    assert back.actions.device.type == "cpu" and torch.equal(back.actions, s.actions)
    assert back.input_ids.device.type == "meta" and back.input_ids.shape == s.input_ids.shape
    again = Samples.from_state(tensors, lists)
    assert all(torch.equal(getattr(again, k), getattr(s, k)) for k in ("input_ids", "attention_mask", "response_mask"))
