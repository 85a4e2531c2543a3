"""Print the exact arena metrics of a policy (not a test).

    python bench/arena_eval.py                       # the SFT model on data/arena/games.json
    python bench/arena_eval.py --model runs/<run> [--ref-model data/arena] [--games FILE] [--split test]
    python bench/arena_eval.py --policy-json runs/<run>/policy.json      # a table (π_ref = the games file's ref)

One row per split and split/family, then all; the metrics are those of common/arena.py (glossary: docs/metrics.md).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.arena import ARENA_DIR, GAMES_PATH, METRICS, GamesError, evaluate, load_games, split_keys  # noqa: E402
from common.lm_policy import LMPolicy  # noqa: E402
from common.policy import TabularPolicy  # noqa: E402


def format_table(metrics: dict, games, title=None) -> str:
    """A Markdown table: one row per split and split/family of `games`, the overall mean last."""
    keys = split_keys(games)
    counts = {k: sum(1 for g in games if k in (g.split, f"{g.split}/{g.family}")) for k in keys}
    rows = [(k, counts[k], [metrics[f"eval/{m}/{k}"] for m in METRICS]) for k in keys]
    rows.append(("all", len(games), [metrics[f"eval/{m}"] for m in METRICS]))
    head = f"| {'split/family':<14} | {'games':>5} | " + " | ".join(f"{m:>10}" for m in METRICS) + " |"
    sep = "|" + "-" * 16 + "|" + "-" * 6 + ":|" + "|".join("-" * 11 + ":" for _ in METRICS) + "|"
    lines = ([title] if title else []) + [head, sep]
    for name, count, vals in rows:
        lines.append(f"| {name:<14} | {count:>5} | " + " | ".join(f"{v:>10.4f}" for v in vals) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF-layout model folder (default: data/arena, the SFT model)")
    ap.add_argument("--ref-model", default=None, help="π_ref for an LM policy (default: data/arena, the SFT model)")
    ap.add_argument("--policy-json", default=None,
                    help="a tabular policy.json instead of a model (π_ref = the games file's ref)")
    ap.add_argument("--games", default=None, help="games file (default data/arena/games.json)")
    ap.add_argument("--split", default="all", help="evaluate one split only (train, test, …; default all)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        games = load_games(args.games or GAMES_PATH)
        if args.split != "all":
            games = games.select(split=args.split)
            if not len(games):
                raise GamesError(f"{args.games}: no game in split {args.split!r}")
        if args.policy_json is not None:
            if args.model is not None:
                raise ValueError("--policy-json and --model are exclusive")
            policy, ref, what = TabularPolicy.load(args.policy_json, games), None, args.policy_json
        else:
            model_dir, ref_dir = args.model or ARENA_DIR, args.ref_model or ARENA_DIR
            policy = LMPolicy.load(model_dir, device=args.device)
            ref = policy if os.path.abspath(ref_dir) == os.path.abspath(model_dir) \
                else LMPolicy.load(ref_dir, device=args.device)
            what = args.model or "data/arena (SFT)"
        metrics = evaluate(policy, games, ref)
    except (GamesError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = args.games or "data/arena/games.json"
    print(format_table(metrics, games, title=f"{what} on {where}, beta={games.beta:g}, split {args.split}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
