"""data/make_arena.py reproduces the committed arena: the part that runs in CI. The games (everything but "ref",
which needs the full SFT) and the tokenizer are regenerated and compared bitwise with data/arena/; the first
TRACE_STEPS SFT steps are replayed and compared with data/arena_sft_trace.json, which the same command wrote beside
the committed model (bitwise on the CPU kind that wrote it; within float rounding elsewhere). The full check is
`python data/make_arena.py --check` (3-7 min). And the arena v2 properties the generator promises: families told
apart by prompt, styles shared within a family, held-out contents never seen in training, P + Pᵀ = 1."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from common.arena import ARENA_DIR, load_games

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
import make_arena  # noqa: E402


@pytest.fixture(scope="module")
def prepared():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # as make_arena.main: a fixed reduction order
    try:
        with torch.random.fork_rng():  # prepare() seeds the global generator; leave other tests' stream alone
            yield make_arena.prepare(seed=0)
    finally:
        torch.set_num_threads(threads)


def test_games_and_tokenizer_regenerate_bitwise(prepared, tmp_path):
    games, _, tok, _, _ = prepared
    with open(os.path.join(ARENA_DIR, "games.json")) as f:
        committed = json.load(f)
    assert committed["beta"] == make_arena.BETA and len(committed["games"]) == len(games) == 96
    for new, old in zip(games, committed["games"]):
        for key in ("id", "prompt", "candidates", "family", "split"):
            assert new[key] == old[key], (old["id"], key)
        assert new["P"] == old["P"], old["id"]          # float lists: equal bit for bit
    tok.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "tokenizer.json", "rb") as f, open(os.path.join(ARENA_DIR, "tokenizer.json"), "rb") as g:
        assert f.read() == g.read()


def test_first_sft_steps_replay_the_trace(prepared):
    with open(make_arena.TRACE_PATH) as f:
        trace = json.load(f)
    games, _, _, model, batch = prepared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            losses = make_arena.train_sft(model, batch, len(games), make_arena.STEPS, make_arena.LR,
                                          make_arena.PROMPTS_PER_STEP, torch.Generator().manual_seed(trace["seed"]),
                                          log_every=0, stop_after=trace["steps"])
    finally:
        torch.set_num_threads(threads)
    assert trace["steps"] == make_arena.TRACE_STEPS and len(losses) == trace["steps"]
    assert losses[-1] < 0.8 * losses[0]                   # the replay trains, it does not just start
    np.testing.assert_allclose(losses, trace["losses"], rtol=1e-5, atol=0)
    if make_arena.machine() == trace["machine"]:          # the CPU kind that wrote the committed files
        assert losses == trace["losses"]
        assert make_arena.weights_sha256(model) == trace["sha256"]


def test_arena_v2_structure():
    games = load_games()
    by_family = {}
    for g in games:
        by_family.setdefault(g.family, []).append(g)
    assert sorted(by_family) == ["bt", "cyclic", "mixed", "random"]
    for family, gs in by_family.items():
        styles = make_arena.FAMILIES[family]["styles"]
        assert sum(g.split == "test" for g in gs) == 6 and sum(g.split == "train" for g in gs) == 18
        train_contents = set()
        for g, (prompt, contents) in zip(gs, make_arena.FAMILIES[family]["prompts"]):
            assert g.prompt == prompt and 6 <= g.n <= 9 and g.n == 3 * len(contents)
            assert list(g.candidates) == [s.format(c=c) for c in contents for s in styles]
            assert np.allclose(g.P + g.P.T, 1.0) and np.allclose(np.diag(g.P), 0.5)
            if g.split == "train":
                train_contents |= set(contents)
        for g, (_, contents) in zip(gs, make_arena.FAMILIES[family]["prompts"]):
            if g.split == "test":
                assert not set(contents) & train_contents     # new contents, the family's styles
    # no content appears under two prompts, and each family's styles are its own
    all_contents = [c for spec in make_arena.FAMILIES.values() for _, cs in spec["prompts"] for c in cs]
    assert len(all_contents) == len(set(all_contents))
    decorated = [s for spec in make_arena.FAMILIES.values() for s in spec["styles"] if s != "{c}"]
    assert len(decorated) == len(set(decorated)) == 8


def test_cyclic_styles_are_intransitive_and_contents_tie():
    """Cyclic family: each style beats the next (P > ½ around a 3-cycle); contents in the same style tie (P ≈ ½)."""
    for g in load_games():
        if g.family != "cyclic":
            continue
        S = np.array([[g.P[a, b] for b in range(3)] for a in range(3)])   # content 0, styles a vs b
        beats = S > 0.5 + 0.2
        assert beats.sum() == 3 and all(beats[i].sum() == 1 for i in range(3))
        for s in range(3):
            same_style = g.P[s::3, s::3]
            assert np.abs(same_style - 0.5).max() < 0.1
