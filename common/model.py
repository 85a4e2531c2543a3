"""One decoder-only transformer for GPT-2 and the Llama family, loading and saving Hugging Face layout.

Covers (config.json `model_type`): gpt2 (learned positions, LayerNorm, GELU(tanh), Conv1D layout); llama and mistral
(RoPE with optional "linear" / "llama3" scaling, RMSNorm, SwiGLU, GQA); qwen2 (llama + q/k/v biases); qwen3 (llama
+ RMSNorm on each head of q and k). A `*ForSequenceClassification` checkpoint loads as a reward model: `forward`
returns the score head's output at the last non-pad token, (B,) when num_labels == 1.

  model = from_pretrained(path, device="cpu", dtype=torch.float32)
  logits = model(input_ids, attention_mask=None)        # (B, T, V)   or scores (B,) for a reward model
  model.save_pretrained(path)                           # config.json + model.safetensors, loadable by transformers
  model.hidden_states(input_ids, attention_mask=None, position_ids=None, cache=None)  # (B, T, d), final norm applied
  model.lm_head_weight                                  # (V, d); the embedding matrix when tied
  model.new_cache(batch_size, max_len)                  # preallocated KV cache for common/sampler.py
Stacked projections, padding and attention masks, loading: docs/internals.md, "The model". Logits equal
transformers' for every family (tests/test_model.py).
"""
import contextlib
import json
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from common.files import atomic_dir, read_json
from common.hf_layout import from_hf_state_dict, to_hf_state_dict

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = LLAMA_FAMILY + ("gpt2",)
CAUSAL_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
REWARD_ARCH = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
               "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
               "gpt2": "GPT2ForSequenceClassification"}


@dataclass
class ModelConfig:
    """Normalized config. Field names are the Llama-style config.json keys (GPT-2's n_embd etc. are mapped)."""
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None     # None -> = num_attention_heads (no GQA)
    head_dim: int | None = None                # None -> hidden_size // num_attention_heads
    intermediate_size: int | None = None       # None -> 4 * hidden_size (gpt2 n_inner)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6                 # gpt2: layer_norm_epsilon
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None           # {"rope_type": "linear"|"llama3", ...}
    attention_bias: bool = False               # q/k/v (and o for llama) biases; qwen2: q/k/v only
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None          # only enforced as a limit (see _check_supported)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    is_reward_model: bool = False              # a *ForSequenceClassification checkpoint
    num_labels: int = 1
    extra: dict = field(default_factory=dict)  # the rest of the original config.json, written back on save

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.model_type == "qwen2":      # Qwen2 always has q/k/v biases (its config has no flag for them)
            self.attention_bias = True
        if self.model_type == "gpt2":       # GPT-2 has biases everywhere
            self.attention_bias = self.mlp_bias = True

    # ---- config.json <-> ModelConfig ------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        d = dict(d)
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"{source}: unknown model_type {mt!r} (supported: {', '.join(SUPPORTED)})")
        archs = d.get("architectures") or []
        kw = dict(model_type=mt, is_reward_model=any(a.endswith("ForSequenceClassification") for a in archs))
        if "id2label" in d:
            kw["num_labels"] = len(d["id2label"])
        if "num_labels" in d:
            kw["num_labels"] = int(d["num_labels"])
        if mt == "gpt2":
            rename = dict(n_embd="hidden_size", n_layer="num_hidden_layers", n_head="num_attention_heads",
                          n_inner="intermediate_size", n_positions="max_position_embeddings",
                          layer_norm_epsilon="rms_norm_eps")
            for k, v in rename.items():
                if k in d:
                    kw[v] = d[k]
            kw["vocab_size"] = d.get("vocab_size", 50257)
            kw["attention_bias"] = kw["mlp_bias"] = True
            kw["tie_word_embeddings"] = d.get("tie_word_embeddings", True)
            if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn") \
                    or d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"{source}: gpt2 variant not supported (scale_attn_by_inverse_layer_idx, "
                                 f"reorder_and_upcast_attn, activation {d.get('activation_function')!r})")
        else:
            names = {f.name for f in fields(cls)} - {"extra", "model_type", "is_reward_model", "num_labels"}
            kw.update({k: d[k] for k in names if k in d and d[k] is not None})
            rp = d.get("rope_parameters") or {}
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
            scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
            kw["rope_scaling"] = scaling
            if mt == "qwen2":
                kw["attention_bias"] = True
            if mt in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
                kw["sliding_window"] = None
            hidden_act = d.get("hidden_act", "silu")
            if hidden_act != "silu":
                raise ValueError(f"{source}: hidden_act {hidden_act!r} not supported (silu only)")
            kw.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", mt != "llama" and mt != "mistral"))
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kw[k] = d.get(k)
        kw["extra"] = d
        return cls(**kw)

    def to_hf(self) -> dict:
        d = dict(self.extra)
        common = dict(model_type=self.model_type, vocab_size=self.vocab_size, bos_token_id=self.bos_token_id,
                      eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                      tie_word_embeddings=self.tie_word_embeddings)
        arch = (REWARD_ARCH if self.is_reward_model else CAUSAL_ARCH)[self.model_type]
        d.update(common, architectures=[arch])
        if self.is_reward_model:
            d["num_labels"] = self.num_labels
            d.setdefault("id2label", {str(i): f"LABEL_{i}" for i in range(self.num_labels)})
            d.setdefault("label2id", {f"LABEL_{i}": i for i in range(self.num_labels)})
        if self.model_type == "gpt2":
            d.update(n_embd=self.hidden_size, n_layer=self.num_hidden_layers, n_head=self.num_attention_heads,
                     n_inner=self.intermediate_size, n_positions=self.max_position_embeddings,
                     layer_norm_epsilon=self.rms_norm_eps, activation_function="gelu_new")
        else:
            d.update(hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                     num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                     head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                     max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                     rope_theta=self.rope_theta, hidden_act="silu")
            d.pop("rope_parameters", None)  # written as rope_theta / rope_scaling, which every version reads
            if self.rope_scaling:
                d["rope_scaling"] = self.rope_scaling
            if self.model_type not in ("qwen2",):
                d.update(attention_bias=self.attention_bias)
            if self.model_type == "llama":
                d.update(mlp_bias=self.mlp_bias)
        return d


