"""Benchmark of common/sampler.py (not a test): tokens/s ratios measured side by side in one run.

  (1) generate vs transformers' generate, GPT-2-124M-shaped random weights (GPT2Config() defaults), B=8; also the
      time of the step's matmuls alone (every weight read once) in the two GEMM forms of common.model.linear
  (2) the same on a ~1M-parameter GPT-2-shaped model, B=64; also where the time goes: a 1-token call (the prefill)
      and a decode step ((N-token call - 1-token call) / (N - 1)) of each side, and two parts of our step measured
      alone (its matmuls with the weights in cache; the attention over each layer's cache at the run's lengths)
  (3) generate (KV cache) vs a no-cache loop (full forward over the whole prefix for every token), ~1M model
  (5) as (2) on the arena's SFT model (data/arena: Llama shape, RoPE, RMSNorm, SwiGLU, GQA, 0.89M trained
      parameters, the model every arena LM run samples from) against transformers' LlamaForCausalLM, B=64
Both sides sample with temperature 1 and no top-k/top-p, with no EOS stop (every row generates the full
budget), with torch's default thread count. After a short warm-up call of each variant, the timed runs of the
variants are interleaved; tokens/s come from the median time, and two ratios are printed: of the median
times and of the best times (on a shared machine, other processes only ever slow a run down).

  python bench/bench_sampler.py [--device cpu] [--reps 5] [--reps-large 2] [--new 64] [--skip 1]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.model import from_pretrained, linear  # noqa: E402
from common.sampler import filter_logits, generate, sample  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def arena_models(device):
    """The committed arena SFT folder, loaded by transformers and by us."""
    import transformers
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "arena")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None   # never stop: both sides generate the full budget
    hf.generation_config.pad_token_id = 0
    return hf.to(device), from_pretrained(path, device=device)


def random_gpt2(tmp, device, seed, **kw):
    """Random GPT-2 weights built and saved by transformers, loaded by both implementations."""
    import transformers
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()
    hf.generation_config.eos_token_id = None   # never stop: both sides generate the full budget
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(tmp)
    return hf.to(device), from_pretrained(tmp, device=device)


@torch.no_grad()
def nocache_generate(model, ids, max_new_tokens, generator):
    """The naive reference: every token re-runs the model over the whole (uniform-length) prefix."""
    for _ in range(max_new_tokens):
        logits = linear(model.hidden_states(ids)[:, -1], model.lm_head_weight)                # (B, V)
        tok = sample(filter_logits(logits), generator)                                        # (B,)
        ids = torch.cat([ids, tok[:, None]], dim=1)
    return ids


def measure(variants, n, reps, device, warmup_tokens=4):
    """variants: {name: fn(new_tokens)}. A short warm-up call of each, then `reps` interleaved timed calls of
    n tokens; returns {name: [seconds, ...]}."""
    for fn in variants.values():
        fn(warmup_tokens)
    times = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            sync(device)
            t0 = time.perf_counter()
            fn(n)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per variant, ~1M model vs transformers")
    ap.add_argument("--reps-large", type=int, default=2, help="timed runs per variant, 124M model")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length (all rows)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--batch-large", type=int, default=8, help="batch size for the 124M model")
    ap.add_argument("--batch-small", type=int, default=64, help="batch size for the ~1M model")
    ap.add_argument("--nocache-reps", type=int, default=2, help="timed runs per variant in (3)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for both sides (0: leave the "
                    "default); a diagnostic for oversubscribed machines, not the reported setting")
    ap.add_argument("--skip", default="", help="comma-separated benchmark numbers to skip, e.g. 1")
    args = ap.parse_args()
    device, skip = torch.device(args.device), set(args.skip.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    N, rows = args.new, []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, "
          f"prompt {args.prompt}, new tokens {N}, reps {args.reps_large}/{args.reps}/{args.nocache_reps}, "
          f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")

    def record(label, baseline, B, t_base, t_ours):
        """tokens/s from the median time; ratios of medians and of best times (contention only slows)."""
        med, best = statistics.median, min
        rows.append((label, baseline, B * N / med(t_base), B * N / med(t_ours), med(t_base) / med(t_ours),
                     best(t_base) / best(t_ours)))

    def ours_vs_hf(hf, ours, B, label, reps):
        g = torch.Generator(device).manual_seed(0)
        ids = torch.randint(0, ours.config.vocab_size, (B, args.prompt), generator=g, device=device)
        prompts = ids.tolist()
        hf_kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                     pad_token_id=0)
        variants = {"ours": lambda n: generate(ours, prompts, n, generator=g),
                    "hf": lambda n: hf.generate(ids, max_new_tokens=n, **hf_kw)}
        t = measure(variants, N, reps, device)
        record(label, "transformers generate", B, t["hf"], t["ours"])
        return t, variants

    @torch.inference_mode()
    def weight_floor(model, B, reps, fn):
        """Seconds of one pass of every matmul of a decode step (each Linear and the LM head on a (B, in) input)
        through fn (F.linear or common.model.linear), median of `reps`: the time a step needs just to stream the
        fp32 weights through that GEMM form when they do not fit in cache."""
        wb = [(m.weight, m.bias) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        ws, bs = [w for w, _ in wb] + [model.lm_head_weight], [b for _, b in wb] + [None]
        xs = [torch.randn(B, w.shape[1], device=device) for w in ws]
        times = []
        for _ in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            for x, w, b in zip(xs, ws, bs):
                fn(x, w, b)
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    @torch.inference_mode()
    def attention_floor(model, B, reps):
        """Seconds per decode step of the attention alone: one SDPA call per layer, a query (B, nh, 1, hs) against
        that layer's K/V cache filled to each length of the run (prompt + 1 ... prompt + N - 1), the mean over the
        lengths; median of `reps`."""
        cfg, L = model.config, args.prompt
        cache = model.new_cache(B, L + N)
        for kv in cache.k + cache.v:
            kv.normal_()
        q = torch.randn(B, cfg.num_attention_heads, 1, cfg.head_dim, device=device)
        gqa = cfg.num_key_value_heads != cfg.num_attention_heads
        times = []
        for _ in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            for S in range(L + 1, L + N):
                for k, v in zip(cache.k, cache.v):
                    F.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S], enable_gqa=gqa)
            sync(device)
            times.append((time.perf_counter() - t0) / (N - 1))
        return statistics.median(times[1:])

    with tempfile.TemporaryDirectory() as tmp:
        if "1" not in skip:
            hf, ours = random_gpt2(tmp + "/big", device, 0, bos_token_id=0, eos_token_id=0)
            print(f"(1) GPT-2 124M shape: {ours.num_params() / 1e6:.1f}M parameters")
            t, _ = ours_vs_hf(hf, ours, args.batch_large, f"(1) 124M, B={args.batch_large}", args.reps_large)
            f_linear = weight_floor(ours, args.batch_large, 10, F.linear)
            f_ours = weight_floor(ours, args.batch_large, 10, linear)
            hf_step, our_step = statistics.median(t["hf"]) / N, statistics.median(t["ours"]) / N
            print(f"(1) per token step: transformers {hf_step * 1e3:.1f} ms, ours {our_step * 1e3:.1f} ms; the step's "
                  f"matmuls alone: {f_linear * 1e3:.1f} ms as F.linear (x W^T), {f_ours * 1e3:.1f} ms as "
                  f"common.model.linear ((W x^T)^T), {f_linear / f_ours:.2f}x")
            del hf, ours
        small = dict(vocab_size=2048, n_embd=128, n_layer=4, n_head=4, n_positions=256, bos_token_id=0,
                     eos_token_id=0)
        hf, ours = random_gpt2(tmp + "/a", device, 1, **small)
        B = args.batch_small
        print(f"(2-3) small model: {ours.num_params() / 1e6:.2f}M parameters, B={B}")
        if "2" not in skip:
            t, variants = ours_vs_hf(hf, ours, B, f"(2) 1M, B={B}", args.reps)
            t1 = measure(variants, 1, args.reps, device, warmup_tokens=1)       # prefill + one sampled token
            med = statistics.median
            pre = {k: med(t1[k]) for k in t1}
            step = {k: (med(t[k]) - pre[k]) / (N - 1) for k in t}
            print(f"(2) a 1-token call (prefill + one draw): transformers {pre['hf'] * 1e3:.1f} ms, ours "
                  f"{pre['ours'] * 1e3:.1f} ms; per decode "
                  f"step: transformers {step['hf'] * 1e3:.2f} ms, ours {step['ours'] * 1e3:.2f} ms, of which alone: "
                  f"matmuls {weight_floor(ours, B, 20, linear) * 1e3:.2f} ms (weights in cache), attention "
                  f"{attention_floor(ours, B, 3) * 1e3:.2f} ms")
        g = torch.Generator(device).manual_seed(0)
        ids = torch.randint(0, ours.config.vocab_size, (B, args.prompt), generator=g, device=device)
        prompts = ids.tolist()
        if "3" not in skip:
            t = measure({"ours": lambda n: generate(ours, prompts, n, generator=g),
                         "nocache": lambda n: nocache_generate(ours, ids, n, g)},
                        N, args.nocache_reps, device)
            record(f"(3) 1M, B={B}", "no-cache loop", B, t["nocache"], t["ours"])
        if "5" not in skip:
            hf, ours = arena_models(device)
            print(f"(5) arena SFT model: {ours.num_params() / 1e6:.2f}M parameters, {type(hf).__name__}, B={B}")
            ours_vs_hf(hf, ours, B, f"(5) arena 0.89M, B={B}", args.reps)

    print(f"\n| {'benchmark':<24} | {'baseline':<21} | {'baseline tok/s':>14} | {'ours tok/s':>10} "
          f"| {'ratio (median)':>14} | {'ratio (best)':>12} |")
    print(f"|{'-' * 26}|{'-' * 23}|{'-' * 16}|{'-' * 12}|{'-' * 16}|{'-' * 14}|")
    for label, base, tb, to, r, rb in rows:
        print(f"| {label:<24} | {base:<21} | {tb:>14.1f} | {to:>10.1f} | {r:>13.2f}x | {rb:>11.2f}x |")


if __name__ == "__main__":
    main()
