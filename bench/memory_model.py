"""The memory model of a training run on one GPU, computed (not measured on a GPU): weights, gradients, Adam, the frozen
copies, the judge, and the activations of one micro-batch.

    python bench/memory_model.py [--preset qwen2.5-0.5b] [--micro-batch 8] [--tokens 512] [--judge-params 0.49e9]

Every fixed cost is counted from the parameter count N (fp32 master weights 4N, gradients 4N, Adam's two moments 8N;
π_ref keeps its Linear weights, N_lin of them, in bf16 and the rest (embeddings, norms) in fp32, 2 N_lin + 4 (N −
N_lin), so that under autocast it computes exactly what the policy does; a model judge is bf16 throughout, 2N).
Activations per token are measured, not assumed: one forward of the model's own layers (one and three of them, at the
preset's width) runs on the CPU under torch.autocast(bfloat16), as a CUDA run of the scripts does, and
torch.autograd.graph.saved_tensors_hooks counts the bytes of every tensor autograd keeps for backward; the slope
between two sequence lengths and between the two layer counts is the per-token cost per layer (the bf16 weight copies
that autocast caches are a fixed cost, not per token, and drop out). Rows are unpadded, so attention runs the kernel
that keeps O(T) state, as CUDA's memory-efficient kernel does with a padding mask (the CPU's masked path would keep
the T x T probabilities). --grad-checkpoint keeps each block's input only, then recomputes one block at a time in
backward: its peak adds one layer's full activations. Generation's KV cache (infer_batch rows) is listed; the chunked
log-prob tile (at most 64 MB, common/losses.py) and the transient buffers of no-grad passes are left out.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.autograd.graph import saved_tensors_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.model import ModelConfig, Transformer  # noqa: E402

PRESETS = {  # public architecture numbers (config.json of the released checkpoints)
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                         max_position_embeddings=8192, rope_theta=1e5, tie_word_embeddings=True),
}
GB = 1e9


def num_params(cfg: ModelConfig):
    """(all parameters, those of the Linear layers)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    lin = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    return sum(p.numel() for p in model.parameters()), lin


def saved_bytes_per_token(cfg: ModelConfig, checkpoint: bool, autocast: bool = True):
    """(per layer, outside the layers) bytes autograd saves per token in a forward: the slopes between T = 64 and 192
    tokens and between 1 and 3 layers, so that neither the weights' bf16 copies nor the embedding and final norm are
    counted as per-layer costs."""
    def count(layers, T):
        small = ModelConfig(**{**cfg.__dict__, "num_hidden_layers": layers, "vocab_size": 256, "extra": {}})
        torch.manual_seed(0)
        model = Transformer(small)
        model.grad_checkpoint = checkpoint
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        ids = torch.randint(0, 256, (1, T))
        with saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.hidden_states(ids).float().sum()
        return sum(v for k, v in seen.items() if k not in params)
    per_token = {L: (count(L, 192) - count(L, 64)) / 128 for L in (1, 3)}
    per_layer = (per_token[3] - per_token[1]) / 2
    return per_layer, per_token[1] - per_layer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2.5-0.5b", choices=sorted(PRESETS))
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward")
    ap.add_argument("--tokens", type=int, default=512, help="prompt + response tokens per row")
    ap.add_argument("--infer-batch", type=int, default=32, help="rows per generate() call")
    ap.add_argument("--judge-params", type=float, default=None, help="parameters of the judge (default: the policy's)")
    args = ap.parse_args(argv)
    cfg = ModelConfig(**PRESETS[args.preset])
    N, N_lin = num_params(cfg)
    J = int(args.judge_params) if args.judge_params else N
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    tokens = args.micro_batch * args.tokens
    per_tok = {ck: saved_bytes_per_token(cfg, ck) for ck in (False, True)}   # (per layer, outside layers)
    kv = args.infer_batch * args.tokens * L * 2 * cfg.num_key_value_heads * cfg.head_dim * 2   # bf16 k and v
    fixed = {"policy weights, fp32 (4N)": 4 * N, "gradients, fp32 (4N)": 4 * N, "Adam moments, fp32 (8N)": 8 * N,
             "π_ref, Linear weights bf16 (2 N_lin + 4 (N - N_lin))": 2 * N_lin + 4 * (N - N_lin),
             f"judge, bf16 ({J / 1e9:.2f}B parameters)": 2 * J}
    print(f"{args.preset}: N = {N / 1e6:.1f}M parameters ({N_lin / 1e6:.1f}M in Linear layers), {L} layers, d = {h}; "
          f"micro-batch {args.micro_batch} rows x {args.tokens} tokens = {tokens} tokens (computed, not measured on a "
          f"GPU)")
    for k, v in fixed.items():
        print(f"  {k:<52}{v / GB:8.2f} GB")
    act = {ck: (per_tok[ck][0] * L + per_tok[ck][1]) * tokens + (per_tok[False][0] * tokens if ck else 0)
           for ck in (False, True)}
    print(f"  activations per token and layer, bf16 autocast: {per_tok[False][0] / 1e3:.1f} KB "
          f"({per_tok[True][0] / 1e3:.1f} KB with --grad-checkpoint), + {per_tok[False][1] / 1e3:.1f} KB per token "
          f"outside the layers")
    print(f"  {'activations of one micro-batch':<44}{act[False] / GB:8.2f} GB  ({act[True] / GB:.2f} GB with "
          f"--grad-checkpoint, one block recomputed at a time)")
    print(f"  {'KV cache of one generate() call, bf16':<44}{kv / GB:8.2f} GB  ({args.infer_batch} rows)")
    total = sum(fixed.values())
    print("  peak (the sum above + the larger of activations and KV cache):")
    for name, a in (("without --grad-checkpoint", act[False]), ("with --grad-checkpoint", act[True])):
        base = total + max(a, kv)
        print(f"    {name:<26} inpo, nash_dpo, SADPO {base / GB:5.1f} GB; nash_mp (+ the fp32 anchor π^k, 4N) "
              f"{(base + 4 * N) / GB:5.1f} GB; TANPO (+ the second player's fp32 weights, 4N) "
              f"{(base + 4 * N) / GB:5.1f} GB")


if __name__ == "__main__":
    main()