# ---- building blocks ----------------------------------------------------------------------------------

SKINNY_ROWS = 64          # linear(): at most this many input rows ...
LARGE_WEIGHT = 1 << 19    # ... and a weight of at least this many entries (2 MiB in fp32) take the (W x^T)^T path


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias) = x W^T + b, x (..., in), weight (out, in). On CPU, when x has at most SKINNY_ROWS
    rows and the weight at least LARGE_WEIGHT entries (a decode step of a model that does not fit in cache), it
    computes (W x^T)^T instead: the same product, but W streams as the untransposed operand of the GEMM, which CPU
    BLAS does faster for such shapes and slower for small weights, hence the thresholds (bench/bench_sampler.py (1)
    times both forms; docs/benchmarks.md). Values equal F.linear's to float rounding; elsewhere (CUDA, training
    batches) it is F.linear."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type != "cpu" or not 0 < rows <= SKINNY_ROWS or weight.numel() < LARGE_WEIGHT:
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, x.shape[-1]).t()                                  # (in, rows)
    y = weight @ xt if bias is None else torch.addmm(bias[:, None], weight, xt)   # (out, rows)
    return y.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose forward is linear() above."""
    def forward(self, x):
        return linear(x, self.weight, self.bias)


def adapted(module, x, lora, site):
    """module(x), plus the low-rank update of `site` ("<layer>.self_attn.qkv_proj", …) when `lora` adapts it."""
    y = module(x)
    return y if lora is None else lora.add(y, x, site)


GELU_C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x):
    """GPT-2's GELU, tanh approximation: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). Without autograd it is
    evaluated as x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) (the same function, as (1 + tanh z)/2 = sigmoid(2z)) in
    one new buffer and five in-place passes, faster than F.gelu(approximate="tanh") on CPU and equal to it to float
    rounding (tests/test_model.py: GPT-2 logits vs transformers). With autograd it is F.gelu."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.gelu(x, approximate="tanh")
    y = x * x
    y.mul_(GELU_C * 0.044715).add_(GELU_C).mul_(x)                        # 2 sqrt(2/pi) (x + 0.044715 x^3)
    return y.sigmoid_().mul_(x)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistic in float32 (as in the reference implementations)."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) of RoPE, with the config's scaling (RoFormer; Llama 3.1 report)."""
    dim = cfg.head_dim
    # on the CPU even inside _meta_model(): meta-tensor arithmetic is slow (torch imports torch._dynamo for it)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"config.json: rope scaling type {kind!r} not supported (linear, llama3)")
    return inv_freq


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs); cos/sin (B, 1, T, hs). Rotate-half convention of the HF Llama port."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def pad_rows(rows, pad_id, left=True):
    """Token-id lists (ragged) -> ids and attention mask, both (B, T) long on the CPU, padded with pad_id on the left
    (prompts: the last column is every row's last token) or on the right (responses)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


class KVCache:
    """Preallocated keys/values per layer, (B, n_kv, max_len, hs), filled left to right; `pos` = filled length.
    All rows share one position counter: ragged prompts are left-padded (see sampler.py)."""
    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer, k, v):
        """Write k, v (B, n_kv, T, hs) at [pos, pos+T) and return the filled views [0, pos+T)."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, nh, nkv, hs = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.nh, self.nkv, self.hs = nh, nkv, hs
        qkv_bias = cfg.attention_bias
        o_bias = cfg.attention_bias and cfg.model_type in ("llama", "mistral", "gpt2")
        self.qkv_proj = Linear(d, (nh + 2 * nkv) * hs, bias=qkv_bias)   # q, k, v stacked: one GEMM, not three
        self.o_proj = Linear(nh * hs, d, bias=o_bias)
        self.qk_norm = cfg.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(hs, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hs, cfg.rms_norm_eps)

    def forward(self, x, rope, mask, cache, layer, lora=None):
        B, T, _ = x.shape
        qkv = adapted(self.qkv_proj, x, lora, f"{layer}.self_attn.qkv_proj").view(B, T, self.nh + 2 * self.nkv, self.hs)
        q, k, v = qkv.split([self.nh, self.nkv, self.nkv], dim=2)         # (B, T, nh|nkv, hs) views
        v = v.transpose(1, 2)                                              # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                        # (B, nh|nkv, T, hs)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if cache is not None:
            k, v = cache.update(layer, k, v)                               # (B, nkv, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.nkv != self.nh)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)
        return adapted(self.o_proj, y, lora, f"{layer}.self_attn.o_proj")


