"""Benchmark: peak memory is set by the flags, not by the batch (not a test).

inpo.py and nash_mp.py in the real-checkpoint world, 4 prompts, 1 iteration, a reward model on the policy's backbone
as the judge (built here, as bench/bench_vs_trl.py builds it), at K = 4 and K = 16 samples per prompt and a fixed
--micro-batch; each run in its own process, its peak RSS (ru_maxrss) and wall time printed with the K = 16 / K = 4
ratios, measured side by side in one invocation.

    python bench/bench_memory.py --model models/smollm2-135m-instruct [--flags "--micro-batch 16 --grad-checkpoint"]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import measured, reward_model_from  # noqa: E402

SCRIPTS = {  # the per-script flags that set K
    "inpo.py": lambda K: ["--samples-per-prompt", str(K), "--epochs", "1"],
    "nash_mp.py": lambda K: ["--samples-per-prompt", str(K), "--opponent-samples", str(K), "--inner-steps", "1"],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="policy folder (HF layout)")
    ap.add_argument("--flags", default="--micro-batch 16 --grad-checkpoint",
                    help="memory flags for every run (default: the recommended CPU flags)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scripts", default="inpo.py,nash_mp.py")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_memory_")
    results = {}
    try:
        rm_dir, prompts = os.path.join(tmp, "rm"), os.path.join(tmp, "prompts.jsonl")
        reward_model_from(args.model, rm_dir)
        texts = [json.loads(x)["prompt"] for x in open(ROOT / "data" / "chat" / "prompts.jsonl") if '"prompt"' in x][:4]
        with open(prompts, "w") as f:
            f.writelines(json.dumps({"prompt": t}) + "\n" for t in texts)
        for script in args.scripts.split(","):
            for K in (4, 16):
                run_dir = os.path.join(tmp, f"{script}_{K}")
                cmd = [sys.executable, script, "--model", args.model, "--judge", f"rm:{rm_dir}", "--prompts", prompts,
                       "--iterations", "1", "--max-new-tokens", str(args.max_new_tokens), "--eval-samples", "1",
                       "--threads", str(args.threads), "--run-dir", run_dir, *SCRIPTS[script](K), *args.flags.split()]
                wall, rss, _ = measured(cmd, ROOT, dict(os.environ), script)
                results[(script, K)] = (wall, rss)
                print(f"{script:<12} K = {K:<3} peak RSS {rss:6.2f} GB   wall {wall:6.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.model}; 4 prompts, 1 iteration, rm: judge on the same backbone, {args.max_new_tokens} new tokens, "
          f"flags: {args.flags}")
    for script in args.scripts.split(","):
        (w4, r4), (w16, r16) = results[(script, 4)], results[(script, 16)]
        print(f"{script:<12} peak RSS K=4 {r4:.2f} GB, K=16 {r16:.2f} GB: ratio {r16 / r4:.3f}; "
              f"wall {w4:.0f} s / {w16:.0f} s")


if __name__ == "__main__":
    main()
