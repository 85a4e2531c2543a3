"""LoRA adapters (Hu et al., arXiv 2106.09685): y = W x + (α/r) B A x on chosen projections of a frozen model, stored
in PEFT's layout so that peft.PeftModel loads them.

    lora = LoRA(model, rank=16, alpha=32, targets=("q_proj", "v_proj"))   # None: every projection
    model.hidden_states(ids, mask, lora=lora)      # the adapted model; lora=None: the base model (π_ref)
    lora.merged_state_dict(model)                  # W + (α/r) B A under our names, for a complete checkpoint
    lora.save(folder) / lora.load(folder)          # adapter_config.json + adapter_model.safetensors (PEFT)

One LoRA per policy: the base weights are shared and frozen (bf16 with --precision bf16), so π_t, Nash-MP's anchor and
TANPO's second player are copies of the adapters only. A starts Kaiming-uniform (a = √5) and B at zero, as in PEFT, so
a fresh adapter leaves the model exactly unchanged. Targets are named as transformers names the modules; common/model.py
stacks q/k/v (gate/up) into one Linear, and the adapter of each piece adds to that piece's rows of the output.
"""
import copy
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# our projection in each layer -> the modules transformers names in it (what PEFT targets), in output order
SITES = {"llama": {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "self_attn.o_proj": ("self_attn.o_proj",),
                   "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                   "mlp.down_proj": ("mlp.down_proj",)},
         "gpt2": {"self_attn.qkv_proj": ("attn.c_attn",), "self_attn.o_proj": ("attn.c_proj",),
                  "mlp.up_proj": ("mlp.c_fc",), "mlp.down_proj": ("mlp.c_proj",)}}
PEFT_ROOT = {"llama": "base_model.model.model.layers", "gpt2": "base_model.model.transformer.h"}


def target_names(model_type) -> list:
    """The projections LoRA can adapt in a model of this type, as transformers names them."""
    family = "gpt2" if model_type == "gpt2" else "llama"
    return sorted({p.rpartition(".")[2] for parts in SITES[family].values() for p in parts})


class LoRA(nn.Module):
    """The adapters of one policy: for every targeted module of every layer, A (r, in) and B (out, r), fp32."""

    def __init__(self, model, rank: int, alpha: float, targets=None):
        super().__init__()
        cfg = model.config
        self.family = "gpt2" if cfg.model_type == "gpt2" else "llama"
        names = target_names(cfg.model_type)
        self.targets = tuple(names if targets is None else targets)
        unknown = [t for t in self.targets if t not in names]
        if unknown or not self.targets or rank < 1:
            raise ValueError(f"--lora-targets {','.join(self.targets)}: expected some of {', '.join(names)} for "
                             f"{cfg.model_type} (and --lora-rank ≥ 1)")
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        self.pieces = {}      # "<layer>.<site>" -> [(transformers' module, key of its adapter or None, out rows)]
        dev = model.lm_head_weight.device
        for i, layer in enumerate(model.layers):
            for site, parts in SITES[self.family].items():
                module = layer.get_submodule(site)
                sizes = _piece_rows(cfg, site, module)
                pieces = []
                for name, rows in zip(parts, sizes):
                    key = None
                    if name.rpartition(".")[2] in self.targets:
                        key = f"{i}-{name.replace('.', '-')}"   # (a ParameterDict key has no dots)
                        A = torch.empty(rank, module.in_features, device=dev)
                        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                        self.A[key] = nn.Parameter(A)
                        self.B[key] = nn.Parameter(torch.zeros(rows, rank, device=dev))
                    pieces.append((name, key, rows))
                if any(key for _, key, _ in pieces):
                    self.pieces[f"{i}.{site}"] = pieces

    def add(self, y, x, site):
        """y = W x of projection `site` (…, out), plus (α/r) B A x on the rows of each adapted piece."""
        pieces = self.pieces.get(site)
        if pieces is None:
            return y
        delta = {key: F.linear(F.linear(x, self.A[key]), self.B[key]) for _, key, _ in pieces if key}
        dtype = next(iter(delta.values())).dtype
        parts = [delta[key] if key else x.new_zeros(*x.shape[:-1], rows, dtype=dtype) for _, key, rows in pieces]
        return y + self.scale * (parts[0] if len(parts) == 1 else torch.cat(parts, -1))

    def frozen_copy(self) -> "LoRA":
        return copy.deepcopy(self).requires_grad_(False)

    @torch.no_grad()
    def merged_state_dict(self, model) -> dict:
        """The model's state dict with W + (α/r) B A in place of each adapted projection's weight (in W's dtype)."""
        sd = dict(model.state_dict())
        for site, pieces in self.pieces.items():
            W = sd[f"layers.{site}.weight"]
            delta = torch.cat([self.scale * (self.B[key] @ self.A[key]) if key else W.new_zeros(rows, W.shape[1],
                                                                                                  dtype=torch.float32)
                               for _, key, rows in pieces])
            sd[f"layers.{site}.weight"] = (W.float() + delta).to(W.dtype)
        return sd

    def peft_state(self) -> dict:
        """{PEFT's tensor name: tensor}: base_model.model.<transformers' module>.lora_A.weight / lora_B.weight."""
        out = {}
        for key in self.A:
            i, name = key.split("-", 1)
            prefix = f"{PEFT_ROOT[self.family]}.{i}.{name.replace('-', '.')}"
            out[prefix + ".lora_A.weight"], out[prefix + ".lora_B.weight"] = self.A[key], self.B[key]
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, folder, base=None):
        """adapter_config.json and adapter_model.safetensors (fp32) into `folder` (which exists)."""
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                  "target_modules": sorted(self.targets), "lora_dropout": 0.0, "bias": "none",
                  "fan_in_fan_out": self.family == "gpt2", "inference_mode": True, "base_model_name_or_path": base}
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(self.peft_state(), os.path.join(folder, "adapter_model.safetensors"))

    @torch.no_grad()
    def load(self, folder):
        """The adapters of a save()d folder into this LoRA (same model, rank and targets)."""
        f = os.path.join(folder, "adapter_model.safetensors")
        try:
            state = load_file(f)
        except Exception as e:  # SafetensorError, OSError
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        want = self.peft_state()
        if set(state) != set(want) or any(state[k].shape != want[k].shape for k in want):
            raise ValueError(f"{f}: its adapters do not match --lora-rank {self.rank} / --lora-targets "
                             f"{','.join(self.targets)} on this model")
        for key in self.A:
            i, name = key.split("-", 1)
            prefix = f"{PEFT_ROOT[self.family]}.{i}.{name.replace('-', '.')}"
            self.A[key].copy_(state[prefix + ".lora_A.weight"])
            self.B[key].copy_(state[prefix + ".lora_B.weight"])


def _piece_rows(cfg, site, module) -> list:
    """Output rows of each transformers module inside one of our projections (q, k, v; gate, up; or the whole)."""
    if site == "self_attn.qkv_proj" and cfg.model_type != "gpt2":
        return [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
    if site == "mlp.gate_up_proj":
        return [cfg.intermediate_size] * 2
    return [module.out_features]
