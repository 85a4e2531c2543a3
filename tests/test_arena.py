"""The arena's exact metrics: the regularized-equilibrium solver, the duality gap, games-file validation, and
the SFT metrics table reported in docs/arena.md."""
import importlib.util
import io
import json
import os
import re
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from common import arena
from common.arena import (GAMES_PATH, Games, GamesError, dual_gap, evaluate, game_metrics, kl, load_games,
                          residual, solve_nash, with_invalid)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_game(n, rng):
    """EGPO test-bed: diagonal ½, strict lower triangle ~ U(0, 1), upper = 1 − lower."""
    L = np.tril(rng.uniform(size=(n, n)), -1)
    return L + np.triu(1 - L.T, 1) + 0.5 * np.eye(n)


def random_simplex(n, rng, alpha=1.0):
    p = rng.dirichlet(alpha * np.ones(n))
    p = np.maximum(p, 1e-4)
    return p / p.sum()


def J(P, ref, p1, p2, beta):
    """J(π₁, π₂) = π₁ᵀ P π₂ − β KL(π₁‖π_ref) + β KL(π₂‖π_ref), docs/algorithms.md §0 (rows broadcast)."""
    def kl_rows(p):
        return np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(ref)), 0.0), axis=-1)
    return np.einsum("...i,ij,...j->...", p1, P, p2) - beta * kl_rows(p1) + beta * kl_rows(p2)


# ---- solver -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.01, 0.03, 0.1, 0.3, 1.0])
def test_solver_residual_and_zero_gap_random_games(beta):
    rng = np.random.default_rng(int(beta * 1000))
    for _ in range(10):
        P, ref = random_game(10, rng), random_simplex(10, rng, alpha=0.5)
        pi = solve_nash(P, ref, beta)
        assert residual(P, ref, pi, beta) <= 1e-10
        assert abs(pi.sum() - 1) < 1e-12 and pi.min() > 0
        assert abs(dual_gap(P, ref, pi, beta)) < 1e-9


def test_solver_on_every_arena_game_tabular_and_lm():
    """Tabular game (n actions, the file's ref) and LM game (n + 1 actions with the invalid action)."""
    games = load_games()
    for g in games:
        pi = solve_nash(g.P, g.ref, games.beta)
        assert residual(g.P, g.ref, pi, games.beta) <= 1e-10
        ref = np.append(g.ref * 0.9, 0.1)  # an SFT-like reference with 10% invalid mass
        Q = with_invalid(g.P)
        pi = solve_nash(Q, ref, games.beta)
        assert residual(Q, ref, pi, games.beta) <= 1e-10
        assert abs(dual_gap(Q, ref, pi, games.beta)) < 1e-9


def test_solver_symmetric_rps_uniform_ref_gives_uniform():
    P = np.array([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])
    pi = solve_nash(P, np.ones(3) / 3, 0.1)
    np.testing.assert_allclose(pi, np.ones(3) / 3, atol=1e-12)


def test_bradley_terry_equilibrium_is_not_the_rlhf_optimum():
    """docs/algorithms.md §0: under BT the RLHF optimum π_ref e^{r/β} is in general not π* — the solver must see it."""
    r = np.array([0.0, 1.0, 3.0])
    P = 1 / (1 + np.exp(-(r[:, None] - r[None, :])))
    ref, beta = np.ones(3) / 3, 0.5
    pi_r = ref * np.exp(r / beta)
    pi_r /= pi_r.sum()
    pi = solve_nash(P, ref, beta)
    assert np.abs(pi - pi_r).max() > 1e-2
    assert dual_gap(P, ref, pi_r, beta) > 1e-3


# ---- duality gap ---------------------------------------------------------------------------------------

def test_dual_gap_closed_form_equals_grid_search_3_actions():
    """DG = max_π₁ J(π₁, π) − min_π₂ J(π, π₂) by brute force on a simplex grid of step 1/600 (J is smooth, so
    the grid optimum is within ~1e-4 of the true one and never beyond it)."""
    rng = np.random.default_rng(1)
    k = 600
    i, j = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
    keep = i + j <= k
    grid = np.stack([i[keep], j[keep], k - i[keep] - j[keep]], axis=1) / k   # (M, 3)
    for beta in (0.05, 0.1, 0.5):
        for _ in range(3):
            P, ref, pi = random_game(3, rng), random_simplex(3, rng), random_simplex(3, rng)
            direct = J(P, ref, grid, pi, beta).max() - J(P, ref, pi, grid, beta).min()
            closed = dual_gap(P, ref, pi, beta)
            assert direct <= closed + 1e-12
            assert closed - direct < 2e-4, (closed, direct)


