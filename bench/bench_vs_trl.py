"""Benchmark: the same online-DPO work in nanonash and in TRL, side by side on one machine (not a test).

The work: 16 chat prompts, 2 samples each (at most 32 new tokens, temperature 1), labels from a Bradley–Terry reward
model on the same backbone as the policy, and 2 DPO steps of 8 pairs (β = 0.1, lr 1e-6), policy and reference fp32.
    TRL:       trl.experimental.online_dpo.OnlineDPOTrainer, per_device_train_batch_size 8, max_steps 2
    nanonash:  nash_dpo.py --ref sft --pairs random --groups-per-prompt 1 --epochs 1 --batch-size 8 --iterations 1
               (online DPO: one pair of two samples per prompt, one label each, anchor π_ref) with the CPU memory
               flags given by --ours-flags (default: the real-checkpoint world's defaults)
Each runs in its own process; its peak RSS is that process's ru_maxrss (read by a measuring parent), its time the
wall time of the work itself: TRL's trainer.train(), and nanonash's perf/sample_s + perf/train_s (sampling, judging,
training). The whole process's wall time is printed for both; nanonash's includes two evaluations that TRL does not
do (before and after the iteration; the time of the one after is printed).
The reward model is built here from the policy folder: its backbone, and a score head drawn with a fixed seed.

    pip install trl          # development only; or into its own environment, then --trl-python ENV/bin/python
    python bench/bench_vs_trl.py --model models/smollm2-135m-instruct [--trl-python PY] [--threads 2]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRL_JOB = r'''
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
model_dir, rm_dir, prompts_file, out_dir, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
torch.manual_seed(1)
prompts = [json.loads(l)["prompt"] for l in open(prompts_file) if l.strip()]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
cfg = OnlineDPOConfig(output_dir=out_dir, per_device_train_batch_size=8, max_steps=2, max_new_tokens=32,
                      temperature=1.0, beta=0.1, learning_rate=1e-6, logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=True, bf16=False, seed=1, dataloader_num_workers=0)
trainer = OnlineDPOTrainer(model=model, reward_funcs=rm_dir, args=cfg, train_dataset=data, processing_class=tok,
                           reward_processing_classes=AutoTokenizer.from_pretrained(rm_dir))
t0 = time.perf_counter()
trainer.train()
print(json.dumps({"train_s": time.perf_counter() - t0}))
'''


def reward_model_from(policy_dir, out, seed=0):
    """A *ForSequenceClassification folder: the policy's backbone and a random score head (seeded)."""
    import dataclasses

    import torch

    from common.model import Transformer, from_pretrained
    lm = from_pretrained(policy_dir)
    cfg = dataclasses.replace(lm.config, is_reward_model=True, num_labels=1, tie_word_embeddings=False)
    rm = Transformer(cfg)
    state = {k: v for k, v in lm.state_dict().items() if k in rm.state_dict()}
    torch.manual_seed(seed)
    state["score.weight"] = torch.randn(1, cfg.hidden_size) * cfg.hidden_size ** -0.5
    rm.load_state_dict(state)
    rm.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(policy_dir, name)):
            shutil.copy(os.path.join(policy_dir, name), os.path.join(out, name))


MEASURE = (  # runs argv[2:] as its only child, then writes that child's peak RSS (ru_maxrss, KB on Linux) to argv[1]
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[2:]).returncode\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(r)\n")


def measured(cmd, cwd, env, what):
    """(wall seconds, peak RSS in GB, stdout) of `cmd` run as a child of its own measuring process."""
    fd, rss_file = tempfile.mkstemp()
    os.close(fd)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", MEASURE, rss_file, *cmd], cwd=cwd, env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"error: {what} failed:\n{p.stderr[-3000:]}")
    with open(rss_file) as f:
        rss_gb = int(f.read()) * 1024 / 1e9
    os.remove(rss_file)
    return wall, rss_gb, p.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="policy folder (HF layout, with a chat template)")
    ap.add_argument("--trl-python", default=sys.executable, help="python of an environment with trl installed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours-flags", default="", help="extra flags for nash_dpo.py (e.g. '--grad-checkpoint')")
    args = ap.parse_args(argv)
    args.model = os.path.abspath(args.model)   # the TRL job runs in a temporary folder
    tmp = tempfile.mkdtemp(prefix="bench_vs_trl_")
    try:
        rm_dir, prompts = os.path.join(tmp, "rm"), os.path.join(tmp, "prompts.jsonl")
        reward_model_from(args.model, rm_dir)
        lines = [json.loads(x) for f in ("prompts.jsonl", "eval_prompts.jsonl")
                 for x in open(ROOT / "data" / "chat" / f) if x.strip()]
        texts = [x["prompt"] for x in lines if "prompt" in x][:16]
        with open(prompts, "w") as f:
            f.writelines(json.dumps({"prompt": t}) + "\n" for t in texts)
        job = os.path.join(tmp, "trl_job.py")
        with open(job, "w") as f:
            f.write(TRL_JOB)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        res = {}
        trl_cmd = [args.trl_python, job, args.model, rm_dir, prompts, os.path.join(tmp, "trl_out"), str(args.threads)]
        wall, rss, out = measured(trl_cmd, tmp, env, f"the TRL job (is trl installed for {args.trl_python}?)")
        res["trl"] = {"wall_s": wall, "rss_gb": rss, "work_s": json.loads(out.strip().splitlines()[-1])["train_s"]}
        run_dir = os.path.join(tmp, "ours")
        cmd = [sys.executable, "nash_dpo.py", "--model", args.model, "--judge", f"rm:{rm_dir}", "--prompts", prompts,
               "--ref", "sft", "--pairs", "random", "--groups-per-prompt", "1", "--epochs", "1", "--batch-size", "8",
               "--iterations", "1", "--max-new-tokens", "32", "--lr", "1e-6", "--eta", "0.1", "--threads",
               str(args.threads), "--run-dir", run_dir, *args.ours_flags.split()]
        wall, rss, _ = measured(cmd, ROOT, env, "nash_dpo.py")
        perf = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))][-1]
        res["ours"] = {"wall_s": wall, "rss_gb": rss, "work_s": perf["perf/sample_s"] + perf["perf/train_s"],
                       "eval_s": perf["perf/eval_s"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t, o = res["trl"], res["ours"]
    print(f"online DPO, 16 prompts x 2 samples, 32 new tokens, 2 steps of 8 pairs; {args.model}; "
          f"{args.threads} threads; ours: {' '.join(cmd[2:])}")
    print(f"{'':<10}{'work s':>10}{'process s':>11}{'peak RSS GB':>13}")
    print(f"{'TRL':<10}{t['work_s']:>10.1f}{t['wall_s']:>11.1f}{t['rss_gb']:>13.2f}")
    print(f"{'nanonash':<10}{o['work_s']:>10.1f}{o['wall_s']:>11.1f}{o['rss_gb']:>13.2f}   (+ {o['eval_s']:.1f} s of "
          f"evaluation, in the process time)")
    print(f"speed-up (TRL work / ours) {t['work_s'] / o['work_s']:.2f}x; peak RSS ours / TRL "
          f"{o['rss_gb'] / t['rss_gb']:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
