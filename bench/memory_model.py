"""The memory model of one training iteration on one GPU, computed (not measured on a GPU): the trained weights and
their optimizer, the frozen models, the judge, and the activations of one micro-batch, with and without LoRA.

    python bench/memory_model.py                       # every shipped config (bench/configs/), every script
    python bench/memory_model.py --config bench/configs/llama-3-8b --lora-rank 16 --micro-batch 8 --tokens 1024 \\
        --judge-config bench/configs/llama-3-8b       # one setting in detail

Fixed costs from the parameter counts (N all, N_lin of the Linear layers, P of the LoRA adapters, J of the judge):
- full fine-tuning: fp32 weights, gradients and Adam's two moments (16N); π_ref with its Linear weights in bf16 and
  the rest fp32 (2 N_lin + 4 (N − N_lin): under autocast it computes what the policy computes); and the bf16 copies of
  the Linear weights that autocast makes in forward and autograd keeps for backward (2 N_lin; one block's worth with
  --grad-checkpoint, which recomputes one block at a time);
- LoRA: the frozen base in bf16 (2N), which is also π_ref (the adapters off), and fp32 adapters with their gradients
  and Adam (16P);
- the judge in bf16 (2J); Nash-MP's anchor π^k and TANPO's second player: an fp32 copy of the trained weights (4N, or
  4P with LoRA); the log-prob tile (64 MB) and the LM head's bf16 copy (2 V d) that common/losses.py makes per call.
Activations per token are measured, not assumed: one forward of the model's own layers (one and two of them, at the
config's width, vocabulary 256) runs on the CPU under torch.autocast(bfloat16), as a CUDA run does, and
torch.autograd.graph.saved_tensors_hooks counts the bytes of every tensor autograd keeps for backward; the slopes
between two sequence lengths and two layer counts give the per-token cost per layer and outside the layers (weights
and their bf16 copies are fixed costs and drop out). With --grad-checkpoint each block keeps its input only, plus one
block's full activations during its recomputation. Generation's KV cache (--infer-batch rows, bf16) is listed; the
peak of an iteration is the fixed costs plus the larger of the training activations and the KV cache.
"""
import argparse
import gc
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.autograd.graph import saved_tensors_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.lora import LoRA  # noqa: E402
from common.model import ModelConfig, Transformer, read_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
GB = 1e9
SCRIPTS = ("inpo / nash_dpo / SADPO", "nash_mp", "TANPO")


def num_params(cfg: ModelConfig, lora_rank=0):
    """(all parameters N, those of Linear layers N_lin, LoRA adapter parameters P at this rank, every projection)."""
    with torch.device("meta"):
        model = Transformer(cfg)
        lin = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
        P = sum(p.numel() for p in LoRA(model, lora_rank, 2 * lora_rank).parameters()) if lora_rank else 0
    return sum(p.numel() for p in model.parameters()), lin, P


def saved_bytes_per_token(cfg: ModelConfig, checkpoint: bool, lora_rank=0, device="cpu"):
    """(per layer, outside the layers) bytes autograd saves per token in a bf16-autocast forward, from the slopes
    between T = 16 and 48 tokens and between 1 and 2 layers. With LoRA the base is bf16, as the scripts load it.
    device: where the layers run (bench/gpu_check.py counts on the GPU, under its attention kernels)."""
    def count(layers):
        small = ModelConfig(**{**cfg.__dict__, "num_hidden_layers": layers, "vocab_size": 256, "extra": {}})
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(small).to(device)   # (RoPE's frequencies are computed on the CPU)
        model.grad_checkpoint = checkpoint
        lora = None
        if lora_rank:
            model.requires_grad_(False).to(torch.bfloat16)
            lora = LoRA(model, lora_rank, 2 * lora_rank)
        params = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list((lora or model).parameters())}
        out = []
        for T in (16, 48):
            seen = {}

            def pack(t):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
            with saved_tensors_hooks(pack, lambda t: t), autocast:
                model.hidden_states(torch.randint(0, 256, (1, T), device=device), lora=lora).float().sum()
            out.append(sum(v for k, v in seen.items() if k not in params))
        return (out[1] - out[0]) / 32
    per_token = {L: count(L) for L in (1, 2)}
    gc.collect()
    per_layer = per_token[2] - per_token[1]
    return per_layer, per_token[1] - per_layer


def measure(cfg, ranks, device="cpu"):
    """{(rank, checkpoint): (per layer, outside)} of one config (a ModelConfig or a folder)."""
    cfg = read_config(cfg) if isinstance(cfg, str) else cfg
    return {(r, ck): saved_bytes_per_token(cfg, ck, r, device) for r in ranks for ck in (False, True)}


