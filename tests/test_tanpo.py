"""tanpo.py: the losses against their formulas; exact tabular iterations against closed forms (the max-player is
the DPO optimum π_r ∝ π_ref e^{r/α}; the min-player satisfies the first-order condition of L_DPO + c_t·bonus with
c_t = (α/η)/t and reaches π_r once c_t is small); sampled runs; the scripts end to end; bad input."""
import json
import os

import numpy as np
import pytest
import torch

import tanpo
from common.arena import load_games
from conftest import (bt_P, check_lm_runs, check_real_world_run, cyclic_P, read_metrics, read_policy, run_script,
                      write_games)

METRICS = ("dual_gap", "exploit", "kl_ne", "win_vs_ref", "valid")


def run_tanpo(tmp_path, name="run", **kw):
    return tanpo.main(tanpo.Args(run_dir=str(tmp_path / name), **kw))


def read_max_policy(run_dir):
    with open(os.path.join(run_dir, "policy_max.json")) as f:
        return json.load(f)


# ---- the losses ---------------------------------------------------------------------------------------------

def test_dpo_loss_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(4))
    alpha = 0.3
    loss, margin = tanpo.dpo_loss(pw, pl, rw, rl, alpha)
    by_hand = [np.log(1 + np.exp(-alpha * float((pw[i] - rw[i]) - (pl[i] - rl[i])))) for i in range(7)]
    assert abs(float(loss) - np.mean(by_hand)) < 1e-12
    assert torch.allclose(margin, alpha * ((pw - rw) - (pl - rl)), atol=1e-15)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    wloss, _ = tanpo.dpo_loss(pw, pl, rw, rl, alpha, weights=w)
    assert abs(float(wloss) - float((w * torch.tensor(by_hand)).sum() / w.sum())) < 1e-12


def test_dpo_loss_at_zero_margin_and_its_gradient_sign():
    z = torch.zeros(4, dtype=torch.float64)
    loss, margin = tanpo.dpo_loss(z, z, z, z, 0.1)
    assert abs(float(loss) - np.log(2)) < 1e-15 and torch.equal(margin, z)
    pw = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    pl = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    alpha = 0.5
    loss, m = tanpo.dpo_loss(pw, pl, z, z, alpha)
    loss.backward()
    expected = -alpha * torch.sigmoid(-m) / 4            # d(−log σ(m))/dℓ_w = −α σ(−m) / B
    assert torch.allclose(pw.grad, expected, atol=1e-15) and (pw.grad < 0).all()  # raise the winner
    assert torch.allclose(pl.grad, -expected, atol=1e-15) and (pl.grad > 0).all()  # lower the loser


def test_exploration_bonus_matches_hand_formula_and_lowers_the_samples_likelihood():
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    c = 0.07
    bonus = tanpo.exploration_bonus(lp, c)
    assert abs(float(bonus.detach()) - c * float(lp.detach().mean())) < 1e-15
    bonus.backward()
    assert torch.allclose(lp.grad, torch.full((6,), c / 6, dtype=torch.float64)) and (lp.grad > 0).all()
    w = torch.rand(6, generator=g, dtype=torch.float64)
    wb = tanpo.exploration_bonus(lp.detach(), c, weights=w)
    assert abs(float(wb) - c * float((w * lp.detach()).sum() / w.sum())) < 1e-15


# ---- exact expectations (tabular) ----------------------------------------------------------------------------

REWARDS = [np.array([0.0, 0.05, 0.1, 0.15]), np.array([0.1, 0.0, 0.12, 0.04])]
REFS = [np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.2, 0.35, 0.15, 0.3])]
ETA = 10.0  # the default; at η = 1 the min-player's exact loss is unbounded below on these games (see below)


@pytest.fixture
def bt_games(tmp_path):
    return write_games(tmp_path / "bt.json", [bt_P(r) for r in REWARDS], beta=0.1, refs=REFS, family="bt")


def pi_r(ref, r, alpha):
    p = ref * np.exp(r / alpha)
    return p / p.sum()


def temper(p, T):
    z = np.log(p) / T
    z = np.exp(z - z.max())
    return z / z.sum()


def pair_weights(P, pi, mu):
    """Ordered pairs (winner a, loser b) of one draw a¹ ∼ π^{1/0.7}, a² ∼ μ^{1/0.5}, ordered by the oracle."""
    p, q = temper(pi, 0.7), temper(mu, 0.5)
    return P * (np.outer(p, q) + np.outer(q, p))