class MLP(nn.Module):
    """SwiGLU (Llama family): down(silu(gate(x)) * up(x)), gate and up stacked in one GEMM;
    GPT-2: proj(gelu_tanh(fc(x)))."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gated = cfg.model_type != "gpt2"
        if self.gated:
            self.gate_up_proj = Linear(d, 2 * f, bias=bias)
        else:
            self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)

    def forward(self, x, layer, lora=None):
        if self.gated:
            gate, up = adapted(self.gate_up_proj, x, lora, f"{layer}.mlp.gate_up_proj").chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = gelu_tanh(adapted(self.up_proj, x, lora, f"{layer}.mlp.up_proj"))
        return adapted(self.down_proj, h, lora, f"{layer}.mlp.down_proj")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)) if cfg.model_type == "gpt2" \
            else (lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache, layer, lora=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer, lora)
        return x + self.mlp(self.post_attention_layernorm(x), layer, lora)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_supported(cfg)
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.learned_pos = cfg.model_type == "gpt2"
        if self.learned_pos:
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        else:
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps) if self.learned_pos \
            else RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_reward_model:
            self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)
        elif not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.grad_checkpoint = False   # True: recompute each block in backward (activation checkpointing)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {max_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        p = self.embed_tokens.weight
        kind = p.device.type   # the keys' dtype: the autocast dtype when it is on (CPU or CUDA), else the weights'
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else p.dtype
        return KVCache(self.config, batch_size, max_len, p.device, dtype)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None, lora=None):
        """Final-norm hidden states (B, T, d). With `cache`, input_ids are the next T tokens and attention_mask
        (B, cache.pos + T) covers the cached tokens too. lora: common.lora.LoRA adapters added to the projections."""
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        S = past + T
        if S > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {S} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if self.config.sliding_window is not None and S > self.config.sliding_window:
            raise ValueError(f"sequence length {S} exceeds sliding_window {self.config.sliding_window} "
                             f"(sliding-window attention is not implemented)")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, S, device=input_ids.device).expand(B, T)
        mask = None  # no padding and no earlier cached keys: SDPA's causal kernel; a 1-token step: no mask at all
        if cache is not None and T == 1 and attention_mask is not None:
            # a decode step: every cached key precedes the query, so the mask is the padding mask, plus the
            # query's own slot (the diagonal) always visible; (B, 1, 1, S) bool
            mask = attention_mask.bool().clone()
            mask[:, -1] = True
            mask = mask[:, None, None, :]
        elif attention_mask is not None or (past > 0 and T > 1):
            # (B, 1, T, S) bool: key s visible to query t iff s <= past + t and key s is not padding;
            # the diagonal is always visible, so a padded query row is never fully masked.
            q_idx = torch.arange(past, S, device=input_ids.device)[:, None]
            k_idx = torch.arange(S, device=input_ids.device)[None, :]
            causal = k_idx <= q_idx
            keep = causal if attention_mask is None else causal & attention_mask.bool()[:, None, :]
            mask = (keep | (k_idx == q_idx))[:, None] if attention_mask is not None else keep[None, None]
            if cache is None and attention_mask is not None and bool(attention_mask.all()):
                mask = None  # dense batch: let SDPA use its causal kernel
        x = self.embed_tokens(input_ids)
        rope = None
        if self.learned_pos:
            x = x + self.embed_positions(position_ids)
        else:
            freqs = position_ids[..., None].float() * self.inv_freq.float()      # (B, T, hs/2)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]                     # (B, 1, T, hs)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        recompute = self.grad_checkpoint and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:  # keep only each block's input; its activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, None, i, lora, use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache, i, lora)
        if cache is not None:
            cache.pos = S
        return self.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        if self.config.is_reward_model:
            return self._pool_scores(self.score(h), input_ids, attention_mask)
        return linear(h, self.lm_head_weight)

    def _pool_scores(self, scores, input_ids, attention_mask):
        """Score at the last non-pad token: the rightmost position with attention_mask 1 (or, without a mask,
        the rightmost token != pad_token_id, as transformers does)."""
        B, T = input_ids.shape
        if attention_mask is not None:
            valid = attention_mask.bool()
        elif self.config.pad_token_id is not None:
            valid = input_ids != self.config.pad_token_id
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        last = (torch.arange(T, device=input_ids.device) * valid).argmax(-1)
        out = scores[torch.arange(B, device=input_ids.device), last]
        return out.squeeze(-1) if self.config.num_labels == 1 else out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path, state_dict=None):
        """Write config.json + model.safetensors (HF names) into `path`, via a temporary folder and rename."""
        save_pretrained(self, path, state_dict)


def _check_supported(cfg: ModelConfig):
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"unknown model_type {cfg.model_type!r} (supported: {', '.join(SUPPORTED)})")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.model_type != "gpt2":
        rope_inv_freq(cfg)  # raises on unsupported scaling
    elif cfg.num_key_value_heads != cfg.num_attention_heads or \
            cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise ValueError("gpt2 has neither grouped-query attention nor a separate head_dim")


# ---- loading / saving -------------------------------------------------------------------------------

def read_config(path) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    d = read_json(cfg_path)
    if d is None:
        raise FileNotFoundError(f"{cfg_path}: not found (expected a Hugging Face model folder)")
    return ModelConfig.from_hf(d, cfg_path)


def _weight_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{index}: shard {missing[0]} not found")
        return [os.path.join(path, s) for s in shards]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            f"(only safetensors weights are read; .bin/.pt are never unpickled)")


@contextlib.contextmanager
def _meta_model():
    """Build a Transformer on the meta device with its initializers as no-ops: it only receives checkpoint weights,
    and initializing meta tensors is slow (torch imports torch._dynamo for it)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda t, *args, **kw: t)
    try:
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def copy_model(model: Transformer, linear_dtype=None) -> Transformer:
    """A copy of `model` (same device), its Linear layers' weights and biases cast to linear_dtype when given. The
    embeddings, norms and RoPE frequencies keep their dtype, so under autocast(linear_dtype) the copy computes exactly
    what `model` does (autocast casts `model`'s Linear weights to the same values, and the residual stream of both stays
    in the embeddings' dtype): a bf16 π_ref equals the fp32 policy it was copied from, at half the Linear memory."""
    with _meta_model():
        out = Transformer(model.config)
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    state = {}
    for name, t in model.state_dict().items():
        cast = linear_dtype is not None and name.rpartition(".")[0] in linear
        state[name] = t.detach().to(dtype=linear_dtype if cast else t.dtype, copy=True)
    out.load_state_dict(state, assign=True)
    if not out.learned_pos:
        out.inv_freq = model.inv_freq.clone()
    out.grad_checkpoint = model.grad_checkpoint
    return out.train(model.training)


