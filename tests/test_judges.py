"""Judges: the arena judge's matrix and invalid rules, Bernoulli labels, the tabular judge; the reward-model judge
(raw layout and chat template) and the pair judge (the RLHFlow pairwise format) against naive transformers computations
on tiny random checkpoints; the py: judge (data/chat/length_rps.py and malformed judges); CategoryGame.metrics against
a naive computation."""
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from common.arena import ARENA_DIR, load_games, solve_nash
from common.chat import Conversation, conversation
from common.judges import (PLAIN_CONTEXT_TEMPLATE, ArenaJudge, CategoryGame, JudgeError, PairJudge, PyJudge,
                           RewardModelJudge, make_judge)
from common.policy import Samples


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


# ---- model judges on tiny random transformers checkpoints ----------------------------------------------------------
# Every folder below is built here: a byte-level BPE trained on a few sentences (with the ChatML special tokens as
# special added tokens), tokenizer.json + tokenizer_config.json with a ChatML template, and a random Llama written by
# transformers' save_pretrained (safetensors). The references use transformers only (AutoTokenizer, the HF model).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH_RPS = os.path.join(ROOT, "data", "chat", "length_rps.py")

CHATML = ("{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Which response is better, A or B? A is better than B.",
             "What is the capital of France? Paris is the capital of France.", "And of Italy? Rome, of course!"]
MULTI_TURN = [{"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "Paris."},
              {"role": "user", "content": "And of Italy? Answer briefly."}]
PROMPTS = ["What is the capital of France?", "Tell me a joke.", Conversation(tuple((m["role"], m["content"])
                                                                                    for m in MULTI_TURN))]
RESPONSES = ["Paris.", "Rome, of course! It has been the capital since 1871.", "B", "A dog walks into a bar.",
             "I do not know.", "The quick brown fox jumps over the lazy dog. " * 3]


def bpe_tokenizer(sentences, add_prefix_space=False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(
        vocab_size=360, special_tokens=["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def write_tokenizer(folder, tok, chat_template=CHATML):
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(folder)


def llama_config(transformers, tok, **kw):
    ids = {k: tok.token_to_id(v) for k, v in SPECIAL.items()}
    return transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                    max_position_embeddings=1024, tie_word_embeddings=False,
                                    bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
                                    pad_token_id=ids["pad_token"], **kw)


def as_messages(prompt):
    """The prompt as transformers' messages, written out here (a str is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": r, "content": c} for r, c in prompt.messages]


def hf_ids(enc):
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list before."""
    return list(enc["input_ids"] if isinstance(enc, Mapping) else enc)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer(SENTENCES)


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory, transformers, bpe):
    """(folder, HF LlamaForCausalLM, HF tokenizer): a random causal LM with a ChatML template."""
    folder = tmp_path_factory.mktemp("pair_judge")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(transformers, bpe)).eval()
    with torch.no_grad():  # large weights: the last state depends on the responses' order, so P(a ≻ b) is far from ½
        for w in hf.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.5)
        hf.lm_head.weight.normal_(0, 1.0)
    hf.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, bpe)
    assert "model.safetensors" in os.listdir(folder)
    return str(folder), hf, transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory, transformers, bpe):
    """(folder, HF LlamaForSequenceClassification, HF tokenizer): a random reward model with a ChatML template."""
    folder = tmp_path_factory.mktemp("rm_judge")
    torch.manual_seed(1)
    hf = transformers.LlamaForSequenceClassification(llama_config(transformers, bpe, num_labels=1)).eval()
    with torch.no_grad():
        hf.score.weight.normal_(0, 1.0)
    hf.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, bpe)
    return str(folder), hf, transformers.AutoTokenizer.from_pretrained(str(folder))


def naive_pair_prob(hf, hf_tok, prompt, a, b):
    """P(a ≻ b) of the RLHFlow pairwise format, from its definition, with transformers alone; one row at a time, no
    padding."""
    choice = []
    for t in ("A", "B"):
        ids = hf_tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1
        choice.append(ids[0])

    def p(first, second):
        context = hf_tok.apply_chat_template(as_messages(prompt), chat_template=PLAIN_CONTEXT_TEMPLATE, tokenize=False)
        message = f"[CONTEXT] {context} [RESPONSE A] {first} [RESPONSE B] {second} \n"
        text = hf_tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                          add_generation_prompt=True)
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids])).logits[0, -1]
        return torch.softmax(logits[choice].double(), -1)[0].item()

    return 0.5 * (p(a, b) + 1 - p(b, a))