def dpo_gradient(mu, ref, W, alpha):
    """∂/∂θ of Σ_ab W_ab (−log σ(α(h_a − h_b))), h = log μ − log π_ref, μ = softmax(θ), by hand."""
    h = np.log(mu) - np.log(ref)
    s = W * alpha / (1 + np.exp(alpha * (h[:, None] - h[None, :])))   # W_ab α σ(−margin_ab)
    return -s.sum(1) + s.sum(0)


def test_exact_first_iteration_max_player_is_pi_r(tmp_path, bt_games):
    """The DPO optimum on a D of full support under Bradley–Terry labels is π_ref e^{r/α}, whatever D's mixture."""
    run = run_tanpo(tmp_path, policy="tabular", pairs="exact", iterations=1, games=bt_games, eta=ETA)
    got = read_max_policy(run)
    for g, r in zip(load_games(bt_games), REWARDS):
        want = pi_r(g.ref, r, 0.1)
        assert np.abs(np.array(got[g.id]) - want).max() <= 1e-6
        assert np.abs(want - g.ref).max() > 0.1  # the update moved: the check is not vacuous


@pytest.mark.parametrize("t", [1, 2])
def test_exact_min_player_is_stationary_for_dpo_plus_bonus(tmp_path, bt_games, t):
    """μ_{t+1} solves ∇_θ L_DPO(μ; D_t) + c_t (π_{t+1} − μ) = 0 (the bonus c_t E_{π_{t+1}} log μ has gradient
    c_t (π_{t+1} − μ) in the logits), with D_t the mixture of the pairs of iterations 1..t and c_t = (α/η)/t.
    A flipped bonus sign would give μ = π_r (both terms are then minimized there); no 1/t breaks t = 2."""
    games = load_games(bt_games)
    alpha = games.beta
    runs = [run_tanpo(tmp_path, f"T{T}", policy="tabular", pairs="exact", iterations=T, games=bt_games, eta=ETA)
            for T in range(1, t + 1)]
    pis = [{g.id: g.ref for g in games}] + [{k: np.array(v) for k, v in read_max_policy(r).items()} for r in runs]
    mus = [{g.id: g.ref for g in games}] + [{k: np.array(v) for k, v in read_policy(r).items()} for r in runs]
    c = alpha / ETA / t
    for g, r in zip(games, REWARDS):
        W = np.mean([pair_weights(g.P, pis[s][g.id], mus[s][g.id]) for s in range(t)], axis=0)
        pi_next, mu = pis[t][g.id], mus[t][g.id]
        residual = dpo_gradient(mu, g.ref, W, alpha) + c * (pi_next - mu)
        assert np.abs(residual).max() <= 1e-5, residual
        assert np.abs(mu - pi_r(g.ref, r, alpha)).max() > 0.3   # the bonus keeps μ away from π_r


def test_exact_iterates_reach_pi_r_as_the_bonus_decays(tmp_path, bt_games):
    """π_r is a stationary point of L_min once π_{t+1} = π_r, and a local minimum once c_t is small: the
    min-player's distance to π_r falls from > 0.3 to ≤ 1e-6 (with a constant c it stays far)."""
    games = load_games(bt_games)
    dist = []
    for T in (1, 2, 3, 4, 10):
        run = run_tanpo(tmp_path, f"T{T}", policy="tabular", pairs="exact", iterations=T, games=bt_games, eta=ETA)
        mu, pi = read_policy(run), read_max_policy(run)
        targets = [pi_r(g.ref, r, games.beta) for g, r in zip(games, REWARDS)]
        dist.append(max(np.abs(np.array(mu[g.id]) - p).max() for g, p in zip(games, targets)))
        assert max(np.abs(np.array(pi[g.id]) - p).max() for g, p in zip(games, targets)) <= 1e-6
    assert dist[0] > 0.3 and dist[-1] <= 1e-6
    assert all(b <= a + 1e-9 for a, b in zip(dist, dist[1:])), dist  # non-increasing on these games
    rows = read_metrics(str(tmp_path / "T10"))
    assert [row["train/bonus_coef"] for row in rows[1:]] == pytest.approx([0.1 / ETA / t for t in range(1, 11)])