def budget(cfg, J, lora_rank, tokens, infer_rows, row_tokens, checkpoint, per_token):
    """{script: (peak bytes, {part: bytes})} for one setting; per_token: measure()'s figures."""
    N, N_lin, P = num_params(cfg, lora_rank)
    L = cfg.num_hidden_layers
    layer_lin = (N_lin - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)) / L
    per_layer, outside = per_token[lora_rank, checkpoint]
    act = (per_layer * L + outside) * tokens
    if checkpoint:
        act += per_token[lora_rank, False][0] * tokens   # one block's activations while it is recomputed
    kv = infer_rows * row_tokens * L * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    if lora_rank:
        parts = {"base model bf16 = π_ref (2N)": 2 * N, "adapters: weights, gradients, Adam (16P)": 16 * P}
        copy = 4 * P
    else:
        parts = {"weights, gradients, Adam (16N)": 16 * N,
                 "π_ref (2 N_lin + 4 (N − N_lin))": 2 * N_lin + 4 * (N - N_lin),
                 "autocast's bf16 weight copies": 2 * (layer_lin if checkpoint else N_lin)}
        copy = 4 * N
    parts.update({"judge bf16 (2J)": 2 * J,
                  "log-prob tile + LM head copy": 64 * 2**20 + 2 * cfg.vocab_size * cfg.hidden_size,
                  f"activations ({tokens} tokens)" if act >= kv else f"KV cache ({infer_rows} rows)": max(act, kv)})
    base = sum(parts.values())
    return {"inpo / nash_dpo / SADPO": (base, parts), "nash_mp": (base + copy, parts), "TANPO": (base + copy, parts)}, \
        dict(N=N, N_lin=N_lin, P=P, act=act, kv=kv, per_layer=per_layer)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None,
                    help="a model folder or config.json (default: every one in bench/configs)")
    ap.add_argument("--judge-config", default=str(CONFIGS / "llama-3-8b"),
                    help="the judge's config (default: Llama-3-8B, the shape of RLHFlow's pairwise preference model)")
    ap.add_argument("--lora-rank", type=int, default=None, help="one rank (default: both full fine-tuning and r = 16)")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward")
    ap.add_argument("--tokens", type=int, default=1024, help="prompt + response tokens per row")
    ap.add_argument("--infer-batch", type=int, default=64, help="rows per generate() call")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="the GPU's memory for the 'fits' column")
    args = ap.parse_args(argv)
    configs = [Path(args.config)] if args.config else sorted(p for p in CONFIGS.iterdir() if p.is_dir())
    J = num_params(read_config(args.judge_config))[0]
    ranks = [args.lora_rank] if args.lora_rank is not None else [0, 16]
    tokens = args.micro_batch * args.tokens
    print(f"Computed, not measured: micro-batch {args.micro_batch} x {args.tokens} tokens, generation "
          f"{args.infer_batch} "
          f"rows x {args.tokens} tokens, judge {J / 1e9:.2f}B parameters in bf16; fits = peak <= {args.gpu_gb:g} GB.\n")
    print("| model | training | --grad-checkpoint | " + " | ".join(f"{s} (GB)" for s in SCRIPTS) + " | fits |")
    print("|---|---|---|" + "---|" * len(SCRIPTS) + "---|")
    for path in configs:
        path = path.parent if path.name == "config.json" else path
        cfg = read_config(path)
        # in a fresh process: an allocator that built layers of other widths keeps their memory
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_token = pool.submit(measure, str(path), ranks).result()
        for r in ranks:
            for ck in (False, True):
                peaks, info = budget(cfg, J, r, tokens, args.infer_batch, args.tokens, ck, per_token)
                fits = [s for s in SCRIPTS if peaks[s][0] <= args.gpu_gb * GB]
                mode = f"LoRA r={r} ({info['P'] / 1e6:.1f}M)" if r else "full"
                print(f"| {path.name} ({info['N'] / 1e9:.2f}B) | {mode} "
                      f"| {'yes' if ck else 'no'} | " + " | ".join(f"{peaks[s][0] / GB:.1f}" for s in SCRIPTS)
                      + f" | {'all' if len(fits) == len(SCRIPTS) else ', '.join(fits) or 'none'} |")
                if args.config:
                    for part, b in peaks[SCRIPTS[0]][1].items():
                        print(f"    {part:<44}{b / GB:8.2f} GB")


if __name__ == "__main__":
    main()
