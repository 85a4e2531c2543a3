"""The GPU check: the CUDA path measured in one command, on random weights built on the GPU from the configs in
bench/configs/ (nothing is downloaded). Writes gpu_check.json and gpu_check.md into --out.

    python bench/gpu_check.py --out DIR            # one H100 / H200, a few minutes
    python bench/gpu_check.py --tiny --out DIR     # the same code on tiny shapes, on the CPU (CI runs it)

(1) bf16 autocast against fp32: the logits and log-probs of the Qwen2.5-0.5B shape on random tokens, max and mean |Δ|.
(2) One INPO iteration (inpo.py's own functions: sample, all_pairs, the frozen passes, update) on the Qwen2.5-0.5B
    shape, full fine-tuning, judged by a 0.5B-shaped pair: model in bf16: the wall time of each part and
    torch.cuda.max_memory_allocated beside bench/memory_model.py's figure for the same setting.
(3) The same on the Llama-3-8B shape with LoRA r = 16, --grad-checkpoint, micro-batch 8 rows of 1024 tokens, judged by
    an 8B-shaped pair: model in bf16 (the setting the memory model says fits one 80 GB GPU).
(4) Our sampler's tokens/s against transformers' generate at batch 1, 16 and 64, Qwen2.5-0.5B shape, bf16, both
    sampling the whole vocabulary for a fixed number of tokens.
(5) Each script end to end on the arena (its own command line, --device cuda: bf16 autocast and bf16 frozen models by
    default), one iteration of its arena defaults, and inpo.py with LoRA: exit status, wall time, the metrics row.
Random weights give near-uniform next-token distributions: the figures are costs, not the behaviour of trained models.
The tokenizer is a word-level one over the config's vocabulary ("t0" … "t<V−3>", "A", "B"), so that the pair judge reads
the sampled responses as text, as it does in a run.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import inpo  # noqa: E402
import memory_model  # noqa: E402
from common.chat import ChatTemplate  # noqa: E402
from common.cli import resolve_defaults  # noqa: E402
from common.judges import PairJudge  # noqa: E402
from common.lm_policy import LMPolicy  # noqa: E402
from common.lora import LoRA  # noqa: E402
from common.model import ModelConfig, Transformer, copy_model, read_config  # noqa: E402
from common.policy import batched_logprobs  # noqa: E402
from common.sampler import generate  # noqa: E402
from common.world import World  # noqa: E402

GB = 1e9
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256, bos_token_id=1, eos_token_id=0)


def config(name, tiny):
    cfg = read_config(ROOT / "bench" / "configs" / name)
    if tiny:
        cfg = ModelConfig(**{**cfg.__dict__, **TINY, "head_dim": None, "extra": {**cfg.extra, **TINY}})
    return cfg


def build(cfg, device, dtype):
    """A Transformer with random weights (std 0.02), initialized on `device` directly in `dtype`."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(device)   # (RoPE's frequencies are computed on the CPU)