def test_pair_judge_equals_rlhflow_format_in_transformers(pair_folder):
    folder, hf, hf_tok = pair_folder
    judge = make_judge(f"pair:{folder}", batch_size=3)
    assert isinstance(judge, PairJudge)
    rows = [(x, RESPONSES[i], RESPONSES[j]) for x in PROMPTS for i, j in ((0, 1), (2, 3), (4, 5), (5, 0))]
    prompts, a, b = (list(t) for t in zip(*rows))
    lengths = {len(judge.encode(x, u, v)) for x, u, v in rows}
    assert len(lengths) > 3 and 2 * len(rows) > judge.batch_size       # padded batches, several of them
    assert max(lengths) <= hf.config.max_position_embeddings
    p = judge.prob(prompts, a, b)
    assert p.dtype == torch.float64 and p.shape == (len(rows),)
    ref = torch.tensor([naive_pair_prob(hf, hf_tok, x, u, v) for x, u, v in rows], dtype=torch.float64)
    torch.testing.assert_close(p, ref, atol=1e-5, rtol=0)
    assert (p - 0.5).abs().max() > 0.05 and p.std() > 0.02                # not all ½
    # the tokens the judge reads are the ones transformers' template gives
    x, u, v = rows[-1]
    context = hf_tok.apply_chat_template(as_messages(x), chat_template=PLAIN_CONTEXT_TEMPLATE, tokenize=False)
    msg = [{"role": "user", "content": f"[CONTEXT] {context} [RESPONSE A] {u} [RESPONSE B] {v} \n"}]
    assert judge.encode(x, u, v) == hf_ids(hf_tok.apply_chat_template(msg, tokenize=True, add_generation_prompt=True))


def test_pair_judge_symmetry_and_one_pass_per_distinct_row(pair_folder):
    folder, _, _ = pair_folder
    judge = make_judge(f"pair:{folder}", batch_size=2)
    x, y = PROMPTS[0], PROMPTS[2]
    u, v, w = RESPONSES[0], RESPONSES[1], RESPONSES[3]
    # (x, u, v) three times, its mirror (x, v, u), a self-pair, the same answers under another prompt, a list prompt
    rows = [(x, u, v), (x, v, u), (x, u, v), (x, u, u), (y, u, v), (x, w, v), (x, u, v), (as_messages(y), v, u)]
    seen = []
    first_wins = judge.first_wins

    def counting(prompts, first, second):
        seen.append(list(zip(prompts, first, second)))
        return first_wins(prompts, first, second)

    judge.first_wins = counting
    prompts, a, b = (list(t) for t in zip(*rows))
    n = len(rows)
    p = judge.prob(prompts + prompts, a + b, b + a)         # both orders of every row in one call
    assert len(seen) == 1
    expected = {(conversation(x), f, s) for x, u_, v_ in rows for f, s in ((u_, v_), (v_, u_))}
    call = seen[0]       # each distinct ordered (prompt, first, second) once, and nothing else
    assert len(call) == len(set((conversation(x), f, s) for x, f, s in call)) == len(expected)
    assert {(conversation(x), f, s) for x, f, s in call} == expected
    np.testing.assert_allclose((p[:n] + p[n:]).numpy(), 1.0, atol=1e-12, rtol=0)    # P(a ≻ b) + P(b ≻ a) = 1
    assert p[3].item() == 0.5                                                # P(a ≻ a) = ½ exactly
    assert p[0] == p[2] == p[6] and abs(p[0] + p[1] - 1) < 1e-12             # repeated rows, mirrored row
    assert abs(p[7] + p[4] - 1) < 1e-12                                      # a list-of-dicts prompt = the Conversation
    assert judge.prob([x, y], [w, v], [w, v]).tolist() == [0.5, 0.5]
    assert len(seen[1]) == 2
    # another call batches other rows together: the same P up to fp32 padding noise
    torch.testing.assert_close(judge.prob(prompts, b, a), p[n:], atol=1e-6, rtol=0)
    assert judge.prob([], [], []).shape == (0,)