def test_dual_gap_closed_form_equals_numeric_optimization_10_actions():
    """max_π₁ J(π₁, π) and min_π₂ J(π, π₂) by equality-constrained Newton on the simplex (autograd gradient and
    Hessian of J in float64; the KKT system [[H, 1], [1ᵀ, 0]]), n = 10: no log-sum-exp formula involved."""
    rng = np.random.default_rng(2)
    for beta in (0.03, 0.1, 1.0):
        P, ref, pi = random_game(10, rng), random_simplex(10, rng), random_simplex(10, rng)
        Pt, reft, pit = (torch.tensor(a) for a in (P, ref, pi))

        def optimum(sign, first):
            def f(q):  # sign · J: strictly concave in q (the KL term), maximized over the simplex
                p1, p2 = (q, pit) if first else (pit, q)
                kl1 = (p1 * (p1.log() - reft.log())).sum()
                kl2 = (p2 * (p2.log() - reft.log())).sum()
                return sign * (p1 @ Pt @ p2 - beta * kl1 + beta * kl2)
            q = torch.full((10,), 0.1, dtype=torch.float64)
            K = torch.zeros(11, 11, dtype=torch.float64)
            K[:10, 10] = K[10, :10] = 1
            for _ in range(200):
                g = torch.autograd.functional.jacobian(f, q)
                K[:10, :10] = torch.autograd.functional.hessian(f, q)
                step = torch.linalg.solve(K, torch.cat([-g, g.new_zeros(1)]))[:10]  # Σ step = 0
                if (step @ g).abs() < 1e-28:
                    break
                t = 1.0
                while ((q + t * step).min() <= 0 or f(q + t * step) < f(q)) and t > 1e-12:
                    t /= 2
                q = q + t * step
            return sign * f(q).item()
        direct = optimum(+1, True) - optimum(-1, False)
        assert abs(direct - dual_gap(P, ref, pi, beta)) < 1e-10


def test_dual_gap_positive_away_from_equilibrium():
    rng = np.random.default_rng(3)
    for beta in (0.01, 0.1, 1.0):
        P, ref = random_game(10, rng), random_simplex(10, rng)
        star = solve_nash(P, ref, beta)
        for eps in (1e-3, 1e-2, 1e-1):
            pi = (1 - eps) * star + eps * random_simplex(10, rng)
            assert dual_gap(P, ref, pi, beta) > 0
        for _ in range(20):
            assert dual_gap(P, ref, random_simplex(10, rng), beta) > 0


def test_game_metrics_at_equilibrium_and_reference():
    rng = np.random.default_rng(4)
    P, ref, beta = random_game(6, rng), random_simplex(6, rng), 0.1
    star = solve_nash(P, ref, beta)
    m = game_metrics(P, ref, star, beta)
    assert abs(m["dual_gap"]) < 1e-9 and abs(m["kl_ne"]) < 1e-12
    assert 0 <= m["exploit"] <= 0.5
    assert m["win_vs_ref"] > 0.5  # π* beats π_ref: it is the regularized best response to itself
    m = game_metrics(P, ref, ref, beta)
    assert abs(m["win_vs_ref"] - 0.5) < 1e-15  # P + Pᵀ = 1
    assert abs(m["kl_ne"] - kl(star, ref)) < 1e-15
    Q = with_invalid(P)
    np.testing.assert_array_equal(Q + Q.T, np.ones((7, 7)))


def test_evaluate_keys_and_aggregation():
    games = load_games()
    rng = np.random.default_rng(5)
    pis = [random_simplex(g.n, rng) for g in games]
    m = evaluate(pis, games)
    rows = arena.per_game_metrics(pis, games)
    for name in arena.METRICS:
        assert abs(m[f"eval/{name}"] - np.mean([r[name] for r in rows])) < 1e-12
        for split in ("train", "test"):
            idx = [k for k, g in enumerate(games) if g.split == split]
            assert abs(m[f"eval/{name}/{split}"] - np.mean([rows[k][name] for k in idx])) < 1e-12
            for fam in ("bt", "cyclic", "random", "mixed"):
                idx = [k for k, g in enumerate(games) if g.split == split and g.family == fam]
                assert abs(m[f"eval/{name}/{split}/{fam}"] - np.mean([rows[k][name] for k in idx])) < 1e-12
    assert m["eval/valid"] == 1.0
    with pytest.raises(ValueError, match="LM"):
        evaluate([np.append(p, 0.0) for p in pis], games)  # LM-shaped policy without an LM-shaped ref


# ---- games files ----------------------------------------------------------------------------------------

def _write(tmp_path, obj):
    f = tmp_path / "g.json"
    f.write_text(json.dumps(obj))
    return str(f)


GOOD = {"id": "g0", "prompt": "p?", "candidates": ["a", "b"], "P": [[0.5, 0.7], [0.3, 0.5]],
        "family": "bt", "split": "train"}


