"""Judges: the arena judge's matrix and invalid rules, Bernoulli labels, the tabular judge, and the reward-model
judge against transformers."""
import os
import shutil

import numpy as np
import pytest
import torch

from common.arena import ARENA_DIR, load_games
from common.judges import ArenaJudge, RewardModelJudge, TabularJudge, make_judge


@pytest.fixture(scope="module")
def games():
    return load_games()


def test_arena_judge_is_the_matrix_and_complementary(games):
    judge = ArenaJudge(games)
    for g in games:
        n = g.n
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        i, j = i.ravel(), j.ravel()
        prompts = [g.prompt] * len(i)
        p = judge.prob(prompts, [g.candidates[k] for k in i], [g.candidates[k] for k in j])
        q = judge.prob(prompts, [g.candidates[k] for k in j], [g.candidates[k] for k in i])
        np.testing.assert_array_equal(p.numpy(), g.P[i, j])
        np.testing.assert_allclose((p + q).numpy(), 1.0, atol=1e-12)   # P + Pᵀ = 1


def test_arena_judge_invalid_rules_and_strip(games):
    judge = ArenaJudge(games)
    g = games[0]
    a, b = g.candidates[0], g.candidates[1]
    other = next(c for h in games for c in h.candidates if c not in g.candidates)
    cases = [(a, "", 1.0), ("", a, 0.0), ("not an answer", "", 0.5), (other, "bananas!", 0.5),
             (other, a, 0.0), (f"  {a}\n", b, g.P[0, 1]), (a, a, 0.5)]
    p = judge.prob([g.prompt] * len(cases), [c[0] for c in cases], [c[1] for c in cases])
    np.testing.assert_array_equal(p.numpy(), [c[2] for c in cases])
    assert p.dtype == torch.float64
    with pytest.raises(KeyError, match="not in"):
        judge.prob(["an unknown prompt"], [a], [b])
    with pytest.raises(ValueError, match="same length"):
        judge.prob([g.prompt], [a, b], [b])


def test_labels_are_bernoulli_with_explicit_generator(games):
    """Frequency of a ≻ b over 20000 draws within 5 standard errors of P; equal seeds give equal labels."""
    judge = ArenaJudge(games)
    g = next(h for h in games if 0.2 < h.P[0, 1] < 0.8)
    N = 20000
    args = ([g.prompt] * N, [g.candidates[0]] * N, [g.candidates[1]] * N)
    lab = judge.label(*args, generator=torch.Generator().manual_seed(0))
    assert lab.dtype == torch.bool and lab.shape == (N,)
    p = g.P[0, 1]
    assert abs(lab.double().mean().item() - p) < 5 * np.sqrt(p * (1 - p) / N)
    assert torch.equal(lab, judge.label(*args, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(lab, judge.label(*args, generator=torch.Generator().manual_seed(1)))
    inv = judge.label([g.prompt] * 10, ["xx"] * 10, [g.candidates[0]] * 10, torch.Generator().manual_seed(0))
    assert not inv.any()


def test_tabular_judge_matches_arena_judge(games):
    arena_judge, tab = ArenaJudge(games), TabularJudge(games)
    rng = np.random.default_rng(0)
    ids, prompts, a, b, ta, tb = [], [], [], [], [], []
    for _ in range(500):
        g = games[int(rng.integers(len(games)))]
        i, j = (int(x) for x in rng.integers(-1, g.n, size=2))
        ids.append(g.id)
        prompts.append(g.prompt)
        ta.append(i)
        tb.append(j)
        a.append(g.candidates[i] if i >= 0 else "<garbage>")
        b.append(g.candidates[j] if j >= 0 else "<garbage>")
    p = tab.prob(ids, torch.tensor(ta), torch.tensor(tb))
    assert torch.equal(p, arena_judge.prob(prompts, a, b))


def test_make_judge(games, tmp_path):
    assert isinstance(make_judge("arena", games), ArenaJudge)
    for bad in ("", "rm:", "tabular", "reward:x", f"rm:{tmp_path}/missing"):
        with pytest.raises(ValueError, match="--judge"):
            make_judge(bad, games)


def test_reward_model_judge_equals_transformers(tmp_path):
    """A random tiny Qwen2ForSequenceClassification saved by transformers (safetensors) and loaded by
    RewardModelJudge: scores and σ(r_a − r_b) equal transformers' to 1e-5."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(ARENA_DIR, "tokenizer.json"))
    pad_id, eos_id = tok.token_to_id("<|pad|>"), tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   max_position_embeddings=128, num_labels=1, pad_token_id=pad_id,
                                   eos_token_id=eos_id, tie_word_embeddings=False)
    hf = transformers.Qwen2ForSequenceClassification(cfg).eval()
    with torch.no_grad():  # the score head is initialized small; make the margins visible
        hf.score.weight.normal_(0, 1.0)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(os.path.join(ARENA_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(tmp_path))

    judge = make_judge(f"rm:{tmp_path}")
    assert isinstance(judge, RewardModelJudge)
    games = load_games()
    prompts = [g.prompt for g in games[:12]]
    a = [g.candidates[0] for g in games[:12]]
    b = [g.candidates[-1] + " and more words" for g in games[:12]]
    rows = [judge.encode(x, y) for x, y in zip(prompts + prompts, a + b)]
    assert rows[0][-1] == eos_id
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=attn).logits.squeeze(-1).double()   # (2B,)
    ours = judge.score(prompts + prompts, a + b)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    p = judge.prob(prompts, a, b)
    torch.testing.assert_close(p, torch.sigmoid(ref[:12] - ref[12:24]), atol=1e-5, rtol=0)
    assert p.std() > 0.01
    # all pairs among repeated responses: each distinct (prompt, response) is scored once, same probabilities
    scored = []
    score = judge.score
    judge.score = lambda xs, ys: scored.append(len(xs)) or score(xs, ys)
    I, J = torch.triu_indices(4, 4, offset=1)
    texts = [a[0], b[0], a[0] + " indeed", b[0]]                      # 3 distinct answers of one prompt
    p_all = judge.prob([prompts[0]] * len(I), [texts[i] for i in I], [texts[j] for j in J])
    assert scored == [3]
    r = score([prompts[0]] * 4, texts)
    torch.testing.assert_close(p_all, torch.sigmoid(r[I] - r[J]), atol=1e-6, rtol=0)
    judge.score = score
    with pytest.raises(ValueError, match="not a reward model"):
        RewardModelJudge(ARENA_DIR)
