"""nash_dpo.py: Eqs. (8)/(13) against their formulas, one exact update against Eq. (9), online DPO's Bradley–Terry
optimum, the pair builders against a known oracle, the scripts end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch

import nash_dpo
from common.judges import Judge
from common.policy import Samples
from conftest import (bt_P, check_lm_runs, check_real_world_run, meta_tabular, random_P, read_metrics, read_policy,
                      run_script, write_games)


def run_dno(tmp_path, name="run", **kw):
    return nash_dpo.main(nash_dpo.Args(run_dir=str(tmp_path / name), **kw))


@pytest.fixture
def bt_games(tmp_path):
    """Two Bradley–Terry games (6 actions, rewards ~ N(0, 1)), β = 0.1, non-uniform refs; returns (path, rewards)."""
    rng = np.random.default_rng(0)
    rs = [rng.normal(size=6) for _ in range(2)]
    refs = [rng.dirichlet(np.ones(6)) + 0.02 for _ in range(2)]
    refs = [r / r.sum() for r in refs]
    return write_games(tmp_path / "bt.json", [bt_P(r) for r in rs], refs=refs, family="bt"), rs


def rlhf_optimum(ref, r, beta):
    w = np.asarray(ref) * np.exp(np.asarray(r) / beta)
    return w / w.sum()


# ---- the loss -----------------------------------------------------------------------------------------------

def test_loss_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    pw, pl, aw, al = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(4))
    eta = 0.3
    m = [eta * ((pw[i] - aw[i]) - (pl[i] - al[i])) for i in range(7)]
    sig = lambda x: 1 / (1 + math.exp(-float(x)))
    loss, margin = nash_dpo.dpo_loss(pw, pl, aw, al, eta)
    assert torch.allclose(margin, torch.stack(m), atol=1e-12)
    assert abs(float(loss) - np.mean([-math.log(sig(x)) for x in m])) < 1e-12
    p = torch.rand(7, generator=g, dtype=torch.float64)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    soft, _ = nash_dpo.dpo_loss(pw, pl, aw, al, eta, labels=p, weights=w)
    by_hand = [-(p[i] * math.log(sig(m[i])) + (1 - p[i]) * math.log(sig(-m[i]))) for i in range(7)]
    assert abs(float(soft) - float((w * torch.stack(by_hand)).sum() / w.sum())) < 1e-12


def test_loss_known_values():
    z = torch.zeros(4, dtype=torch.float64)
    loss, _ = nash_dpo.dpo_loss(z, z, z, z, 0.1)
    assert abs(float(loss) - math.log(2)) < 1e-15                     # DPO at zero margin = log 2
    # Eq. (8): the soft-label loss is stationary exactly where σ(margin) = p (the regression target)
    p = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    eta = 0.25
    x = (torch.logit(p) / eta).requires_grad_(True)
    loss, margin = nash_dpo.dpo_loss(x, 0.0, 0.0, 0.0, eta, labels=p)
    loss.backward()
    assert torch.allclose(torch.sigmoid(margin), p) and x.grad.abs().max() < 1e-15
    # a hard pair pushes the chosen log-prob up and the rejected one down
    pw, pl = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    nash_dpo.dpo_loss(pw, pl, z, z, 0.1)[0].backward()
    assert (pw.grad < 0).all() and (pl.grad > 0).all()


# ---- exact expectations (tabular) --------------------------------------------------------------------------

def test_one_exact_dno_update_equals_eq9(tmp_path, random_games):
    """Minimizing the exact Eq. (8) regression from π_t = π_ref gives Eq. (9): π_{t+1} ∝ π_t exp(r_t/η)."""
    from common.arena import load_games
    run = run_dno(tmp_path, policy="tabular", pairs="exact", iterations=1, games=random_games)
    got, games = read_policy(run), load_games(random_games)
    for g in games:
        ref = torch.tensor(g.ref)
        want = nash_dpo.soft_policy_iteration_step(ref, torch.tensor(g.P), games.beta).numpy()
        assert np.abs(np.array(got[g.id]) - want).max() <= 1e-6
        assert np.abs(want - g.ref).max() > 1e-2

@pytest.mark.parametrize("soft", [True, False])
def test_exact_loss_makes_no_cpu_only_tensors(random_games, soft):
    """--pairs exact runs where the policy lives (setup_world picks CUDA when there is one): on the meta device, any
    tensor the loss builds on the CPU (e.g. a torch.eye without device=) raises a device mismatch."""
    pol, P = meta_tabular(random_games)
    loss = nash_dpo.exact_loss(pol, pol, pol, P, 0.1, soft)
    assert loss.device.type == "meta" and loss.shape == ()



def test_exact_dno_iterates_chase_the_unregularized_winner(tmp_path, bt_games):
    """Eq. (9) iterated on a Bradley–Terry game has no π_ref term: the iterates concentrate on the best answer, so the
    unregularized exploitability max_y P(y ≻ π) − ½ goes to 0 — while the β-regularized gap does not."""
    from common.arena import load_games
    path, rs = bt_games
    run = run_dno(tmp_path, policy="tabular", pairs="exact", iterations=8, games=path)
    rows, final = read_metrics(run), read_policy(run)
    for g, r in zip(load_games(path), rs):
        assert final[g.id][int(np.argmax(r))] > 0.99
    assert rows[-1]["eval/exploit"] < 0.01 < rows[0]["eval/exploit"]
    assert rows[-1]["eval/dual_gap"] > 0.05


def test_exact_online_dpo_reaches_the_rlhf_optimum(tmp_path, bt_games):
    """--ref sft on Bradley–Terry preferences: the expected online-DPO loss is minimized by π_ref e^{r/β}, reached in
    one exact iteration and kept (a fixed point) — it is not the Nash equilibrium of the regularized game."""
    from common.arena import equilibrium, load_games
    path, rs = bt_games
    games = load_games(path)
    for T in (1, 3):
        final = read_policy(run_dno(tmp_path, f"T{T}", policy="tabular", pairs="exact", ref="sft", iterations=T,
                                    games=path))
        for g, r in zip(games, rs):
            want = rlhf_optimum(g.ref, r, games.beta)
            assert np.abs(np.array(final[g.id]) - want).max() <= 1e-6
            assert np.abs(want - equilibrium(g.P, g.ref, games.beta)).max() > 1e-2   # π_r ≠ π*


def test_sampled_online_dpo_approaches_the_rlhf_optimum(tmp_path, bt_games):
    from common.arena import load_games
    path, rs = bt_games
    games = load_games(path)
    run = run_dno(tmp_path, policy="tabular", ref="sft", pairs="random", iterations=6, groups_per_prompt=2000,
                  epochs=2, batch_size=256, lr=0.05, games=path, seed=2)
    final = read_policy(run)
    for g, r in zip(games, rs):
        want = rlhf_optimum(g.ref, r, games.beta)
        start, end = np.abs(np.array(g.ref) - want).max(), np.abs(np.array(final[g.id]) - want).max()
        assert end <= start / 5, (start, end)


def test_sampled_dno_cuts_exploitability_on_bt(tmp_path, bt_games):
    path, _ = bt_games
    rows = read_metrics(run_dno(tmp_path, policy="tabular", iterations=4, groups_per_prompt=200, epochs=2, batch_size=64,
                                lr=0.05, games=path))  # the pre-tabular-defaults values
    assert rows[-1]["eval/exploit"] <= rows[0]["eval/exploit"] / 3
    assert all(row["train/pairs"] > 0 for row in rows[1:])


# ---- pair builders ------------------------------------------------------------------------------------------

class MatrixJudge(Judge):
    """P(a_i ≻ a_j) = M[i, j] for texts 'a<i>', the same matrix for every prompt; counts calls."""
    def __init__(self, M):
        self.M, self.calls = torch.as_tensor(M, dtype=torch.float64), 0

    def prob(self, prompts, a, b):
        self.calls += 1
        return self.M[[int(x[1:]) for x in a], [int(x[1:]) for x in b]]


def samples(texts):
    n = len(texts)
    return Samples(prompts=["p"] * n, texts=list(texts), game_ids=[None] * n, actions=torch.zeros(n, dtype=torch.long))


def test_dno_pairs_rank_by_win_rate_and_filter_small_margins():
    # actions 0..4 transitive (higher index wins surely); actions 5..9 a 5-cycle (each beats the next two surely)
    M = np.full((10, 10), 0.5)
    for i in range(5):
        for j in range(5):
            if i != j:
                M[i, j] = float(i > j)
                d = (j - i) % 5
                M[5 + i, 5 + j] = 1.0 if d in (1, 2) else 0.0
    transitive, cyclic = ["a3", "a0", "a4", "a1", "a2"], ["a5", "a6", "a7", "a8", "a9"]
    y = samples(transitive + cyclic + transitive[::-1])
    judge = MatrixJudge(M)
    w, l, rate = nash_dpo.dno_pairs(y, 5, judge, torch.Generator().manual_seed(0), margin=0.5)
    assert judge.calls == 10                                   # K(K−1)/2 comparisons, each for every group
    assert [y.texts[i] for i in w.tolist()] == ["a4", "a4"] and [y.texts[i] for i in l.tolist()] == ["a0", "a0"]
    assert torch.equal(rate[1], torch.full((5,), 0.5, dtype=torch.float64))  # the cycle: no margin, no pair
    assert torch.equal(rate[0].sort().values, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))


def test_best_worst_pairs_follow_the_reward_and_skip_ties():
    r = np.array([0.3, -1.0, 2.0, 0.0, 1.2])
    y = samples(["a0", "a1", "a2", "a3", "a4"] + ["a3"] * 5)
    w, l = nash_dpo.best_worst_pairs(y, 5, MatrixJudge(bt_P(r)))
    assert [y.texts[i] for i in w.tolist()] == ["a2"] and [y.texts[i] for i in l.tolist()] == ["a1"]


def test_random_pairs_order_by_the_label():
    M = np.array([[0.5, 0.0], [1.0, 0.5]])                     # a1 always beats a0
    y = samples(["a0", "a1", "a1", "a0", "a1", "a1"])
    w, l = nash_dpo.random_pairs(y, MatrixJudge(M), torch.Generator().manual_seed(0))
    assert w.tolist() == [1, 2, 4] and l.tolist() == [0, 3, 5]


# ---- the script end to end ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["--ref", "sft", "--pairs", "random"], ["--pairs", "best-worst"]],
                         ids=["dno", "online-dpo", "iterative-dpo"])
def test_arena_lm_end_to_end_and_bitwise_determinism(tmp_path, mode):
    rows, _ = check_lm_runs(tmp_path, "nash_dpo.py", "--iterations", "1", "--groups-per-prompt", "1",
                            "--epochs", "1", *mode)
    assert 0 < rows[1]["train/pairs"] <= 72


def test_tabular_end_to_end_determinism(tmp_path, random_games):
    a = run_dno(tmp_path, "a", policy="tabular", iterations=2, games=random_games, seed=7)
    b = run_dno(tmp_path, "b", policy="tabular", iterations=2, games=random_games, seed=7)
    c = run_dno(tmp_path, "c", policy="tabular", iterations=2, games=random_games, seed=8)
    assert read_policy(a) == read_policy(b) and read_policy(a) != read_policy(c)
    for f in ("args.json", "metrics.jsonl", "policy.json"):
        assert os.path.isfile(os.path.join(a, f))


@pytest.mark.parametrize("mode", [[], ["--ref", "sft", "--pairs", "random"]], ids=["dno", "online-dpo"])
def test_real_checkpoint_world_with_reward_model_judge(tmp_path, real_world, mode):
    """World 3: an HF-layout policy, a reward-model judge (P = σ(r − r')), a prompts file; no games file."""
    run_dir = tmp_path / "run"
    r = run_script("nash_dpo.py", *real_world, *mode, "--iterations", "1", "--groups-per-prompt", "2",
                   "--margin", "0.25", "--run-dir", str(run_dir))
    rows = check_real_world_run(run_dir, r)
    assert 0 < rows[1]["train/pairs"] <= 4              # 2 prompts × 2 groups, at most one pair each


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["games", "ref", "pairs", "exact-lm", "margin", "k", "eta", "flag"])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, case):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"beta": 0.1, "games": [{"id": "g0", "prompt": "p", "candidates": ["a", "b"],
                                                         "P": [[0.5, 0.7], [0.2, 0.5]]}]}))
    good = write_games(tmp_path / "good.json", [random_P(4, np.random.default_rng(0))])
    argv = {"games": ["--policy", "tabular", "--games", str(bad)],
            "ref": ["--ref", "teacher"],
            "pairs": ["--pairs", "tournament"],
            "exact-lm": ["--pairs", "exact"],
            "margin": ["--margin", "0"],
            "k": ["--samples-per-prompt", "1"],
            "eta": ["--policy", "tabular", "--games", good, "--eta", "-0.1"],
            "flag": ["--groups-per-prompt", "many"]}[case]
    run_dir = tmp_path / "run"
    r = run_script("nash_dpo.py", *argv, "--run-dir", str(run_dir), "--iterations", "1")
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    expected = {"games": "bad.json", "ref": "--ref", "pairs": "--pairs", "exact-lm": "--pairs exact",
                "margin": "--margin", "k": "--samples-per-prompt", "eta": "--eta",
                "flag": "--groups-per-prompt"}[case]
    assert expected in lines[0]
    assert not run_dir.exists() and not os.path.exists(str(run_dir) + ".incomplete")