def test_exact_unbounded_min_player_fails_clearly(tmp_path, bt_games, capsys):
    """At η = 1 the bonus (α/η)·π_{t+1}(a) outweighs D's evidence for a (α·mass of pairs a wins): L_min has no
    minimizer. The run stops with one error line naming the cause; no finished run dir appears (the interrupted
    folder stays <dir>.incomplete with its last complete checkpoint, here none: it failed in iteration 1)."""
    with pytest.raises(SystemExit) as e:
        run_tanpo(tmp_path, policy="tabular", pairs="exact", iterations=2, games=bt_games, eta=1.0)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "error: --pairs exact: iteration 1: the min-player's loss has no minimizer" in err
    assert not (tmp_path / "run").exists()
    assert not any(n.startswith("checkpoint-") for n in os.listdir(tmp_path / "run.incomplete"))


# ---- sampled pairs -----------------------------------------------------------------------------------------

def test_sampled_max_player_approaches_pi_r(tmp_path):
    """Oracle labels on sampled pairs, α = β = 0.5, rewards 0…3 (P from 0.05 to 0.95): the max-player's L∞ error
    to π_r falls at least 5× from π_ref's (11–42× over seeds 3–10 with these settings; large minibatches keep
    constant-step Adam's jitter below the target)."""
    rewards = [np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.0, 0.0, 3.0, 1.0])]
    path = write_games(tmp_path / "bt.json", [bt_P(r) for r in rewards], beta=0.5, refs=REFS, family="bt")
    games = load_games(path)
    run = run_tanpo(tmp_path, policy="tabular", iterations=8, pairs_per_prompt=512, batch_size=1024, epochs=8,
                    lr=0.05, games=path, seed=3)
    got = read_max_policy(run)
    for g, r in zip(games, rewards):
        want = pi_r(g.ref, r, games.beta)
        assert np.abs(np.array(got[g.id]) - want).max() <= np.abs(g.ref - want).max() / 5
    rows = read_metrics(run)
    assert all(np.isfinite(row["train/diversity"]) and row["train/diversity"] > 0 for row in rows[1:])
    assert [row["train/pairs"] for row in rows[1:]] == [2 * 512 * k for k in range(1, 9)]  # D accumulates


def test_cyclic_game_runs_and_writes_the_contract_files(tmp_path):
    """No convergence claim on intransitive games (TANPO's game is Bradley–Terry only): finite metrics, the
    diversity metric, both players' eval keys and files, same-seed determinism."""
    ref = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
    games = write_games(tmp_path / "cyc.json", [cyclic_P(5), cyclic_P(3, 0.8)], refs=[ref, [0.5, 0.3, 0.2]],
                        family="cyclic")
    a = run_tanpo(tmp_path, "a", policy="tabular", iterations=3, games=games, seed=4)
    b = run_tanpo(tmp_path, "b", policy="tabular", iterations=3, games=games, seed=4)
    for f in ("args.json", "metrics.jsonl", "policy.json", "policy_max.json"):
        assert os.path.isfile(os.path.join(a, f)), f
    assert read_policy(a) == read_policy(b) and read_max_policy(a) == read_max_policy(b)
    assert read_policy(a) != read_max_policy(a)
    rows = read_metrics(a)
    assert [row["iteration"] for row in rows] == [0, 1, 2, 3]
    for row in rows:
        for m in METRICS:
            assert np.isfinite(row[f"eval/{m}"]) and np.isfinite(row[f"eval_max/{m}"]), m
    for row in rows[1:]:
        for k in ("train/diversity", "train/loss_max", "train/loss_min", "train/bonus_coef"):
            assert np.isfinite(row[k]), k


def test_sadpo_tabular_single_policy(tmp_path, bt_games):
    run = run_tanpo(tmp_path, policy="tabular", single_agent=True, iterations=2, pairs_per_prompt=32,
                    games=bt_games)
    assert os.path.isfile(os.path.join(run, "policy.json"))
    assert not any(os.path.exists(os.path.join(run, f)) for f in ("policy_max.json", "max_player"))
    rows = read_metrics(run)
    assert not any(k.startswith("eval_max/") for row in rows for k in row)
    assert all(np.isfinite(row[f"eval/{m}"]) for row in rows for m in METRICS)
    assert [row["train/pairs"] for row in rows[1:]] == [2 * 32, 4 * 32]      # one pair per group of K = 4
    assert all(np.isfinite(row["train/loss"]) and row["train/diversity"] > 0 for row in rows[1:])
    assert read_policy(run) != {g.id: list(g.ref) for g in load_games(bt_games)}