def word_tokenizer(V):
    vocab = {f"t{i}": i for i in range(V - 2)} | {"A": V - 2, "B": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device):
        self.device, self.s = device, {}

    def __call__(self, name):
        timer = self

        class Block:
            def __enter__(self):
                sync(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sync(timer.device)
                timer.s[name] = timer.s.get(name, 0.0) + time.perf_counter() - self.t0
        return Block()


def logits_check(device, tiny):
    """(1): our model's logits in fp32 and under bf16 autocast, Qwen2.5-0.5B shape, 4 rows of 512 random tokens."""
    cfg = config("qwen2.5-0.5b", tiny)
    model = build(cfg, device, torch.float32)
    g = torch.Generator(device).manual_seed(0)
    T = 64 if tiny else 512
    ids = torch.randint(0, cfg.vocab_size, (4, T), generator=g, device=device)
    with torch.no_grad():
        fp32 = model(ids).float()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            bf16 = model(ids).float()
    d, dl = (bf16 - fp32).abs(), (bf16.log_softmax(-1) - fp32.log_softmax(-1)).abs()
    return {"shape": [4, T, cfg.vocab_size], "logit_std": float(fp32.std()), "max_abs_diff": float(d.max()),
            "mean_abs_diff": float(d.mean()), "logprob_max_abs_diff": float(dl.max()),
            "logprob_mean_abs_diff": float(dl.mean())}


def inpo_iteration(device, tiny, name, judge_name, lora_rank, prompts, K, prompt_tokens, new_tokens, micro_batch,
                   grad_checkpoint):
    """(2), (3): one INPO iteration with inpo.py's functions, each part timed, the peak memory measured."""
    cfg, jcfg = config(name, tiny), config(judge_name, tiny)
    tok = word_tokenizer(cfg.vocab_size)
    precision = "bf16"
    frozen = torch.bfloat16
    model = build(cfg, device, frozen if lora_rank else torch.float32)
    lora = LoRA(model.requires_grad_(False), lora_rank, 2 * lora_rank) if lora_rank else None
    model.grad_checkpoint = grad_checkpoint
    policy = LMPolicy(model, tok, eos_id=0, pad_id=0, max_new_tokens=new_tokens, infer_batch=prompts * K, lora=lora)
    judge_model = build(jcfg, device, frozen)
    judge = PairJudge("gpu-check", batch_size=16, parts=(judge_model, word_tokenizer(jcfg.vocab_size),
                                                         ChatTemplate("{{ messages[0]['content'] }}")))
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(3, cfg.vocab_size - 2, (prompt_tokens,), generator=g))
             for _ in range(prompts)]
    args = inpo.Args(device=device, precision=precision, prompts="(in memory)", samples_per_prompt=K, epochs=1,
                     batch_size=prompts, micro_batch=micro_batch, infer_batch=prompts * K, lora_rank=lora_rank,
                     grad_checkpoint=grad_checkpoint)
    resolve_defaults(args, "real", 0.1)
    world = World(kind="real", policy=policy, ref=policy.frozen_copy(frozen, adapters=False), judge=judge, games=None,
                  prompts=texts, eval_prompts=[], beta=0.1, device=device, precision=precision,
                  generator=torch.Generator(device=device).manual_seed(0), shuffle_generator=torch.Generator())
    gen, timer = world.generator, Timer(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with timer("sample"), world.autocast():
        y = policy.sample(world.prompts, K, generator=gen)
    with timer("judge"), world.autocast():
        y, group, win, lose, weights = inpo.all_pairs(y, K, judge, gen)
    with timer("frozen passes (π_t, π_ref)"), world.autocast():
        prev, ref_lp = batched_logprobs(policy, y, args.infer_batch), batched_logprobs(world.ref, y, args.infer_batch)
    with timer("train"):
        losses = inpo.update(policy, y, win, lose, weights, group, prev, ref_lp, inpo.eta_at(args, 1), world, args)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    row_tokens = prompt_tokens + int(y.response_mask.sum(1).max())
    J = sum(p.numel() for p in judge_model.parameters())
    per_token = memory_model.measure(cfg, [lora_rank], device)
    peaks, info = memory_model.budget(cfg, J, lora_rank, micro_batch * row_tokens, args.infer_batch, row_tokens,
                                      grad_checkpoint, per_token)
    out = {"model": name, "judge": judge_name, "training": f"LoRA r={lora_rank}" if lora_rank else "full",
           "parameters": info["N"], "trained_parameters": info["P"] if lora_rank else info["N"],
           "prompts": prompts, "samples_per_prompt": K, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
           "distinct_responses": len(y), "pairs": len(win), "micro_batch": micro_batch, "row_tokens": row_tokens,
           "grad_checkpoint": grad_checkpoint, "loss": float(torch.stack(losses).mean()),
           "seconds": timer.s, "peak_gb": None if peak is None else peak / GB,
           "memory_model_gb": peaks["inpo / nash_dpo / SADPO"][0] / GB,
           "memory_model_parts_gb": {k: v / GB for k, v in peaks["inpo / nash_dpo / SADPO"][1].items()}}
    del policy, world, judge, judge_model, model, lora
    return out


def sampler_check(device, tiny, batches, new_tokens, prompt_tokens=64):
    """(4): tokens/s of common.sampler.generate and of transformers' generate, the same shape, bf16, no EOS stop."""
    import transformers
    cfg = config("qwen2.5-0.5b", tiny)
    ours = copy_model(build(cfg, device, torch.float32), torch.bfloat16).eval()
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.extra.items() if k != "architectures"})
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(device, torch.bfloat16).eval()   # built on the CPU
    kind = torch.device(device).type
    rows = []
    for B in batches:
        g = torch.Generator(device).manual_seed(0)
        ids = torch.randint(3, cfg.vocab_size, (B, prompt_tokens), generator=g, device=device)
        prompts = ids.tolist()

        def run_ours(n):
            with torch.autocast(kind, dtype=torch.bfloat16):
                generate(ours, prompts, n, generator=g)

        def run_hf(n):
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=n,
                            min_new_tokens=n, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
        times = {}
        for label, fn in (("ours", run_ours), ("transformers", run_hf)):
            fn(4)                                   # warm-up
            best = float("inf")
            for _ in range(2):
                sync(device)
                t0 = time.perf_counter()
                fn(new_tokens)
                sync(device)
                best = min(best, time.perf_counter() - t0)
            times[label] = best
        rows.append({"batch": B, "new_tokens": new_tokens, "ours_tok_s": B * new_tokens / times["ours"],
                     "transformers_tok_s": B * new_tokens / times["transformers"],
                     "ratio": times["transformers"] / times["ours"]})
        print(f"  sampler B={B}: ours {rows[-1]['ours_tok_s']:.0f} tok/s, transformers "
              f"{rows[-1]['transformers_tok_s']:.0f} tok/s ({rows[-1]['ratio']:.2f}x)", flush=True)
    return rows


