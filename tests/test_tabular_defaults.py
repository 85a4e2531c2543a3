"""The tabular defaults converge: each script run as a user runs it — `--policy tabular --games FILE --seed S
--run-dir DIR` and no other flag — ends within a tenth of where it started, on EVERY game of a test-bed drawn here
(seeded; other matrices and refs than bench/tabular_testbed.py's, on which the defaults were chosen).

    inpo.py, nash_mp.py (its default --step pg)   dual gap of the β-regularized game, random / cyclic / BT games
    nash_dpo.py --ref sft --pairs random          KL(π_r‖π) to the RLHF optimum π_r ∝ π_ref e^{r/β}, BT games
    tanpo.py (both players)                       KL(π_r‖·), π_r ∝ π_ref e^{r/α}, α = the games' β, BT games

The games of a script share one games file (one run); the tables are independent and each game's figure is read from
the run's policy.json (policy_max.json: TANPO's max-player) and the game's own matrix, so the bound holds per game.
The sampled iterates level off at a small absolute noise floor, so every game's start is asserted to be well above
it (a ratio bound on a start near 0 would test the noise, and a start of 0 cannot fail)."""
import json
import os

import numpy as np
import pytest

from common.arena import dual_gap, kl
from conftest import bt_P, cyclic_P, random_P, run_script, write_games

BETA = 0.1
RATIO = 0.1


def _ref(rng, n, concentration):
    p = rng.dirichlet(np.full(n, concentration)) + 0.01
    return p / p.sum()


def _pi_r(ref, r, beta):
    z = np.log(ref) + r / beta
    p = np.exp(z - z.max())
    return p / p.sum()


def draw_testbed():
    """[(name, P, ref, r)]: random 10 actions, cyclic 3, 5, 7 (strength ∼ U(0.7, 0.95)), BT 9 (and 4 for the BT-only
    runs), rewards ∼ N(0, 1). Refs: uniform and Dirichlet(1) (floored at 0.01, renormalized); a
    circulant cyclic game's π* under a uniform π_ref is uniform (start 0), so it gets Dirichlet(2) and Dirichlet(1)."""
    rng = np.random.default_rng(31_415_926)
    games = []
    for n in (10,):
        P = random_P(n, rng)
        games += [(f"random{n}-uniform", P, np.full(n, 1 / n), None), (f"random{n}-skewed", P, _ref(rng, n, 1.0), None)]
    for n in (3, 5, 7):
        P = cyclic_P(n, rng.uniform(0.7, 0.95))
        games += [(f"cyclic{n}-mild", P, _ref(rng, n, 2.0), None), (f"cyclic{n}-skewed", P, _ref(rng, n, 1.0), None)]
    for n in (4, 9):
        r = rng.normal(size=n)
        games += [(f"bt{n}-uniform", bt_P(r), np.full(n, 1 / n), r), (f"bt{n}-skewed", bt_P(r), _ref(rng, n, 1.0), r)]
    return games


@pytest.fixture(scope="module")
def testbed():
    return draw_testbed()


def run_user(tmp_path, script, games, *flags, seed=1):
    """`python script *flags --policy tabular --games FILE --seed S --run-dir DIR`; returns the run dir."""
    path = write_games(tmp_path / "games.json", [g[1] for g in games], beta=BETA, refs=[g[2] for g in games])
    run_dir = str(tmp_path / "run")
    r = run_script(script, *flags, "--policy", "tabular", "--games", path, "--seed", str(seed), "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def final_policy(run_dir, name="policy.json"):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


def check_ratios(games, final, metric, floor):
    """Every game: start = metric(π_ref) ≥ floor (not near 0) and metric(final) ≤ RATIO · start."""
    bad = []
    for k, (name, P, ref, r) in enumerate(games):
        start, end = metric(P, ref, r, ref), metric(P, ref, r, np.array(final[f"g{k}"]))
        assert start >= floor, (name, start)
        if not end <= RATIO * start:
            bad.append((name, start, end, end / start))
    assert not bad, bad


def gap(P, ref, r, pi):
    return dual_gap(P, ref, pi, BETA)


def kl_to_pi_r(P, ref, r, pi):
    return kl(_pi_r(ref, r, BETA), pi)


def nash_games(testbed):
    """random 10, cyclic 3, 5, 7 and BT 9, each with two refs: 10 games."""
    return [g for g in testbed if not g[0].startswith("bt4")]


def bt_games(testbed):
    """BT 4 and 9, each with a uniform and a skewed ref: 4 games."""
    return [g for g in testbed if g[0].startswith("bt")]


@pytest.mark.parametrize("script", ["inpo.py", "nash_mp.py"])
def test_dual_gap_falls_tenfold_on_every_game(tmp_path, testbed, script):
    games = nash_games(testbed)
    assert {g[0][:2] for g in games} == {"ra", "cy", "bt"} and len(games) == 10
    run_dir = run_user(tmp_path, script, games)
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    if script == "nash_mp.py":
        assert args["step"] == "pg"      # the sampled policy gradient, not the closed form
    check_ratios(games, final_policy(run_dir), gap, floor=0.01)


def test_online_dpo_reaches_the_rlhf_optimum_on_every_bt_game(tmp_path, testbed):
    games = bt_games(testbed)
    run_dir = run_user(tmp_path, "nash_dpo.py", games, "--ref", "sft", "--pairs", "random")
    check_ratios(games, final_policy(run_dir), kl_to_pi_r, floor=0.1)


def test_tanpo_both_players_reach_pi_r_on_every_bt_game(tmp_path, testbed):
    games = bt_games(testbed)
    run_dir = run_user(tmp_path, "tanpo.py", games)
    check_ratios(games, final_policy(run_dir), kl_to_pi_r, floor=0.1)                       # min-player μ
    check_ratios(games, final_policy(run_dir, "policy_max.json"), kl_to_pi_r, floor=0.1)    # max-player π
