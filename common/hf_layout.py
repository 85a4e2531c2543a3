"""Transformers' checkpoint layout <-> ours: tensor names, GPT-2's Conv1D (transposed) weights, and the q/k/v
(gate/up) projections that common/model.py stacks into one Linear each. `cfg` is a common.model.ModelConfig.

    to_hf_state_dict(model, state_dict=None) -> {transformers' name: tensor}      (save)
    from_hf_state_dict(cfg, get, keys, names, source) -> our state dict    (load; stacked pieces shape-checked)
"""
import re

import torch

FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}   # our stacked Linear -> transformers' pieces
GPT2 = {"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f", "input_layernorm": "ln_1",
        "post_attention_layernorm": "ln_2", "self_attn.qkv_proj": "attn.c_attn", "self_attn.o_proj": "attn.c_proj",
        "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}   # our module -> GPT-2's (under "transformer.")
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")   # GPT-2's Conv1D: weights stored (in, out)
HEADS = ("lm_head.weight", "score.weight")   # the same name in both layouts


def _fused(key):
    """'layers.3.self_attn.qkv_proj.weight' -> ('layers.3.', ('self_attn.q_proj', ...), 'weight'); else None."""
    for ours, parts in FUSED.items():
        head, sep, kind = key.partition("." + ours + ".")
        if sep:
            return head + ".", parts, kind
    return None


def _fused_sizes(cfg, parts) -> list:
    """Output rows of each piece of a stacked Linear."""
    if parts == FUSED["self_attn.qkv_proj"]:
        return [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
    return [cfg.intermediate_size] * 2


def _gpt2(key):
    """Our key -> (GPT-2's name without "transformer.", whether the tensor is transposed): 'layers.3.mlp.up_proj.weight'
    -> ('h.3.mlp.c_fc.weight', True)."""
    layer, module, kind = re.fullmatch(r"(?:layers\.(\d+)\.)?(.+)\.(weight|bias)", key).groups()
    theirs = GPT2[module]
    return (f"h.{layer}." if layer else "") + f"{theirs}.{kind}", theirs in CONV1D and kind == "weight"


def to_hf_state_dict(model, state_dict=None) -> dict:
    """Our parameters (or `state_dict`, e.g. merged LoRA weights) under transformers' names."""
    cfg, out = model.config, {}
    for k, v in (model.state_dict() if state_dict is None else state_dict).items():
        if k in HEADS:
            out[k] = v
        elif cfg.model_type == "gpt2":
            name, transposed = _gpt2(k)
            out["transformer." + name] = v.t() if transposed else v
        elif fused := _fused(k):
            prefix, parts, kind = fused
            for name, piece in zip(parts, v.split(_fused_sizes(cfg, parts))):
                out[f"model.{prefix}{name}.{kind}"] = piece
        else:
            out["model." + k] = v
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg, get, keys: set, names, source: str) -> dict:
    """Our state dict from a checkpoint: `get(name)` returns the tensor, `keys` the names present, `names` our
    parameter names (the Transformer's state-dict keys). Extra tensors (GPT-2's attn.bias buffers, a tied
    lm_head.weight) are ignored; a missing one raises."""
    def need(name):
        if name not in keys:
            raise KeyError(f"{source}: missing tensor {name!r}")
        return get(name)

    root = "transformer." if cfg.model_type == "gpt2" else "model."
    p = root if any(k.startswith(root) for k in keys) else ""
    sd = {}
    for k in names:
        if k in HEADS:
            sd[k] = need(k)
        elif cfg.model_type == "gpt2":
            name, transposed = _gpt2(k)
            sd[k] = need(p + name).t() if transposed else need(p + name)
        elif fused := _fused(k):  # stacked from transformers' separate q/k/v (gate/up) tensors, each shape-checked
            prefix, parts, kind = fused
            pieces = []
            for name, size in zip(parts, _fused_sizes(cfg, parts)):
                t = need(f"{p}{prefix}{name}.{kind}")
                want = (size, cfg.hidden_size) if kind == "weight" else (size,)
                if tuple(t.shape) != want:
                    raise ValueError(f"{source}: tensor {p}{prefix}{name}.{kind} has shape {tuple(t.shape)}, "
                                     f"expected {want}")
                pieces.append(t)
            sd[k] = torch.cat(pieces)
        else:
            sd[k] = need(p + k)
    return sd