SCRIPT_RUNS = [("inpo.py", []), ("nash_mp.py", []), ("nash_dpo.py", []), ("tanpo.py", []),
               ("tanpo.py", ["--single-agent"]), ("inpo.py", ["--lora-rank", "16", "--lr", "1e-3"])]
TINY_FLAGS = {"inpo.py": ["--samples-per-prompt", "2", "--epochs", "1"],
              "nash_mp.py": ["--samples-per-prompt", "2", "--opponent-samples", "2", "--inner-steps", "1"],
              "nash_dpo.py": ["--samples-per-prompt", "2", "--groups-per-prompt", "1", "--epochs", "1"],
              "tanpo.py": ["--pairs-per-prompt", "1", "--bonus-samples", "1", "--epochs", "1"]}


def scripts_check(device, tiny):
    """(5): every script's own command line, one iteration on the arena; tiny: the smallest settings, 2 of them."""
    rows, tmp = [], tempfile.mkdtemp()
    for script, flags in SCRIPT_RUNS[:2] if tiny else SCRIPT_RUNS:
        d = os.path.join(tmp, f"{script[:-3]}{'_'.join([''] + [f.strip('-') for f in flags])}")
        argv = [sys.executable, script, "--iterations", "1", "--device", device, "--run-dir", d, *flags,
                *(TINY_FLAGS[script] if tiny else [])]
        t0 = time.perf_counter()
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        row = {"command": " ".join(argv[1:]), "rc": p.returncode, "wall_s": time.perf_counter() - t0}
        if p.returncode == 0:
            with open(os.path.join(d, "metrics.jsonl")) as f:
                last = json.loads(f.read().splitlines()[-1])
            row.update({k: last[k] for k in ("eval/dual_gap", "eval/dual_gap/train", "eval/valid") if k in last})
            row.update({k: v for k, v in last.items() if k.startswith("perf/")})
        else:
            row["stderr"] = p.stderr[-1500:]
        print(f"  {row['command']}: rc {row['rc']}, {row['wall_s']:.1f} s", flush=True)
        rows.append(row)
    return rows


