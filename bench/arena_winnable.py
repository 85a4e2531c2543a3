"""How much of arena v2's held-out split a policy can win by generalizing a family's style mix (not a test).

    python bench/arena_winnable.py [--games data/arena/games.json]

For each held-out game: keep π_ref's content marginal (contents are new on a held-out prompt, so nothing about
them can be learned) and replace its style mix by the style marginal of π* averaged over the family's training
games. Prints the test dual_gap and kl_ne of π_ref and of that style-transfer policy per family: the part of the
test gap that learning on the training prompts can remove. Candidates are content-major with 3 styles
(data/make_arena.py); π_ref is each game's tabular ref.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.arena import GAMES_PATH, dual_gap, equilibrium, kl, load_games  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--games", default=GAMES_PATH)
    args = p.parse_args(argv)
    games = load_games(args.games)
    print("| family | test dual_gap π_ref → style transfer | test kl_ne π_ref → style transfer |")
    print("|---|---|---|")
    rows = []
    for family in sorted({g.family for g in games}):
        train = [g for g in games if g.family == family and g.split == "train"]
        mix = np.mean([equilibrium(g.P, g.ref, games.beta).reshape(-1, 3).sum(0) for g in train], axis=0)
        r = []
        for g in (g for g in games if g.family == family and g.split == "test"):
            content = g.ref.reshape(-1, 3).sum(1)
            pi = (content[:, None] * mix[None, :]).ravel()
            star = equilibrium(g.P, g.ref, games.beta)
            r.append([dual_gap(g.P, g.ref, g.ref, games.beta), dual_gap(g.P, g.ref, pi, games.beta),
                      kl(star, g.ref), kl(star, pi)])
        m = np.mean(r, axis=0)
        rows.append(m)
        print(f"| {family} | {m[0]:.3f} → {m[1]:.3f} | {m[2]:.3f} → {m[3]:.3f} |")
    m = np.mean(rows, axis=0)
    print(f"| all (mean of families) | {m[0]:.3f} → {m[1]:.3f} | {m[2]:.3f} → {m[3]:.3f} |")


if __name__ == "__main__":
    main()