def test_pair_judge_bad_folders(pair_folder, rm_folder, tmp_path):
    folder, _, _ = pair_folder

    def error(path):
        with pytest.raises(ValueError) as e:
            make_judge(f"pair:{path}")
        msg = str(e.value)
        assert "--judge" in msg and "\n" not in msg
        return msg

    no_template = tmp_path / "no_template"
    shutil.copytree(folder, no_template)
    write_tokenizer(no_template, bpe_tokenizer(SENTENCES), chat_template=None)
    assert not os.path.exists(no_template / "chat_template.jinja")
    assert "chat template" in error(no_template)

    # "A" is not a single token: a byte-level BPE with a prefix space that never learned the merge "Ġ" + "A"
    multi = tmp_path / "multi_token_A"
    shutil.copytree(folder, multi)
    lower = [s.lower() for s in SENTENCES]                     # no " A" / " B" to merge
    tok = bpe_tokenizer(lower, add_prefix_space=True)
    write_tokenizer(multi, tok)
    assert len(tok.encode("A", add_special_tokens=False).ids) == 2
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(str(multi)).encode("A", add_special_tokens=False)) == 2
    assert "'A' as 2 tokens" in error(multi)

    assert "ForSequenceClassification" in error(rm_folder[0])    # a reward model given as pair:
    assert "not a folder" in error(tmp_path / "missing")


def test_reward_model_judge_with_chat_template_equals_transformers(rm_folder):
    folder, hf, hf_tok = rm_folder
    judge = make_judge(f"rm:{folder}", batch_size=2)
    assert isinstance(judge, RewardModelJudge) and judge.chat_template is not None
    rows = [(x, y) for x in PROMPTS for y in RESPONSES[:4]] + [(PROMPTS[2], RESPONSES[5])]
    prompts, responses = (list(t) for t in zip(*rows))
    ours = judge.score(prompts, responses)
    ref = []
    for x, y in rows:     # each row alone, no padding: the score head at the last position
        ids = hf_ids(hf_tok.apply_chat_template(as_messages(x) + [{"role": "assistant", "content": y}],
                                                tokenize=True, add_generation_prompt=False))
        assert judge.encode(x, y) == ids
        with torch.no_grad():
            h = hf.model(input_ids=torch.tensor([ids])).last_hidden_state
            ref.append(hf.score(h)[0, -1, 0].double().item())
    ref = torch.tensor(ref, dtype=torch.float64)
    assert len({len(judge.encode(x, y)) for x, y in rows}) > 3            # padded batches
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert ref.std() > 0.05
    n = len(RESPONSES[:4])
    p = judge.prob(prompts[:n], responses[:n], responses[1:n] + responses[:1])
    torch.testing.assert_close(p, torch.sigmoid(ref[:n] - ref[[*range(1, n), 0]]), atol=1e-5, rtol=0)
    assert judge.prob([], [], []).shape == (0,)


# ---- the py: judge ------------------------------------------------------------------------------------------------

def load_length_rps():
    spec = importlib.util.spec_from_file_location("length_rps_under_test", LENGTH_RPS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# responses of known length (surrounding whitespace stripped): 0, 0, 1, 60, 61, 150, 151, 400 characters
BUCKET_TEXTS = ["", "  \n ", " x ", "y" * 60, "z" * 61, "w " * 74 + "w", "\n" + "v" * 151, "u" * 400]
BUCKETS = [0, 0, 1, 1, 2, 2, 3, 3]


def test_length_rps_py_judge_is_its_matrix():
    rps = load_length_rps()
    judge = make_judge(f"py:{LENGTH_RPS}:prefer")
    assert isinstance(judge, PyJudge) and isinstance(judge.game, CategoryGame)
    assert [rps.bucket(t) for t in BUCKET_TEXTS] == BUCKETS
    i, j = np.meshgrid(np.arange(len(BUCKET_TEXTS)), np.arange(len(BUCKET_TEXTS)), indexing="ij")
    i, j = i.ravel().tolist(), j.ravel().tolist()
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(len(i))]
    p = judge.prob(prompts, [BUCKET_TEXTS[k] for k in i], [BUCKET_TEXTS[k] for k in j])
    expected = [rps.MATRIX[rps.bucket(BUCKET_TEXTS[s])][rps.bucket(BUCKET_TEXTS[t])] for s, t in zip(i, j)]
    assert p.dtype == torch.float64 and p.tolist() == expected
    M = np.array(rps.MATRIX)
    np.testing.assert_allclose(M + M.T, 1.0, atol=1e-12)
    short, medium, long = 1, 2, 3
    assert M[short, medium] > 0.5 and M[medium, long] > 0.5 and M[long, short] > 0.5     # intransitive
    assert not any(all(M[r, c] > 0.5 for c in range(1, 4) if c != r) for r in range(1, 4))  # no best bucket
    assert (M[1:, 0] == 1).all() and M[0, 0] == 0.5
    np.testing.assert_array_equal(judge.game.P, M)
    assert judge.game.names == list(rps.NAMES)
    assert judge.game.classes(prompts[:len(BUCKET_TEXTS)], BUCKET_TEXTS).tolist() == BUCKETS
    judge.check(PROMPTS[2])


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_py_judge_receives_conversations(tmp_path):
    f = write(tmp_path / "turns.py", "def turns(prompts, a, b):\n"
                                     "    assert all(isinstance(m, dict) for p in prompts for m in p)\n"
                                     "    return [len(p) / 10 for p in prompts]\n")
    judge = make_judge(f"py:{f}:turns")
    assert judge.game is None
    p = judge.prob(PROMPTS, ["a"] * 3, ["b"] * 3)
    assert p.tolist() == [len(as_messages(x)) / 10 for x in PROMPTS]