def markdown(r) -> str:
    lines = [f"# GPU check ({r['device']}, torch {r['torch']}, {'tiny shapes' if r['tiny'] else 'full shapes'}, "
             f"{r['wall_s']:.0f} s)", ""]
    if "logits" in r:
        c = r["logits"]
        lines += ["## (1) bf16 autocast vs fp32 logits, Qwen2.5-0.5B shape, random weights", "",
                  f"{c['shape']}: logits |Δ| max {c['max_abs_diff']:.3g}, mean {c['mean_abs_diff']:.3g} (logit std "
                  f"{c['logit_std']:.3g}); log-probs |Δ| max {c['logprob_max_abs_diff']:.3g}, mean "
                  f"{c['logprob_mean_abs_diff']:.3g}", ""]
    for key, title in (("inpo_full", "(2) one INPO iteration, full fine-tuning"), ("inpo_lora", "(3) one INPO "
                                                                                                 "iteration, LoRA")):
        if key not in r:
            continue
        c = r[key]
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in c["seconds"].items())
        peak = "not measured (no GPU)" if c["peak_gb"] is None else f"{c['peak_gb']:.1f} GB"
        lines += [f"## {title}: {c['model']}, judge {c['judge']}", "",
                  f"{c['prompts']} prompts × K = {c['samples_per_prompt']} samples, {c['prompt_tokens']} prompt tokens "
                  f"+ {c['new_tokens']} new tokens, {c['distinct_responses']} distinct responses, {c['pairs']} ordered "
                  f"pairs; micro-batch {c['micro_batch']} rows of {c['row_tokens']} tokens, --grad-checkpoint "
                  f"{'on' if c['grad_checkpoint'] else 'off'}; {c['training']} ({c['trained_parameters'] / 1e6:.1f}M "
                  f"trained parameters).", "", f"Wall time: {parts}.", "",
                  f"Peak memory (torch.cuda.max_memory_allocated): {peak}; bench/memory_model.py for this setting: "
                  f"{c['memory_model_gb']:.1f} GB.", ""]
    if "sampler" in r:
        lines += ["## (4) sampler tokens/s, Qwen2.5-0.5B shape, bf16", "",
                  "| batch | new tokens | ours tok/s | transformers tok/s | ours / transformers |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['batch']} | {c['new_tokens']} | {c['ours_tok_s']:.0f} | {c['transformers_tok_s']:.0f} | "
                  f"{c['ratio']:.2f}× |" for c in r["sampler"]]
        lines.append("")
    if "scripts" in r:
        lines += ["## (5) the scripts on the arena, one iteration each", "",
                  "| command | exit | wall s | train dual_gap after | perf/*_s |", "|---|---|---|---|---|"]
        lines += [f"| `{c['command']}` | {c['rc']} | {c['wall_s']:.1f} | "
                  f"{c.get('eval/dual_gap/train', float('nan')):.4f} | "
                  + ", ".join(f"{k[5:-2]} {v:.1f}" for k, v in c.items() if k.startswith("perf/")) + " |"
                  for c in r["scripts"]]
        lines.append("")
    for k, v in r.get("errors", {}).items():
        lines.append(f"**{k} failed:** {v}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the CI run of this script)")
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --tiny on a CPU)", file=sys.stderr)
        return 2
    torch.set_num_threads(min(8, os.cpu_count() or 1) if device == "cuda" else 1)
    t0 = time.perf_counter()
    r = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()})",
         "torch": torch.__version__, "cuda": torch.version.cuda, "tiny": args.tiny, "errors": {}}
    t = args.tiny
    steps = [
        ("logits", lambda: logits_check(device, t)),
        ("inpo_full", lambda: inpo_iteration(device, t, "qwen2.5-0.5b", "qwen2.5-0.5b", 0, prompts=2 if t else 16,
                                             K=4 if t else 8, prompt_tokens=8 if t else 128,
                                             new_tokens=8 if t else 128, micro_batch=4 if t else 16,
                                             grad_checkpoint=False)),
        ("inpo_lora", lambda: inpo_iteration(device, t, "llama-3-8b", "llama-3-8b", 16, prompts=2 if t else 8, K=4,
                                             prompt_tokens=8 if t else 512, new_tokens=8 if t else 512,
                                             micro_batch=4 if t else 8, grad_checkpoint=True)),
        ("sampler", lambda: sampler_check(device, t, (1, 2) if t else (1, 16, 64), 8 if t else 128)),
        ("scripts", lambda: scripts_check(device, t)),
    ]
    os.makedirs(args.out, exist_ok=True)
    for key, fn in steps:
        print(f"[{time.perf_counter() - t0:6.1f} s] {key} …", flush=True)
        try:
            r[key] = fn()
        except Exception as e:   # keep the other sections' figures; the error is reported in both files
            r["errors"][key] = f"{type(e).__name__}: {e}"
            print(f"  {key} failed: {r['errors'][key]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        r["wall_s"] = time.perf_counter() - t0
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:   # after each section: partial results survive
            json.dump(r, f, indent=2)
        with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
            f.write(markdown(r))
    print(markdown(r))
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
