"""Shared helpers of the algorithm tests: random games files (the EGPO tabular test-bed of docs/algorithms.md §0)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_P(n, rng):
    """Diagonal ½, strict lower triangle U(0, 1), upper = 1 − lower (EGPO's test-bed)."""
    L = np.tril(rng.uniform(size=(n, n)), -1)
    P = L + np.triu(1 - L.T, 1)
    np.fill_diagonal(P, 0.5)
    return P


def cyclic_P(n, strength=0.9):
    """Rock-paper-scissors on n actions: i beats i+1 … i+⌊n/2⌋ (mod n) with probability `strength`."""
    P = np.full((n, n), 0.5)
    for i in range(n):
        for d in range(1, n // 2 + 1):
            if 2 * d != n:
                j = (i + d) % n
                P[i, j], P[j, i] = strength, 1 - strength
    return P


def bt_P(r):
    r = np.asarray(r, dtype=np.float64)
    return 1 / (1 + np.exp(-(r[:, None] - r[None, :])))


def write_games(path, Ps, beta=0.1, refs=None, family="random", split="train"):
    """A games file (docs/arena.md) with one game per matrix; candidates are "a0", "a1", …"""
    games = []
    for k, P in enumerate(Ps):
        n = len(P)
        g = {"id": f"g{k}", "prompt": f"prompt {k}", "candidates": [f"a{i}" for i in range(n)],
             "P": np.asarray(P).tolist(), "family": family, "split": split}
        if refs is not None:
            g["ref"] = list(map(float, refs[k]))
        games.append(g)
    with open(path, "w") as f:
        json.dump({"beta": beta, "games": games}, f)
    return str(path)


def write_arena4(path):
    """One training game of each family of data/arena/games.json (the LM's prompts are arena prompts): a small games
    file for LM runs. Returns its path."""
    with open(os.path.join(ROOT, "data", "arena", "games.json")) as f:
        arena = json.load(f)
    first = {}
    for g in arena["games"]:
        if g["split"] == "train":
            first.setdefault(g["family"], g)
    assert len(first) >= 3
    with open(path, "w") as f:
        json.dump({"beta": arena["beta"], "games": list(first.values())}, f)
    return str(path)


@pytest.fixture
def random_games(tmp_path):
    """Three random 10-action games, β = 0.1, non-uniform refs."""
    rng = np.random.default_rng(0)
    Ps = [random_P(10, rng) for _ in range(3)]
    refs = [rng.dirichlet(np.ones(10)) + 0.01 for _ in range(3)]
    refs = [r / r.sum() for r in refs]
    return write_games(tmp_path / "games.json", Ps, refs=refs)


def meta_tabular(games_path):
    """A TabularPolicy over the games file and its (G, n, n) matrices, both on the meta device: an exact loss run on
    them raises if it builds any tensor on the CPU (as a CUDA run would)."""
    import torch
    from common.arena import load_games
    from common.policy import TabularPolicy
    games = load_games(games_path)
    return TabularPolicy(games).to("meta"), torch.tensor(np.stack([g.P for g in games]), device="meta")


def run_script(*argv, timeout=600):
    """Run a top-level script in a subprocess from the repo root; returns CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_policy(run_dir):
    with open(os.path.join(run_dir, "policy.json")) as f:
        return json.load(f)


def check_lm_runs(tmp_path, script, *argv):
    """Run `script` twice on the arena LM with the same seed: both finish, write the run folder's files and
    the exact metrics, train (the weights change) and agree bit for bit. Returns (metrics rows, stdout)."""
    outs, r = [], None
    for name in ("a", "b"):
        d = str(tmp_path / name)
        r = run_script(script, *argv, "--run-dir", d)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(d)
    for f in ("args.json", "metrics.jsonl", "config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(outs[0], f)), f
    rows = read_metrics(outs[0])
    assert [row["iteration"] for row in rows] == [0, 1]
    for k in ("eval/dual_gap", "eval/exploit", "eval/kl_ne", "eval/win_vs_ref", "eval/valid"):
        assert all(np.isfinite(row[k]) for row in rows), k
    weights = [open(os.path.join(d, "model.safetensors"), "rb").read() for d in outs]
    with open(os.path.join(ROOT, "data", "arena", "model.safetensors"), "rb") as f:
        sft = f.read()
    assert weights[0] == weights[1] and weights[0] != sft  # same seed, same bits; and it trained
    assert "sft→trained" in r.stdout
    return rows, r.stdout


@pytest.fixture
def real_world(tmp_path):
    """The real-checkpoint world on CPU: a tiny random HF-layout Qwen2 policy folder, a Qwen2ForSequenceClassification
    reward-model folder (built by transformers) and a prompts file. Returns the flags that select it."""
    import shutil

    import torch
    import transformers

    from common.model import ModelConfig, Transformer
    pol = tmp_path / "policy"
    cfg = ModelConfig(model_type="qwen2", vocab_size=768, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(pol)
    shutil.copy(os.path.join(ROOT, "data", "arena", "tokenizer.json"), pol / "tokenizer.json")
    rm = tmp_path / "rm"
    transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(
        vocab_size=768, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=48, num_labels=1, pad_token_id=1, eos_token_id=0)).save_pretrained(rm)
    shutil.copy(os.path.join(ROOT, "data", "arena", "tokenizer.json"), rm / "tokenizer.json")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Name a colour.", "Pick a fruit.")))
    return ["--model", str(pol), "--judge", f"rm:{rm}", "--prompts", str(prompts)]


def check_real_world_run(run_dir, result, pairs=None):
    """A world-3 run finished, logged the judge's sampled win rate and saved an HF-layout policy; returns its rows."""
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(run_dir)
    assert [row["iteration"] for row in rows] == [0, 1]
    assert pairs is None or rows[1]["train/pairs"] == pairs
    assert all(0 <= row["eval/win_vs_ref"] <= 1 for row in rows)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(run_dir, f)), f
    return rows
