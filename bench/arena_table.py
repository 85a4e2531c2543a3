"""The arena results table: every algorithm and baseline, several seeds, exact Nash metrics per family and split.

    python bench/arena_table.py                      # arena LM, 3 seeds, 2 runs at a time (about 35 min, 2 cores)
    python bench/arena_table.py --policy tabular     # the same table in the tabular world (about 2 min)

Each (algorithm, seed) is one run of its script with its defaults (plus --seed, --threads 1 and any --extra flags),
in its own subprocess, under <runs>/<algorithm>__<seed>. Finished run dirs are reused, so an interrupted table
resumes. The final evaluation of each run (metrics.jsonl, last line) gives mean ± std over seeds of dual_gap, kl_ne,
exploit, win_vs_ref and valid for every split and family; the SFT row is iteration 0 (the same for every run).
Writes <out>.md (the headline table: train and test dual_gap per algorithm; dual_gap per split and family; every
metric) and <out>.png (dual_gap against iteration, train and test; needs matplotlib, a development-only package:
`pip install matplotlib`; skipped without it) and prints the Markdown. --readme FILE replaces FILE's region between `<!-- table:begin -->` and `<!-- table:end -->` with the
summary table. Not a test: wall times depend on the machine and on what else runs.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("dual_gap", "kl_ne", "exploit", "win_vs_ref", "valid")

# name -> (script, flags, metrics prefix of the reported policy). TANPO's one run reports both players.
ALGORITHMS = {
    "INPO": ("inpo.py", [], "eval"),
    "INPO (η = 3τ, paper)": ("inpo.py", ["--eta", "0.3"], "eval"),
    "INPO (disjoint pairs)": ("inpo.py", ["--pairs", "iid"], "eval"),
    "Nash-MP": ("nash_mp.py", [], "eval"),
    "DNO-Prct": ("nash_dpo.py", [], "eval"),
    "online DPO": ("nash_dpo.py", ["--ref", "sft", "--pairs", "random"], "eval"),
    "iterative DPO": ("nash_dpo.py", ["--ref", "prev", "--pairs", "best-worst"], "eval"),
    "TANPO max-player": ("tanpo.py", [], "eval_max"),
    "TANPO min-player": ("tanpo.py", [], "eval"),
    "SADPO": ("tanpo.py", ["--single-agent"], "eval"),
}


def run_key(name):
    """One run dir per (script, flags): TANPO's two players share a run."""
    script, flags, _ = ALGORITHMS[name]
    return (script[:-3] + "".join(flags).replace("--", "_").replace("-", "")).replace(" ", "")


def run_one(script, flags, seed, run_dir, extra, policy):
    """Run one script to completion; returns its wall time in seconds (None when reused)."""
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return None
    cmd = [sys.executable, script, *flags, "--seed", str(seed), "--threads", "1", "--policy", policy,
           "--run-dir", run_dir, *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(shlex.quote, cmd))} failed: {r.stderr.strip().splitlines()[-1:]}")
    wall = time.perf_counter() - t0
    with open(os.path.join(run_dir, "wall_s.json"), "w") as f:
        json.dump({"wall_s": wall}, f)
    return wall


