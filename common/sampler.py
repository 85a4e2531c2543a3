"""Batched autoregressive sampling with a preallocated KV cache (gpt-fast style).

  ids, mask, logps = generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                              eos_id=None, generator=None, pad_id=None)
prompts: B non-empty token-id lists (ragged, left-padded inside). Returns, on the model's device, (B, N) each:
  ids    long     response tokens; pad_id after a row's EOS
  mask   float32  1 for every generated token up to and including the row's first EOS, 0 after
  logps  float32  log-prob of each token under the distribution it was drawn from (after temperature / top-k /
                  top-p); 0 where mask is 0, and 0 for greedy decoding (temperature == 0)
N = the longest response generated (<= max_new_tokens). eos_id: None (never stop), an int or a list. Draws come from
`generator` (on the model's device), without host syncs per token; fp32 on CPU, bf16 autocast on CUDA. Design
notes: docs/internals.md, "Sampling".
"""
import functools

import torch

from common.model import linear, pad_rows

CUDA_CHECK_EVERY = 16  # tokens between all-rows-finished checks on CUDA (each one is a host sync)


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits (B, V) -> normalized float32 log-probs (B, V) of the distribution to sample from: logits / T,
    then the top_k largest (top_k > 0), then the smallest set of most likely tokens with mass >= top_p
    (nucleus sampling, Holtzman et al. 2019); removed tokens get -inf. temperature == 0: the argmax, log-prob 0."""
    logits = logits.float()
    if temperature == 0:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)        # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs                                    # mass of more likely tokens
        remove = mass_before >= top_p                                             # the argmax is always kept
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits.log_softmax(-1)


def sample(logprobs, generator=None):
    """logprobs (B, V) -> token ids (B,) ~ softmax(logprobs), sync-free, by inversion of the CDF: one uniform
    u ~ U[0, 1) per row, and the first token whose cumulative mass exceeds u * (total mass). A removed token (p = 0)
    repeats its predecessor's cumulative mass, so it is never the first to exceed it; u < 1 gives u * total < total
    in floating point, so some token does (docs/internals.md, "Sampling")."""
    cdf = logprobs.exp().cumsum(-1)                                               # (B, V) non-decreasing
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]


def prefill(model, ids, attention_mask, position_ids, cache, lora=None):
    """Fill `cache` with the prompts ids (B, L); returns the last position's logits (B, V)."""
    h = model.hidden_states(ids, attention_mask, position_ids, cache, lora)       # (B, L, d)
    return linear(h[:, -1], model.lm_head_weight)


def decode_one_token(model, tok, attention_mask, position_ids, cache, lora=None):
    """tok (B, 1) at the cache's next slot; attention_mask (B, cache.pos + 1); returns logits (B, V)."""
    h = model.hidden_states(tok, attention_mask, position_ids, cache, lora)       # (B, 1, d)
    return linear(h[:, -1], model.lm_head_weight)


def _setup(model, prompts, max_new_tokens, eos_id, pad_id):
    """Validate; left-pad. Returns ids (B, L), mask (B, L + N) bool or None when no row is padded,
    positions (B, L + N), eos (E,), pad."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt must be a non-empty list of token ids")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    L, limit = max(len(p) for p in prompts), model.config.max_position_embeddings
    if L + max_new_tokens > limit:
        raise ValueError(f"generate: longest prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{L + max_new_tokens} exceeds the model's max_position_embeddings ({limit})")
    device = model.embed_tokens.weight.device
    B, N = len(prompts), max_new_tokens
    ids, prompt_mask = (t.to(device) for t in pad_rows(prompts, 0))
    if all(len(p) == L for p in prompts):   # no padding: no mask at all (causal prefill kernel, unmasked steps)
        mask, positions = None, torch.arange(L + N, device=device).expand(B, L + N)
    else:
        mask = torch.ones(B, L + N, dtype=torch.bool, device=device)              # generated slots: all ones
        mask[:, :L] = prompt_mask.bool()
        positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)                    # (B, L + N)
    eos = [] if eos_id is None else [int(e) for e in eos_id] if isinstance(eos_id, (list, tuple)) else [int(eos_id)]
    eos = torch.tensor(eos, dtype=torch.long, device=device)                      # (E,)
    if pad_id is None:
        pad_id = int(eos[0]) if len(eos) else 0
    return ids, mask, positions, eos, pad_id


def _decode(model, lora, cache, first_logits, L, max_new_tokens, mask, positions, eos, pad_id, sampling, generator):
    """The token loop after prefill: draw, record, stop when every row has finished, else one decode step."""
    B, device = first_logits.shape[0], first_logits.device
    out_ids = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    out_logps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    check_every = CUDA_CHECK_EVERY if device.type == "cuda" else 1
    greedy = sampling["temperature"] == 0
    logits, t = first_logits, 0
    for t in range(max_new_tokens):
        logprobs = filter_logits(logits, **sampling)                              # (B, V)
        tok = logprobs.argmax(-1) if greedy else sample(logprobs, generator)      # (B,)
        logp = logprobs.gather(-1, tok[:, None])[:, 0]
        live = ~done
        out_ids[:, t] = tok.masked_fill(done, pad_id)
        out_mask[:, t] = live.float()
        out_logps[:, t] = logp.masked_fill(done, 0.0)
        done = done | torch.isin(tok, eos)
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        S = L + t + 1
        logits = decode_one_token(model, out_ids[:, t:t + 1], None if mask is None else mask[:, :S],
                                  positions[:, S - 1:S], cache, lora)
    n = int(out_mask.sum(1).max())                                                # longest response (one sync)
    return out_ids[:, :n], out_mask[:, :n], out_logps[:, :n]


def _sampling_args(temperature, top_k, top_p):
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                         f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
    return dict(temperature=temperature, top_k=top_k, top_p=top_p)


def _inference(fn):
    """Run fn under torch.inference_mode (no autograd bookkeeping at all) and return clones, ordinary tensors that
    autograd may use later (e.g. as a batch)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return tuple(t.clone() for t in out)
    return wrapped


@_inference
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, eos_id=None,
             generator=None, pad_id=None, lora=None):
    """Sample responses to `prompts` from `model` (with LoRA adapters `lora`, if any); see the module docstring."""
    sampling = _sampling_args(temperature, top_k, top_p)
    ids, mask, positions, eos, pad_id = _setup(model, prompts, max_new_tokens, eos_id, pad_id)
    B, L = ids.shape
    cache = model.new_cache(B, L + max_new_tokens)
    first = prefill(model, ids, None if mask is None else mask[:, :L], positions[:, :L], cache, lora)
    return _decode(model, lora, cache, first, L, max_new_tokens, mask, positions, eos, pad_id, sampling, generator)