def test_sadpo_pairs_are_the_extremes_of_each_group():
    ref_norm = torch.tensor([-1.0, -3.0, -0.5, -2.0, -4.0, -4.5, -0.1, -1.0])
    hi, lo = tanpo.extreme_pairs(ref_norm, 4)
    assert hi.tolist() == [2, 6] and lo.tolist() == [1, 5]


# ---- the script end to end (arena LM) ---------------------------------------------------------------------

def test_arena_lm_end_to_end_and_bitwise_determinism(tmp_path):
    rows, out = check_lm_runs(tmp_path, "tanpo.py", "--iterations", "1", "--pairs-per-prompt", "1",
                              "--bonus-samples", "1", "--epochs", "1")
    assert rows[1]["train/pairs"] == 72
    assert all(np.isfinite(row[f"eval_max/{m}"]) for row in rows for m in METRICS)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(tmp_path / "a" / "max_player" / f), f
    assert "max-player" in out


def test_arena_lm_sadpo_end_to_end(tmp_path):
    """One run (the determinism of the shared code path is checked above): SADPO's files and metrics."""
    r = run_script("tanpo.py", "--single-agent", "--iterations", "1", "--pairs-per-prompt", "1", "--sadpo-k", "2",
                   "--bonus-samples", "1", "--epochs", "1", "--run-dir", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("args.json", "metrics.jsonl", "config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(tmp_path / "a" / f), f
    assert not (tmp_path / "a" / "max_player").exists() and "max-player" not in r.stdout
    rows = read_metrics(tmp_path / "a")
    assert [row["iteration"] for row in rows] == [0, 1] and rows[1]["train/pairs"] == 72
    assert all(np.isfinite(row[f"eval/{m}"]) for row in rows for m in METRICS)
    assert np.isfinite(rows[1]["train/loss"]) and np.isfinite(rows[1]["train/diversity"])


def test_real_checkpoint_world_with_reward_model_judge(tmp_path, real_world):
    """World 3: an HF-layout policy, a reward-model judge, a prompts file; both players saved in HF layout."""
    run_dir = tmp_path / "run"
    r = run_script("tanpo.py", *real_world, "--iterations", "1", "--pairs-per-prompt", "2", "--bonus-samples", "1",
                   "--run-dir", str(run_dir))
    rows = check_real_world_run(run_dir, r, pairs=4)                     # 2 prompts × 2 pairs
    assert 0 <= rows[1]["eval_max/win_vs_ref"] <= 1
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(run_dir / "max_player" / f), f


# ---- bad input ---------------------------------------------------------------------------------------------

def bad_games(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"beta": 0.1, "games": [{"id": "g0", "prompt": "p", "candidates": ["a", "b"],
                                                       "P": [[0.5, 0.7], [0.2, 0.5]]}]}))
    return str(f)


@pytest.mark.parametrize("case", ["games", "pairs-lm", "alpha", "iterations", "flag"])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, case):
    run_dir = tmp_path / "run"
    argv = {"games": ["--policy", "tabular", "--games", bad_games(tmp_path)],
            "pairs-lm": ["--pairs", "exact"],
            "alpha": ["--alpha", "-1"],
            "iterations": ["--iterations", "0"],
            "flag": ["--eta", "fast"]}[case]
    r = run_script("tanpo.py", *argv, "--run-dir", str(run_dir))
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    expected = {"games": "bad.json", "pairs-lm": "--pairs exact", "alpha": "--alpha", "iterations": "--iterations",
                "flag": "--eta"}[case]
    assert expected in lines[0]
    assert not run_dir.exists() and not os.path.exists(str(run_dir) + ".incomplete")


@pytest.mark.parametrize("kw", [dict(eta=0.0), dict(temperature_max=-0.7), dict(temperature_min=0.0), dict(lr=0.0),
                                dict(sadpo_k=1), dict(bonus_samples=0), dict(pairs_per_prompt=0), dict(epochs=0),
                                dict(batch_size=0), dict(pairs="iid"),
                                dict(pairs="exact", policy="tabular", single_agent=True)])
def test_every_flag_is_validated_before_anything_is_written(tmp_path, capsys, kw):
    with pytest.raises(SystemExit) as e:
        run_tanpo(tmp_path, **kw)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    flag = next(iter(kw)).replace("_", "-")
    assert err.startswith(f"error: --{flag} ") and "\n" not in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.incomplete").exists()