def test_py_judge_bad_specs(tmp_path):
    ok = write(tmp_path / "ok.py", "x = 3\ndef f(prompts, a, b):\n    return [0.5] * len(a)\n")
    boom = write(tmp_path / "boom.py", "raise RuntimeError('no import for you')\n")
    syntax = write(tmp_path / "syntax.py", "def f(:\n")
    specs = [f"py:{tmp_path}/missing.py:f", f"py:{boom}:f", f"py:{syntax}:f", f"py:{ok}:g", f"py:{ok}:x",
             "py:nofunction", f"py:{ok}:", "py::f", f"py:{ok}:not-a-name"]
    for spec in specs:
        with pytest.raises(ValueError) as e:
            make_judge(spec)
        msg = str(e.value)
        assert spec in msg and "\n" not in msg, msg
    assert isinstance(make_judge(f"py:{ok}:f"), PyJudge)


BAD_ANSWERS = {"short": "return [0.5] * (len(a) - 1)", "scalar": "return 0.5", "above": "return [1.5] * len(a)",
               "below": "return [-0.25] * len(a)", "nan": "return [float('nan')] * len(a)",
               "text": "return ['high'] * len(a)", "none": "return None", "nested": "return [[0.5]] * len(a)",
               "raises": "raise KeyError('oops')"}


def test_py_judge_bad_answers_raise_judge_error(tmp_path):
    src = "".join(f"def {name}(prompts, a, b):\n    {body}\n" for name, body in BAD_ANSWERS.items())
    f = write(tmp_path / "bad.py", src)
    for name in BAD_ANSWERS:
        judge = make_judge(f"py:{f}:{name}")
        with pytest.raises(JudgeError) as e:
            judge.prob(["hi", "ho"], ["a", "b"], ["c", "d"])
        msg = str(e.value)
        assert f"py:{f}:{name}" in msg and "\n" not in msg, msg
        with pytest.raises(JudgeError):
            judge.check("hi")