def read_run(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    wall = None
    if os.path.isfile(os.path.join(run_dir, "wall_s.json")):
        with open(os.path.join(run_dir, "wall_s.json")) as f:
            wall = json.load(f)["wall_s"]
    return rows, wall


def mean_std(xs):
    """'m ± s' over seeds (sample std, ddof = 1); the value alone for one seed."""
    xs = np.asarray(xs, dtype=np.float64)
    return f"{xs.mean():.4f} ± {xs.std(ddof=1):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def slices(rows):
    """The (split, family) slices present in a metrics row, in a stable order: ('train', 'bt'), …, ('all', '')."""
    out = set()
    for k in rows[0]:
        parts = k.split("/")
        if parts[0] == "eval" and parts[1] == "dual_gap" and len(parts) >= 3:
            out.add((parts[2], parts[3] if len(parts) == 4 else ""))
    order = {"train": 0, "test": 1}
    return sorted(out, key=lambda s: (order.get(s[0], 2), s[0], s[1] == "", s[1])) + [("all", "")]


def key(prefix, metric, split, family):
    if split == "all":
        return f"{prefix}/{metric}"
    return f"{prefix}/{metric}/{split}" + (f"/{family}" if family else "")


def build_tables(results, seeds):
    """results: {name: [(rows, wall) per seed]} -> (summary markdown, detail markdown)."""
    first = next(iter(results.values()))[0][0]
    sl = slices(first)
    names = ["SFT (π_ref)"] + list(results)

    def final(name, m, s):
        if name == "SFT (π_ref)":
            return [first[0][key("eval", m, *s)]]
        prefix = ALGORITHMS[name][2]
        return [rows[-1][key(prefix, m, *s)] for rows, _ in results[name]]

    def wall(name):
        if name == "SFT (π_ref)":
            return "—"
        ws = [w for _, w in results[name] if w is not None]
        return f"{np.mean(ws):.0f}" if ws else "—"

    def cell(name, m, s):
        return mean_std(final(name, m, s))

    sft_test = final("SFT (π_ref)", "dual_gap", ("test", ""))[0]
    headline = [f"Final iterate, mean ± std over {len(seeds)} seeds. dual_gap: 0 at the β-regularized Nash "
                "equilibrium; test: the 24 held-out prompts no script trains on; Δ test: change of the test "
                "dual_gap from the SFT model's.", "",
                "| algorithm | train dual_gap | test dual_gap | Δ test | test/cyclic kl_ne | valid | wall s |",
                "|---|---|---|---|---|---|---|"]
    for n in names:
        t = np.mean(final(n, "dual_gap", ("test", "")))
        delta = "—" if n == "SFT (π_ref)" else f"{100 * (t / sft_test - 1):+.0f}%"
        headline.append(f"| {n} | {cell(n, 'dual_gap', ('train', ''))} | {cell(n, 'dual_gap', ('test', ''))} | "
                        f"{delta} | {cell(n, 'kl_ne', ('test', 'cyclic'))} | {cell(n, 'valid', ('all', ''))} | "
                        f"{wall(n)} |")
    summary = [f"**dual_gap** after the last iteration (mean ± std over {len(seeds)} seeds; lower is better, 0 at "
               "the β-regularized Nash equilibrium)"]
    for split in [s[0] for s in sl if not s[1] and s[0] != "all"]:
        cols = [s for s in sl if s[0] == split and s[1]] + [s for s in sl if s[0] == split and not s[1]]
        summary += ["", "| " + split + " | " + " | ".join(s[1] or "all" for s in cols) + " | wall s |",
                    "|" + "---|" * (len(cols) + 2)]
        for n in names:
            summary.append(f"| {n} | " + " | ".join(mean_std(final(n, "dual_gap", s)) for s in cols)
                           + f" | {wall(n)} |")
    detail = []
    for s in sl:
        detail += [f"### {s[0]}{'/' + s[1] if s[1] else ''}", "",
                   "| algorithm | " + " | ".join(METRICS) + " | wall s |", "|" + "---|" * (len(METRICS) + 2)]
        for n in names:
            detail.append(f"| {n} | " + " | ".join(mean_std(final(n, m, s)) for m in METRICS) + f" | {wall(n)} |")
        detail.append("")
    return "\n".join(headline), "\n".join(summary), "\n".join(detail)


def machine():
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, Python {platform.python_version()}"


def commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(results, path, policy):
    """dual_gap against iteration, train and test panels: mean over seeds, the band spans the seeds' min and max."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, split in zip(axes, ("train", "test")):
        for k, (name, runs) in enumerate(results.items()):
            prefix = ALGORITHMS[name][2]
            curves = np.array([[r[f"{prefix}/dual_gap/{split}"] for r in rows] for rows, _ in runs])
            x = np.arange(curves.shape[1])
            style = "-" if k < 10 else "--"
            ax.plot(x, curves.mean(0), style, marker="o", ms=3, label=name, color=f"C{k % 10}")
            ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.15, color=f"C{k % 10}")
        ax.set_title(f"{split} prompts ({policy})")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dual_gap (exact)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TABLE_BEGIN, TABLE_END = "<!-- table:begin -->", "<!-- table:end -->"


def readme_text(readme):
    """The README's text; one-line error when it is missing or has no table region (checked before any run)."""
    try:
        with open(readme) as f:
            s = f.read()
    except OSError as e:
        raise SystemExit(f"error: --readme {readme}: {e.strerror}") from None
    if TABLE_BEGIN not in s or TABLE_END not in s:
        raise SystemExit(f"error: --readme {readme}: no {TABLE_BEGIN} … {TABLE_END} region")
    return s


def splice(readme, text):
    s, a, b = readme_text(readme), TABLE_BEGIN, TABLE_END
    s = s[:s.index(a) + len(a)] + "\n" + text + "\n" + s[s.index(b):]
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(s)
    os.replace(tmp, readme)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="lm", choices=["lm", "tabular"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 1 … N")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses one torch thread)")
    p.add_argument("--runs", default=None, help="folder of the run dirs (default runs/table_<policy>)")
    p.add_argument("--out", default=None, help="output path without extension (default bench/results/arena_<policy>)")
    p.add_argument("--only", default=None, help="comma-separated algorithm names (default: all)")
    p.add_argument("--extra", default="", help="flags added to every run, e.g. '--iterations 2'")
    p.add_argument("--readme", default=None, help="README file whose table region gets the summary")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit("error: --seeds and --jobs must be ≥ 1")
    names, unknown, cur = (list(ALGORITHMS) if args.only is None else []), [], ""
    for part in ([] if args.only is None else args.only.split(",")):  # names may hold a comma: "INPO (η = 3τ, paper)"
        cur = f"{cur}, {part.strip()}" if cur else part.strip()
        if cur in ALGORITHMS:
            names.append(cur)
            cur = ""
    if cur:
        unknown.append(cur)
    if unknown:
        raise SystemExit(f"error: --only: unknown algorithm {unknown[0]!r} (known: {', '.join(ALGORITHMS)})")
    if args.readme:
        readme_text(args.readme)
    runs = os.path.abspath(args.runs or os.path.join(ROOT, "runs", f"table_{args.policy}"))
    out = args.out or os.path.join(ROOT, "bench", "results", f"arena_{args.policy}")
    extra = shlex.split(args.extra)
    seeds = list(range(1, args.seeds + 1))

    jobs = {}  # run dir -> (script, flags, seed): TANPO's two players share one run
    for n in names:
        script, flags, _ = ALGORITHMS[n]
        for s in seeds:
            jobs[os.path.join(runs, f"{run_key(n)}__{s}")] = (script, flags, s)
    t0 = time.perf_counter()
    os.makedirs(runs, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {d: pool.submit(run_one, sc, fl, s, d, extra, args.policy) for d, (sc, fl, s) in jobs.items()}
        for d, fut in futures.items():
            w = fut.result()
            print(f"{os.path.basename(d)}: {'reused' if w is None else f'{w:.0f} s'}", file=sys.stderr)
    total = time.perf_counter() - t0
    results = {n: [read_run(os.path.join(runs, f"{run_key(n)}__{s}")) for s in seeds] for n in names}

    headline, summary, detail = build_tables(results, seeds)
    header = (f"Arena, `--policy {args.policy}`, every script's defaults{' plus `' + args.extra + '`' if extra else ''}; "
              f"seeds {', '.join(map(str, seeds))}; {args.jobs} runs at a time, 1 torch thread each. "
              f"Machine: {machine()}. Commit {commit()}, {time.strftime('%Y-%m-%d')}. Table wall time "
              f"{total / 60:.1f} min (runs reused from an earlier invocation count 0). \"wall s\": mean wall time "
              f"of one run.")
    text = f"{header}\n\n{headline}\n\n{summary}\n\n{detail}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(f"# Arena results ({args.policy})\n\n{text}\n")
    png = plot(results, out + ".png", args.policy)
    if args.readme:
        splice(args.readme, f"{header}\n\n{headline}")
    print(text)
    print(f"wrote {out}.md" + (f" and {png}" if png else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