def from_pretrained(path, device="cpu", dtype=torch.float32) -> Transformer:
    """Load a HF-layout folder (config.json + model.safetensors or a sharded index) into a Transformer."""
    cfg = read_config(path)
    files = _weight_files(path)
    handles = []
    for f in files:
        try:
            handles.append(safe_open(f, framework="pt", device="cpu"))
        except Exception as e:  # SafetensorError (truncated, not safetensors), OSError
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    where = {k: h for h in handles for k in h.keys()}
    get = lambda k: where[k].get_tensor(k)
    with _meta_model():
        model = Transformer(cfg)
    expected = model.state_dict()
    sd = from_hf_state_dict(cfg, get, set(where), expected.keys(), path)
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: tensor for {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    # copies: safetensors' tensors are views of the file's memory map, and an optimizer writing into them would keep
    # both the file's pages and their copy-on-write copies resident (about 2x the weights in RSS)
    model.load_state_dict({k: v.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
                           for k, v in sd.items()}, assign=True)
    if not model.learned_pos:
        model.inv_freq = rope_inv_freq(cfg)  # non-persistent buffer: recompute off the meta device
    return model.to(device=device)


def save_pretrained(model: Transformer, path, state_dict=None):
    """config.json + model.safetensors in HF layout (of `state_dict`, our names, when given: e.g. merged LoRA weights),
    written whole (common.files.atomic_dir); other files already in `path` (tokenizer.json, …) are kept."""
    def write(tmp):
        state = {k: v.to("cpu") for k, v in to_hf_state_dict(model, state_dict).items()}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_hf()
        cfg["torch_dtype"] = str(model.embed_tokens.weight.dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    atomic_dir(path, write)
