"""The tabular test-bed: does each script, with its tabular defaults and no other flag, converge on small games?

    python bench/tabular_testbed.py                       # every script, seed 1 (about 3 min on 2 cores)
    python bench/tabular_testbed.py --only inpo --extra "--iterations 120"    # any flag on top of the defaults

Each script runs once, as a user would (`python <script>.py --policy tabular --games FILE --seed S --run-dir DIR`,
plus --extra), on ONE games file holding the whole test-bed (β = 0.1): for each game type — random 10 actions
(EGPO's test-bed, tests/conftest.random_P), cyclic 5 (conftest.cyclic_P) and Bradley–Terry 9 (conftest.bt_P,
rewards ~ N(0, 1)) — one game with a uniform π_ref and one with a skewed π_ref (Dirichlet(1), floored at 0.01 and
renormalized). The cyclic game is circulant: under a uniform π_ref its equilibrium is uniform, i.e. π_ref itself
(nothing to learn), so its first π_ref is mildly skewed instead (Dirichlet(10), same floor). The tables in a file are independent: every per-game figure below is read from the run's
policy.json (policy_max.json for TANPO's max-player) and the game's own matrix.
What is measured, start (π_ref) → final, and final/start:
    INPO, Nash-MP                  dual gap DG(π) of the β-regularized game (common/arena.dual_gap), every game
    online DPO (--ref sft --pairs random), TANPO both players, SADPO
                                   KL(π_r‖π) to the KL-regularized RLHF optimum π_r ∝ π_ref e^{r/β} (α = β for
                                   TANPO/SADPO: α defaults to the games' β), BT games (the only ones with an r)
    DNO-Prct (the default)         unregularized exploitability max_y P(y ≻ π) − ½ (DNO's Eq. 9 has no π_ref),
                                   every game; reported, not a target (on cyclic games it is not expected to fall)
Writes bench/results/tabular_testbed.md (header: machine, torch, commit, date) and prints it. Not a test: the wall
times depend on the machine and on what else runs; tests/test_tabular_defaults.py pins the ratios on other games.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from conftest import bt_P, cyclic_P, random_P, write_games

from common.arena import dual_gap, kl

BETA = 0.1
# name -> (script, flags, metric, policy file); one TANPO run gives both players
RUNS = {
    "INPO": ("inpo.py", [], "dual_gap", "policy.json"),
    "Nash-MP": ("nash_mp.py", [], "dual_gap", "policy.json"),
    "online DPO": ("nash_dpo.py", ["--ref", "sft", "--pairs", "random"], "kl_r", "policy.json"),
    "DNO-Prct": ("nash_dpo.py", [], "exploit", "policy.json"),
    "TANPO min-player": ("tanpo.py", [], "kl_r", "policy.json"),
    "TANPO max-player": ("tanpo.py", [], "kl_r", "policy_max.json"),
    "SADPO": ("tanpo.py", ["--single-agent"], "kl_r", "policy.json"),
}
SCRIPT_OF = {"inpo": "INPO", "nash_mp": "Nash-MP", "nash_dpo": ("online DPO", "DNO-Prct"),
             "tanpo": ("TANPO min-player", "TANPO max-player"), "sadpo": "SADPO"}


def testbed(seed=0):
    """[(type, P, ref, r or None)]: random 10, cyclic 5, BT 9, each with a uniform and a skewed π_ref."""
    rng = np.random.default_rng(seed)

    def skewed(n, a=1.0):
        p = rng.dirichlet(np.full(n, a)) + 0.01
        return p / p.sum()

    def mild(n):
        return skewed(n, 10.0)
    out = []
    for name, n in (("random 10", 10), ("cyclic 5", 5), ("BT 9", 9)):
        r = rng.normal(size=n) if name.startswith("BT") else None
        P = random_P(n, rng) if name.startswith("random") else cyclic_P(n) if name.startswith("cyclic") else bt_P(r)
        # a circulant cyclic game's π* under a uniform π_ref is uniform (start = 0): a mildly skewed π_ref instead
        first = ("mild", mild(n)) if name.startswith("cyclic") else ("uniform", np.full(n, 1 / n))
        for kind, ref in (first, ("skewed", skewed(n))):
            out.append((f"{name}, {kind} π_ref", P, ref, r))
    return out


def pi_r(ref, r, beta):
    z = np.log(ref) + r / beta
    p = np.exp(z - z.max())
    return p / p.sum()


def measure(metric, P, ref, r, pi):
    """The figure of one game for one distribution pi (None where the metric does not apply)."""
    pi = np.asarray(pi, dtype=np.float64)
    if metric == "dual_gap":
        return dual_gap(P, ref, pi, BETA)
    if metric == "exploit":
        return float((P @ pi).max()) - 0.5
    return None if r is None else kl(pi_r(ref, r, BETA), pi)


def run_script(script, flags, games, run_dir, seed, extra):
    cmd = [sys.executable, script, *flags, "--policy", "tabular", "--games", games, "--seed", str(seed),
           "--run-dir", run_dir, *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(shlex.quote, cmd))} failed: {r.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                             text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha.strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(SCRIPT_OF), help="scripts to run (default all)")
    ap.add_argument("--seed", type=int, default=1, help="the runs' --seed")
    ap.add_argument("--games-seed", type=int, default=0, help="seed of the test-bed's matrices and refs")
    ap.add_argument("--extra", default="", help="more flags for every run, e.g. \"--iterations 60\"")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "tabular_testbed.md"))
    args = ap.parse_args(argv)
    import torch
    load = [f"{os.getloadavg()[0]:.2f}"]
    games = testbed(args.games_seed)
    names = [n for s in (args.only or SCRIPT_OF) for n in np.atleast_1d(SCRIPT_OF[s]).tolist()]
    extra = shlex.split(args.extra)
    results, walls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_games(os.path.join(tmp, "testbed.json"), [g[1] for g in games], beta=BETA,
                           refs=[g[2] for g in games], family="testbed")
        for name in names:
            script, flags, metric, pol_file = RUNS[name]
            key = script + " ".join(flags)
            run_dir = os.path.join(tmp, key.replace(" ", "_").replace(".py", ""))
            if key not in walls:
                walls[key] = run_script(script, flags, path, run_dir, args.seed, extra)
            with open(os.path.join(run_dir, pol_file)) as f:
                final = json.load(f)
            results[name] = [(t, measure(metric, P, ref, r, ref), measure(metric, P, ref, r, final[f"g{k}"]))
                             for k, (t, P, ref, r) in enumerate(games)]
            print(f"{name}: {walls[key]:.1f} s", file=sys.stderr)
    label = {"dual_gap": "dual gap", "kl_r": "KL(π_r‖π)", "exploit": "exploit"}
    lines = ["# Tabular test-bed: each script with its tabular defaults", "",
             (f"Commit {git_commit()}, {datetime.date.today().isoformat()}; {platform.platform()}, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"Python {platform.python_version()}; load average {load[0]} at the start, {{load1}} at the end "
              "(the wall times depend on it: with --threads 2 on a busy 2-core machine every small torch op waits "
              "for the second thread)."), "",
             f"`python bench/tabular_testbed.py --seed {args.seed} --games-seed {args.games_seed}"
             + (f" --extra {shlex.quote(args.extra)}" if args.extra else "") + "`: one run per script (flags: "
             "`--policy tabular --games FILE --seed S --run-dir DIR` and nothing else), on one games file with "
             "all six games, β = 0.1; start = π_ref, final = the last iterate; ratio = final / start.", ""]
    header = "| script | metric | wall (s) | " + " | ".join(g[0] for g in games) + " |"
    lines += [header, "|" + "---|" * (3 + len(games))]
    for name in names:
        script, flags, metric, _ = RUNS[name]
        cells = ["—" if s is None else f"{s:.4f} → {f:.4f} (**{f / s:.3f}**)" if s > 1e-12 else f"{s:.4f} → {f:.4f}"
                 for _, s, f in results[name]]
        lines.append(f"| {name} (`{script} {' '.join(flags)}`) | {label[metric]} | "
                     f"{walls[script + ' '.join(flags)]:.1f} | " + " | ".join(cells) + " |")
    lines += ["", ("TANPO's two players come from one run (the wall time is that run's). Targets "
                   "(tests/test_tabular_defaults.py, on other games): ratio ≤ 0.1 for INPO and Nash-MP (dual gap, "
                   "every game), online DPO and both TANPO players (KL(π_r‖π), BT games); DNO-Prct and SADPO are "
                   "reported only."), ""]
    text = "\n".join(lines).replace("{load1}", f"{os.getloadavg()[0]:.2f}")
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