def test_py_judge_errors_stay_one_line_for_multiline_exceptions(tmp_path):
    f = write(tmp_path / "multi.py", "def f(prompts, a, b):\n    raise ValueError('first line\\nsecond line')\n")
    g = write(tmp_path / "multi_import.py", "raise ValueError('first line\\nsecond line')\n")
    with pytest.raises(JudgeError) as e:
        make_judge(f"py:{f}:f").prob(["hi"], ["a"], ["b"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:
        make_judge(f"py:{g}:f")
    assert "\n" not in str(e.value)
    h = write(tmp_path / "multi_classes.py", "def f(prompts, a, b):\n    return [0.5] * len(a)\n"
                                              "def categories(prompts, responses):\n    raise ValueError('x\\ny')\n"
                                              "f.matrix, f.categories = [[0.5, 0.5], [0.5, 0.5]], categories\n")
    with pytest.raises(JudgeError) as e:
        make_judge(f"py:{h}:f").check("hi")
    assert "\n" not in str(e.value)


# ---- CategoryGame.metrics -----------------------------------------------------------------------------------------

CLASS_TEXT = {0: "", 1: "short answer", 2: "m" * 100, 3: "l" * 200}      # length_rps buckets


def class_samples(classes, prompts):
    """Samples with n responses per prompt (consecutive rows), response k of prompt i in bucket classes[i][k]."""
    n = len(classes[0])
    return Samples(prompts=[x for x in prompts for _ in range(n)],
                   texts=[CLASS_TEXT[c] for row in classes for c in row], game_ids=[None] * (n * len(prompts)),
                   actions=torch.full((n * len(prompts),), -1, dtype=torch.long))


def naive_kl_ne(P, pol, ref, beta):
    k = len(P)
    out = []
    for a, b in zip(pol, ref):
        pi_hat = [(list(a).count(c) + 0.5) / (len(a) + 0.5 * k) for c in range(k)]
        pi_ref = [(list(b).count(c) + 0.5) / (len(b) + 0.5 * k) for c in range(k)]
        star = solve_nash(np.array(P), np.array(pi_ref), beta)
        out.append(sum(s * math.log(s / q) for s, q in zip(star, pi_hat) if s > 0))
    return sum(out) / len(out)


def test_category_game_metrics_against_naive():
    rps = load_length_rps()
    game = make_judge(f"py:{LENGTH_RPS}:prefer").game
    prompts = ["p0", "p1", PROMPTS[2]]
    pol = [[1, 1, 1, 2, 3, 0], [2, 2, 2, 2, 2, 2], [3, 1, 3, 1, 3, 2]]
    ref = [[1, 2, 3, 1, 2, 3], [0, 1, 1, 1, 2, 2], [3, 3, 3, 3, 3, 1]]
    a, b = class_samples(pol, prompts), class_samples(ref, prompts)
    beta = 0.1
    m = game.metrics(a, b, n=6, beta=beta, n_boot=40)
    assert m["eval/bucket_kl_ne"] == pytest.approx(naive_kl_ne(rps.MATRIX, pol, ref, beta), abs=1e-10, rel=1e-9)
    assert m["eval/bucket_kl_ne"] > 0
    se = m["eval/bucket_kl_ne_se"]
    assert math.isfinite(se) and se > 0
    assert game.metrics(a, b, n=6, beta=beta, n_boot=40) == m                 # seeded bootstrap
    flat = [c for row in pol for c in row]
    for c, name in enumerate(rps.NAMES):
        assert m[f"eval/bucket/{name}"] == flat.count(c) / len(flat)
    # constant classes within each prompt: every bootstrap resample is the sample itself, SE = 0
    pol1, ref1 = [[1] * 4, [3] * 4], [[2] * 4, [2] * 4]
    m1 = game.metrics(class_samples(pol1, prompts[:2]), class_samples(ref1, prompts[:2]), n=4, beta=0.5, n_boot=10)
    assert m1["eval/bucket_kl_ne_se"] == 0.0
    assert m1["eval/bucket_kl_ne"] == pytest.approx(naive_kl_ne(rps.MATRIX, pol1, ref1, 0.5), abs=1e-10, rel=1e-9)
    assert [m1[f"eval/bucket/{n}"] for n in rps.NAMES] == [0.0, 0.5, 0.0, 0.5]
    # π's samples constant, π_ref's varied: the SE comes from resampling π_ref's samples alone
    m2 = game.metrics(class_samples(pol1, prompts[:2]), class_samples([[1, 2, 3, 3], [0, 2, 2, 1]], prompts[:2]), n=4,
                      beta=0.5, n_boot=10)
    assert m2["eval/bucket_kl_ne_se"] > 0


@pytest.mark.parametrize("kind", ["rm", "pair"])
def test_model_judge_check_renders_every_prompt(rm_folder, pair_folder, kind):
    """check() runs before any file is written, on all the run's prompts: a model judge whose template refuses one of
    them (here: any input that contains the third prompt's last turn) fails there with a ChatError, not hours into
    the run."""
    from common.chat import ChatError, ChatTemplate
    judge = make_judge(f"{kind}:{(rm_folder if kind == 'rm' else pair_folder)[0]}")
    refusing = ("{% for m in messages %}{% if 'And now?' in m['content'] %}"
                "{{ raise_exception('single-turn conversations only') }}{% endif %}{% endfor %}"
                + judge.chat_template.source)
    prompts = ["What is 2+2?", "Name a colour.",
               Conversation((("user", "Hi"), ("assistant", "Hello!"), ("user", "And now?")))]
    judge.check(prompts[:2])                                   # the single-turn prompts render
    judge.chat_template = ChatTemplate(refusing, judge.chat_template.special_tokens, "refusing template")
    with pytest.raises(ChatError, match="single-turn conversations only"):
        judge.check(prompts)