@pytest.mark.parametrize("change,needle", [
    ({"P": [[0.5, 0.7], [0.4, 0.5]]}, "P \\+ P\\^T"),
    ({"P": [[0.6, 0.7], [0.3, 0.4]]}, "diagonal"),
    ({"P": [[0.5, 1.2], [-0.2, 0.5]]}, "\\[0, 1\\]"),
    ({"P": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}, "shape"),
    ({"candidates": ["a", " a "]}, "not unique"),
    ({"candidates": []}, "non-empty"),
    ({"ref": [0.5, 0.6]}, "ref"),
    ({"ref": [1.0]}, "ref"),
    ({"ref": [1.0, 0.0]}, "ref"),
    ({"split": 3}, "split"),
    ({"family": ""}, "family"),
])
def test_load_games_rejects_bad_games(tmp_path, change, needle):
    path = _write(tmp_path, {"beta": 0.1, "games": [dict(GOOD, **change)]})
    with pytest.raises(GamesError, match=needle) as e:
        load_games(path)
    assert path in str(e.value) and "'g0'" in str(e.value)


@pytest.mark.parametrize("obj,needle", [
    ({"beta": 0, "games": [GOOD]}, "beta"),
    ({"beta": -1, "games": [GOOD]}, "beta"),
    ({"games": [GOOD]}, "beta"),
    ({"beta": 0.1, "games": []}, "at least one game"),
    ({"beta": 0.1, "games": [GOOD, GOOD]}, "duplicate"),
])
def test_load_games_rejects_bad_files(tmp_path, obj, needle):
    path = _write(tmp_path, obj)
    with pytest.raises(GamesError, match=needle):
        load_games(path)


def test_load_games_default_ref_uniform_and_not_json(tmp_path):
    g = load_games(_write(tmp_path, {"beta": 0.1, "games": [GOOD]}))
    np.testing.assert_array_equal(g[0].ref, [0.5, 0.5])
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(GamesError, match="not valid JSON"):
        load_games(str(bad))


def test_arena_games_file():
    """The committed arena: 64–128 prompts, 3–10 candidates, every family in both splits, β = 0.1."""
    games = load_games(GAMES_PATH)
    assert isinstance(games, Games) and 64 <= len(games) <= 128 and games.beta == 0.1
    assert all(3 <= g.n <= 10 for g in games)
    assert {(g.split, g.family) for g in games} == {(s, f) for s in ("train", "test")
                                                    for f in ("bt", "cyclic", "random", "mixed")}
    assert len({g.prompt for g in games}) == len(games)


# ---- the SFT metrics docs/arena.md reports--------------------------------------------------------------

def _readme_table():
    text = open(os.path.join(ROOT, "docs", "arena.md")).read()
    region = text[text.index("<!-- arena:begin -->"):text.index("<!-- arena:end -->")]
    rows = {}
    for line in region.splitlines():
        m = re.match(r"\|\s*(all|train|test)(/\w+)?\s*\|\s*(\d+)\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1) + (m.group(2) or "")] = [float(v) for v in m.group(4).split("|")]
    return rows


def test_readme_reports_the_committed_sft_metrics():
    """docs/arena.md's SFT table equals freshly computed metrics of the committed checkpoint (printed with 4
    decimals: a fresh value may differ from the printed one by half a unit in the last place + float noise), and
    `python bench/arena_eval.py --split test` prints the same test rows."""
    rows = _readme_table()
    assert len(rows) == 1 + 2 + 8, sorted(rows)
    from common.lm_policy import LMPolicy
    sft = LMPolicy.load(arena.ARENA_DIR)
    fresh = evaluate(sft, load_games(), sft)
    for key, vals in rows.items():
        name = "" if key == "all" else "/" + key
        for m_name, v in zip(arena.METRICS, vals):
            assert abs(fresh[f"eval/{m_name}{name}"] - v) <= 0.5e-4 + 1e-7, (key, m_name)
    spec = importlib.util.spec_from_file_location("arena_eval", os.path.join(ROOT, "bench", "arena_eval.py"))
    arena_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arena_eval)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert arena_eval.main(["--split", "test"]) == 0
    printed = {}
    for line in buf.getvalue().splitlines():
        m = re.match(r"\|\s*(\S+)\s*\|\s*(\d+)\s*\|(.*)\|\s*$", line)
        if m:
            printed[m.group(1)] = [float(v) for v in m.group(3).split("|")]
    assert set(printed) == {"test", "all"} | {k for k in rows if k.startswith("test/")}
    for key, vals in printed.items():
        np.testing.assert_allclose(vals, rows["test" if key == "all" else key], atol=1e-4 + 1e-9, rtol=0)
