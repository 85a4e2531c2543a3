"""The one policy interface of the algorithm scripts: a tabular policy and a language-model policy.

An algorithm's loop is the same for both (DESIGN.md "One policy interface, three worlds"):

    ref = policy.frozen_copy()                                   # π_ref (no grad)
    for t in range(T):
        pi_t = policy                                            # π_t: sampled and scored before the first update
        y = pi_t.sample(prompts, n=K, generator=gen)             # Samples, B = len(prompts) * K rows
        a, b = y.select(idx_a), y.select(idx_b)                  # pairs, row-aligned
        label = judge.label(a.prompts, a.texts, b.texts, gen)    # or judge.prob(...)
        with torch.no_grad(): ref_logps, t_logps = ref.logprobs(a), pi_t.logprobs(a)
        policy_logps = policy.logprobs(a)                        # (B,) differentiable sums ℓ_θ
        ... loss, optimizer over policy.parameters() ...
        metrics = arena.evaluate(policy, games, ref)             # exact, common/arena.py
    policy.save(run_dir)

Members (both classes):
    sample(prompts, n, generator, temperature=1.0, ...) -> Samples   rows = prompt 0 n times, prompt 1 n times, …
    encode(prompts, responses) -> Samples        the same for given texts (pairs from a file, candidates)
    logprobs(samples) -> (B,) float32            ℓ(y|x) summed over response tokens, EOS included (LM) or
                                                 log π(action) (tabular); differentiable w.r.t. parameters()
    token_logprobs(samples) -> (B, T)            the per-token terms of that sum (T = 1 for tabular), 0 off
                                                 samples.token_mask (per-token KL credit in nash_mp.py)
    distribution(games) -> list of float64 arrays, exact: over each game's candidates (tabular), + the
                                                 invalid mass as a last entry (LM)
    frozen_copy(dtype), parameters(), save(dir), load(...), save_checkpoint(dir) / load_checkpoint(dir)
Prompts are Game objects (common/arena.py), or for the LM chat prompts (common.chat.Conversation, or a str: one user
turn; real-checkpoint runs); for the tabular policy a string is a game id. backward_in_micro_batches() accumulates
the gradient of a loss of log-probs over micro-batches of rows (--micro-batch).
"""
import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn

from common.arena import Game, Games


@dataclass
class Samples:
    """A batch of B responses (one row each) and what log-probs and judges need."""
    prompts: list           # (B,) prompts as a judge reads them: a Game's text, or a chat prompt (Conversation / str)
    texts: list             # (B,) response texts, EOS removed (what a text judge reads)
    game_ids: list          # (B,) id of the row's game, None for a plain-text prompt
    actions: torch.Tensor   # (B,) long: index of the response among its game's candidates, -1 = not a candidate
    input_ids: torch.Tensor = None       # LM: (B, T) left-padded prompt + response (+ EOS) + right pad
    attention_mask: torch.Tensor = None  # LM: (B, T) 1 on prompt and response tokens
    response_mask: torch.Tensor = None   # LM: (B, T) 1 on response tokens, EOS included

    def __len__(self):
        return len(self.texts)

    @property
    def token_mask(self) -> torch.Tensor:
        """(B, T) 1 on the positions token_logprobs() scores: response tokens (LM), the one action (tabular)."""
        if self.response_mask is not None:
            return self.response_mask
        return torch.ones(len(self), 1, dtype=torch.long)

    def to_state(self):
        """(tensors, lists): the rows as CPU tensors (safetensors) and JSON-able lists, for a checkpoint; a
        Conversation prompt becomes {"messages": [[role, content], …]}."""
        from common.chat import Conversation
        tensors = {f.name: getattr(self, f.name).cpu() for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        prompts = [{"messages": [list(m) for m in p.messages]} if isinstance(p, Conversation) else p
                   for p in self.prompts]
        return tensors, {"prompts": prompts, "texts": list(self.texts), "game_ids": list(self.game_ids)}

    @classmethod
    def from_state(cls, tensors, lists, device="cpu") -> "Samples":
        """The inverse of to_state(), with the tensors where sampling puts them: actions on the CPU, an LM's token
        tensors on `device` (the policy's)."""
        from common.chat import Conversation
        prompts = [Conversation(tuple(tuple(m) for m in p["messages"])) if isinstance(p, dict) else p
                   for p in lists["prompts"]]
        tensors = {k: v if k == "actions" else v.to(device) for k, v in tensors.items()}
        return cls(prompts=prompts, texts=lists["texts"], game_ids=lists["game_ids"], **tensors)

    def select(self, index) -> "Samples":
        """Rows `index` (a LongTensor or list of ints), in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index.tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif isinstance(v, torch.Tensor):
                out[f.name] = v[index.to(v.device)]
            else:
                out[f.name] = [v[i] for i in rows]
        return Samples(**out)


def unique_responses(samples: Samples, group_size: int):
    """Identical responses of a prompt, scored once: `samples` holds group_size consecutive rows per prompt (as
    sample(prompts, n=group_size) returns them). Two rows are identical when they belong to the same prompt and have
    the same response tokens (LM; EOS included) or the same action (tabular).

    Returns rows (U,) long, the first row of each distinct response in order of appearance, and counts (U,) long,
    how many of its prompt's group_size rows it stands for (counts of a prompt sum to group_size). Any sum over the
    rows of a function of (prompt, response) equals the sum over `rows` weighted by `counts`."""
    if group_size < 1 or len(samples) % group_size:
        raise ValueError(f"unique_responses: {len(samples)} rows are not groups of {group_size}")
    if samples.response_mask is not None:
        ids, mask = samples.input_ids.cpu().tolist(), samples.response_mask.bool().cpu().tolist()
        keys = [tuple(t for t, m in zip(i, r) if m) for i, r in zip(ids, mask)]
    else:
        keys = samples.actions.tolist()
    first, rows, counts = {}, [], []
    for r, key in enumerate(keys):
        k = (r // group_size, key)
        if k not in first:
            first[k] = len(rows)
            rows.append(r)
            counts.append(0)
        counts[first[k]] += 1
    return torch.tensor(rows, dtype=torch.long), torch.tensor(counts, dtype=torch.long)


def backward_in_micro_batches(policy, samples, loss_fn, micro_batch=None, per_token=False, autocast=None):
    """loss.backward() for loss, aux = loss_fn(logps) with logps = policy.logprobs(samples) (B,), or
    policy.token_logprobs(samples) (B, T) when per_token, holding at most `micro_batch` rows in the autograd graph.
    `samples` may be a tuple of Samples: then loss_fn takes one logps per element (e.g. tanpo.py's pairs and bonus).

    micro_batch None or ≥ the rows of all the sets: one pass, loss_fn on the differentiable logps. Otherwise two passes
    (gradient accumulation for losses that couple rows, e.g. a pair's winner and loser, or a baseline over a prompt's
    samples):
      1. logps of every row under no_grad, micro_batch rows at a time; loss_fn on leaf copies of them gives
         g = dloss/dlogps, (B,) or (B, T);
      2. for each micro-batch, logps again with autograd and backward(g[rows]): Σ_rows g_r ∇logp_r = ∇loss.
    The accumulated gradient equals the one-pass gradient up to float rounding, provided loss_fn depends on the
    parameters only through logps (anything it computes from logps.detach() counts as a constant, as in one pass).
    Costs one more forward without grad. autocast: a context-manager factory wrapped around each forward.
    Returns (loss detached, aux)."""
    import contextlib
    ctx = autocast or contextlib.nullcontext
    fn = policy.token_logprobs if per_token else policy.logprobs
    sets = samples if isinstance(samples, tuple) else (samples,)
    if micro_batch is None or sum(len(s) for s in sets) <= micro_batch:
        with ctx():
            lps = [fn(s) for s in sets]
        loss, aux = loss_fn(*lps)
        loss.backward()
        return loss.detach(), aux
    chunks = [[torch.arange(i, min(i + micro_batch, len(s))) for i in range(0, len(s), micro_batch)] for s in sets]
    with torch.no_grad(), ctx():
        leaves = [torch.cat([fn(s.select(r)) for r in rs]).requires_grad_(True) for s, rs in zip(sets, chunks)]
    loss, aux = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    for s, rs, g in zip(sets, chunks, grads):
        for r in rs:
            with ctx():
                lp = fn(s.select(r))
            lp.backward(g[r.to(g.device)].to(lp.dtype))
    return loss.detach(), aux


def _atomic_dir(path, write):
    """Call write(tmp_dir), then move its files into `path`: the folder is renamed into place when `path`
    does not exist, else each file is renamed over (other files, e.g. a run's metrics.jsonl, are kept).
    Nothing is ever half-written."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_policy_", dir=os.path.dirname(path))
    try:
        write(tmp)
        if os.path.isdir(path):
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
            os.rmdir(tmp)
        else:
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- tabular -----------------------------------------------------------------------------------------

class TabularPolicy(nn.Module):
    """π_θ(y_i | game g) = softmax(theta[g])[i]: one logit row per game over its candidates.

    theta (G, n_max) is one Parameter; entries past a game's n candidates are masked to −inf.
    Initialized at log `probs` (default each game's ref, i.e. π_ref of the games file)."""

    def __init__(self, games: Games, probs=None):
        super().__init__()
        self.games = games
        self.index = {g.id: k for k, g in enumerate(games)}
        n_max = max(g.n for g in games)
        theta = torch.zeros(len(games), n_max, dtype=torch.float64)
        mask = torch.zeros(len(games), n_max, dtype=torch.bool)
        for k, g in enumerate(games):
            p = g.ref if probs is None else np.asarray(probs[k], dtype=np.float64)
            if p.shape != (g.n,) or not np.all(p > 0):
                raise ValueError(f"game {g.id!r}: initial probabilities must be {g.n} positive numbers")
            theta[k, :g.n] = torch.from_numpy(np.log(p / p.sum()))
            mask[k, :g.n] = True
        self.theta = nn.Parameter(theta)   # float64: exact closed-form checks in the algorithm tests
        self.register_buffer("valid", mask)

    def log_probs(self) -> torch.Tensor:
        """(G, n_max) log π_θ, −inf on padding."""
        return torch.log_softmax(self.theta.masked_fill(~self.valid, float("-inf")), dim=-1)

    def _rows(self, prompts):
        ids = [p.id if isinstance(p, Game) else p for p in prompts]
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise KeyError(f"TabularPolicy: unknown game id {missing[0]!r} (prompts are Games or game ids)")
        return [self.index[i] for i in ids]

    @torch.no_grad()
    def sample(self, prompts, n, generator=None, temperature=1.0) -> Samples:
        """n draws per prompt from π_θ^{1/temperature} (renormalized)."""
        rows = torch.tensor(self._rows(prompts), dtype=torch.long).repeat_interleave(n)   # (B,)
        logp = self.log_probs()[rows.to(self.theta.device)] / temperature                 # (B, n_max)
        u = torch.rand(logp.shape, generator=generator, dtype=torch.float64, device=self.theta.device)
        actions = (logp - (-u.clamp_min(1e-300).log()).log()).argmax(-1)                 # Gumbel-max
        return self._samples(rows.tolist(), actions.cpu())

    def _samples(self, rows, actions):
        gs = [self.games[r] for r in rows]
        return Samples(prompts=[g.prompt for g in gs], texts=[g.candidates[a] for g, a in zip(gs, actions.tolist())],
                       game_ids=[g.id for g in gs], actions=actions)

    def encode(self, prompts, responses) -> Samples:
        """Samples for given (prompt, candidate text) pairs; a text that is not a candidate raises."""
        rows = self._rows(prompts)
        acts = []
        for r, text in zip(rows, responses):
            g = self.games[r]
            stripped = [c.strip() for c in g.candidates]
            if text.strip() not in stripped:
                raise ValueError(f"game {g.id!r}: {text!r} is not a candidate (a tabular policy has no invalid text)")
            acts.append(stripped.index(text.strip()))
        return self._samples(rows, torch.tensor(acts, dtype=torch.long))

    def logprobs(self, samples: Samples) -> torch.Tensor:
        """(B,) log π_θ(action | game), differentiable w.r.t. theta (float64)."""
        rows = torch.tensor(self._rows(samples.game_ids), device=self.theta.device)
        return self.log_probs()[rows, samples.actions.to(self.theta.device)]

    def token_logprobs(self, samples: Samples) -> torch.Tensor:
        """(B, 1): a tabular response is a single "token", its action (see Samples.token_mask)."""
        return self.logprobs(samples)[:, None]

    @torch.no_grad()
    def distribution(self, games: Games) -> list:
        """Exact π_θ over each game's candidates (float64 numpy), for the games given (ids looked up)."""
        lp = self.log_probs().cpu()
        return [lp[self.index[g.id], :g.n].exp().numpy().astype(np.float64) for g in games]

    def frozen_copy(self, dtype=None) -> "TabularPolicy":
        """A copy with no grad (dtype: accepted for LMPolicy's interface; a table stays float64)."""
        return copy.deepcopy(self).requires_grad_(False)

    def matrices(self, games) -> torch.Tensor:
        """(G, n_max, n_max) float64 on theta's device: the P of each game in `games` at its row of theta,
        zero-padded; every other row is 0, so exact expectations over a subset (the training split) weight the
        other games 0."""
        P = torch.zeros(self.theta.shape + self.theta.shape[-1:], dtype=torch.float64)
        for g in games:
            P[self.index[g.id], :g.n, :g.n] = torch.tensor(g.P, dtype=torch.float64)
        return P.to(self.theta.device)

    def save(self, path):
        """`path`/policy.json: {"<game id>": [probabilities over candidates]} (contract 3)."""
        dist = self.distribution(self.games)
        obj = {g.id: p.tolist() for g, p in zip(self.games, dist)}

        def write(tmp):
            with open(os.path.join(tmp, "policy.json"), "w") as f:
                json.dump(obj, f)
        _atomic_dir(path, write)

    def save_checkpoint(self, path):
        """The exact float64 logits (theta.safetensors; a resumed run continues bitwise) and policy.json."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        save_file({"theta": self.theta.detach().cpu().contiguous()}, os.path.join(path, "theta.safetensors"))
        self.save(path)

    def load_checkpoint(self, path):
        from safetensors.torch import load_file
        with torch.no_grad():
            self.theta.copy_(load_file(os.path.join(path, "theta.safetensors"))["theta"])

    @classmethod
    def load(cls, path, games: Games) -> "TabularPolicy":
        """From a policy.json (or a folder holding one); every game of `games` must be present."""
        f = os.path.join(path, "policy.json") if os.path.isdir(path) else path
        try:
            with open(f) as fh:
                obj = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"{f}: not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
        probs = []
        for g in games:
            p = obj.get(g.id) if isinstance(obj, dict) else None
            if not isinstance(p, list) or len(p) != g.n or not all(isinstance(x, (int, float)) and x > 0 for x in p):
                raise ValueError(f"{f}: game {g.id!r}: expected {g.n} positive probabilities")
            probs.append(p)
        return cls(games, probs)


# ---- language model ----------------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt: str) -> list:
    """Contract 2: the prompt with the tokenizer's own special tokens (e.g. a BOS from its post-processor)."""
    return tokenizer.encode(prompt).ids


def encode_response(tokenizer, response: str) -> list:
    """Contract 2: the answer tokenized on its own, no special tokens (EOS is appended by the caller)."""
    return tokenizer.encode(response, add_special_tokens=False).ids


def pack(prompt_ids, response_ids, pad_id):
    """Left-pad prompts, right-pad responses: input_ids, attention_mask, response_mask, all (B, T) long.
    prompt_ids, response_ids: lists of B token-id lists (responses already end with EOS where they have one)."""
    L = max(len(p) for p in prompt_ids)
    N = max(len(r) for r in response_ids)
    B = len(prompt_ids)
    ids = torch.full((B, L + N), pad_id, dtype=torch.long)
    attn = torch.zeros(B, L + N, dtype=torch.long)
    resp = torch.zeros(B, L + N, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, L - len(p):L] = torch.tensor(p, dtype=torch.long)
        ids[i, L:L + len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, L - len(p):L + len(r)] = 1
        resp[i, L:L + len(r)] = 1
    return ids, attn, resp


AUX_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


class LMPolicy(nn.Module):
    """A causal LM (common/model.py Transformer) + its tokenizer and chat template. ℓ(y|x) = Σ log π(token) over the
    answer tokens and EOS of prompt ids + encode(answer) + [EOS] (contract 2).

    Prompt ids: a Game (the arena) is encode(prompt), raw, exactly as contract 2 says. A chat prompt (a Conversation
    or a str, one user turn; common/chat.py) is rendered with the checkpoint's chat template and
    add_generation_prompt=True, then tokenized without special tokens; without a template it is its raw text.
    EOS: eos_ids holds every EOS id the checkpoint lists and the template's end-of-turn token; any of them ends a
    sampled response and is scored as part of it. eos_id, the one encode() appends, is the end-of-turn token when the
    template has one, else config.json's EOS."""
    BUCKET_ROWS = 128  # rows per length bucket of logprobs() (see _scored)

    def __init__(self, model, tokenizer, eos_id, pad_id=None, max_new_tokens=32, eos_ids=None, chat_template=None,
                 files=None, generation_config=None, prompt_cache=None):
        super().__init__()
        if eos_id is None:
            raise ValueError("LMPolicy needs an EOS id (config.json eos_token_id)")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.eos_ids = list(dict.fromkeys([eos_id] + list(eos_ids or [])))
        self.pad_id = eos_id if pad_id is None else pad_id
        self.max_new_tokens = max_new_tokens
        self.chat_template = chat_template          # common.chat.ChatTemplate or None (prompts stay raw)
        self.files = dict(files or {})              # name -> bytes, copied by save(): tokenizer_config.json, template…
        self.generation_config = dict(generation_config or {})   # the checkpoint's, rewritten by save()
        self.infer_batch = None   # rows per generate() call and per no-grad pass (None: all at once; set by the world)
        self._cand_cache = {}
        self._prompt_cache = {} if prompt_cache is None else prompt_cache

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32, max_new_tokens=None, chat_template="auto") -> "LMPolicy":
        """From a HF-layout folder. chat_template: "auto" (the folder's own, None when it has none), "none" (raw
        prompts), or the path of a .jinja file (it is also what save() writes as chat_template.jinja)."""
        from common.chat import ChatTemplate
        from common.model import from_pretrained, load_tokenizer, special_token_ids
        model = from_pretrained(path, device=device, dtype=dtype)
        tokenizer = load_tokenizer(path)
        ids = special_token_ids(path)
        files = {}
        for name in AUX_FILES:
            f = os.path.join(path, name)
            if os.path.isfile(f):
                with open(f, "rb") as fh:
                    files[name] = fh.read()
        if chat_template == "auto":
            template = ChatTemplate.load(path)
        elif chat_template == "none":
            template = None
        else:
            template = ChatTemplate.load(path, jinja_file=chat_template)
            files["chat_template.jinja"] = template.source.encode("utf-8")
        gc = os.path.join(path, "generation_config.json")
        generation_config = {}
        if os.path.isfile(gc):
            with open(gc) as f:
                try:
                    generation_config = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{gc}: not valid JSON ({e})") from None
        if max_new_tokens is None:
            max_new_tokens = generation_config.get("max_new_tokens") or 32
        eos_id, eos_ids = ids["eos_id"], ids["eos_ids"]
        end_of_turn = template.end_of_turn(tokenizer) if template is not None else None
        if end_of_turn is not None:
            eos_id, eos_ids = end_of_turn, [end_of_turn] + eos_ids
        return cls(model, tokenizer, eos_id, ids["pad_id"], max_new_tokens, eos_ids, template, files,
                   generation_config)

    @property
    def device(self):
        return self.model.lm_head_weight.device

    @staticmethod
    def _texts(prompts):
        """What a judge reads as the prompt: a Game's text; a chat prompt as it is (str or Conversation)."""
        return [p.prompt if isinstance(p, Game) else p for p in prompts]

    def prompt_ids(self, prompt) -> list:
        """Token ids of one prompt (class docstring), cached per distinct prompt."""
        from common.chat import ChatError, conversation
        key = ("game", prompt.id, prompt.prompt) if isinstance(prompt, Game) else conversation(prompt)
        ids = self._prompt_cache.get(key)
        if ids is None:
            if isinstance(prompt, Game):
                ids = encode_prompt(self.tokenizer, prompt.prompt)
            elif self.chat_template is not None:
                ids = self.chat_template.encode(self.tokenizer, key.as_dicts(), add_generation_prompt=True)
            elif len(key.messages) > 1:
                raise ChatError(f"a multi-turn prompt ({str(key)[:60]!r}) needs a chat template: the model has "
                                f"none, or --chat-template none was given")
            else:
                ids = encode_prompt(self.tokenizer, key.text)
            if len(ids) == 0:
                raise ValueError("LMPolicy: a prompt encodes to zero tokens (nothing to condition on)")
            self._prompt_cache[key] = ids
        return ids

    def _encode_prompts(self, prompts):
        return [self.prompt_ids(p) for p in prompts]

    def check_prompts(self, prompts):
        """Encode every prompt once (a template that fails to render raises here, before a run starts) and check
        that the longest one leaves room for max_new_tokens."""
        limit = self.model.config.max_position_embeddings
        longest = max(len(self.prompt_ids(p)) for p in prompts)
        if longest + self.max_new_tokens > limit:
            raise ValueError(f"a prompt of {longest} tokens + --max-new-tokens {self.max_new_tokens} exceeds the "
                             f"model's max_position_embeddings ({limit})")

    def _candidate_tokens(self, game) -> dict:
        """{tuple(encode(c_i) + [EOS]): i} for a game, cached."""
        key = (game.id, game.candidates)
        if key not in self._cand_cache:
            self._cand_cache[key] = {tuple(encode_response(self.tokenizer, c) + [self.eos_id]): i
                                     for i, c in enumerate(game.candidates)}
        return self._cand_cache[key]

    def _samples(self, prompts, prompt_ids, response_ids, texts):
        ids, attn, resp = pack(prompt_ids, response_ids, self.pad_id)
        game_ids, actions = [], []
        for p, r in zip(prompts, response_ids):  # a row is candidate i iff its tokens are encode(c_i) + [EOS]
            game_ids.append(p.id if isinstance(p, Game) else None)
            actions.append(self._candidate_tokens(p).get(tuple(r), -1) if isinstance(p, Game) else -1)
        dev = self.device
        return Samples(prompts=self._texts(prompts), texts=texts, game_ids=game_ids,
                       actions=torch.tensor(actions, dtype=torch.long), input_ids=ids.to(dev),
                       attention_mask=attn.to(dev), response_mask=resp.to(dev))

    @torch.no_grad()
    def sample(self, prompts, n, generator=None, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=None) -> Samples:
        """n responses per prompt with common/sampler.py (rows: prompt 0 n times, then prompt 1, …)."""
        from common.sampler import generate
        prompts = [p for p in prompts for _ in range(n)]
        prompt_ids = self._encode_prompts(prompts)
        chunk = self.infer_batch or len(prompts)
        response_ids = []
        for s in range(0, len(prompts), chunk):     # infer_batch rows per call bounds the KV cache and the logits
            out, mask, _ = generate(self.model, prompt_ids[s:s + chunk], max_new_tokens or self.max_new_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k, eos_id=self.eos_ids,
                                    generator=generator, pad_id=self.pad_id)
            lengths = mask.sum(1).long().tolist()
            response_ids += [row[:k] for row, k in zip(out.tolist(), lengths)]  # EOS kept where generated
        eos = set(self.eos_ids)
        texts = [self.tokenizer.decode([t for t in r if t not in eos]) for r in response_ids]
        return self._samples(prompts, prompt_ids, response_ids, texts)   # generate() emits ≥ 1 token per row

    def encode(self, prompts, responses) -> Samples:
        """Samples for given texts: encode(prompt) + encode(response) + [EOS] (contract 2)."""
        prompt_ids = self._encode_prompts(prompts)
        response_ids = [encode_response(self.tokenizer, r) + [self.eos_id] for r in responses]
        return self._samples(list(prompts), prompt_ids, response_ids, list(responses))

    def _scored(self, samples: Samples):
        """(token log-probs (B, T), sums (B,)) of samples' response tokens, by common/losses.py, in length buckets.

        The rows are sorted by (prompt length, response length) and cut into chunks of BUCKET_ROWS; each chunk keeps
        only the columns some row of it attends to. A random batch of arena samples is ~40% padding (a 13-token
        response makes every row 13 long); the buckets skip most of it: forward + backward of 576 arena
        samples took 1.89 s instead of 2.97 s on one CPU thread. Results equal one padded pass up to float
        rounding (~4e-6 on sums), since padding is masked either way; they are bitwise reproducible."""
        from common.losses import sequence_logprobs
        dev = self.device
        ids, attn, resp = (x.to(dev) for x in (samples.input_ids, samples.attention_mask, samples.response_mask))
        B, T = ids.shape
        if B <= self.BUCKET_ROWS:
            return sequence_logprobs(self.model, ids, attn, resp)
        on = attn.bool()
        pos = torch.arange(T, device=dev)
        first = torch.where(on, pos, T).min(1).values.cpu()                      # first attended column per row
        last = torch.where(on, pos, -1).max(1).values.cpu()                      # last attended column per row
        order = torch.argsort(((attn - resp).sum(1) * (T + 1) + resp.sum(1)).cpu(), stable=True)
        tok, tot = [], []
        for s in range(0, B, self.BUCKET_ROWS):
            r = order[s:s + self.BUCKET_ROWS]
            c0, c1 = int(first[r].min()), int(last[r].max()) + 1
            rd = r.to(dev)
            t_lp, s_lp = sequence_logprobs(self.model, ids[rd, c0:c1], attn[rd, c0:c1], resp[rd, c0:c1])
            tok.append(torch.nn.functional.pad(t_lp, (c0, T - c1)))
            tot.append(s_lp)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(B)
        inverse = inverse.to(dev)
        return torch.cat(tok)[inverse], torch.cat(tot)[inverse]

    def logprobs(self, samples: Samples) -> torch.Tensor:
        """(B,) ℓ(y|x): summed log-probs of the response tokens (EOS included), common/losses.py."""
        return self._scored(samples)[1]

    def token_logprobs(self, samples: Samples) -> torch.Tensor:
        """(B, T) per-token log-probs of the response tokens (EOS included), 0 elsewhere (Samples.token_mask)."""
        return self._scored(samples)[0]

    @torch.no_grad()
    def distribution(self, games: Games, batch_size=256) -> list:
        """Exact π over each game's candidates + the invalid mass 1 − Σ (last entry), float64.

        π(y_i|x) = exp ℓ(encode(c_i) + [EOS] | x): every other token sequence — another tokenization of a
        candidate's text included — counts as invalid. Log-probs are float32 sums (losses.sequence_logprobs),
        so entries carry ~1e-7 relative error and the invalid mass ~1e-7 absolute; it is clipped at 0."""
        pairs = [(k, g, c) for k, g in enumerate(games) for c in g.candidates]
        logps = []
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            logps.append(self.logprobs(self.encode([g for _, g, _ in chunk], [c for _, _, c in chunk])).double().cpu())
        p = torch.cat(logps).exp().numpy()
        out, i = [], 0
        for g in games:
            q = p[i:i + g.n]
            i += g.n
            out.append(np.append(q, max(0.0, 1.0 - q.sum())))
        return out

    def response_stats(self, samples: Samples) -> dict:
        """Of sampled responses: mean length in tokens (EOS not counted), the fraction truncated (max_new_tokens reached
        without an EOS) and the fraction empty (no visible text)."""
        resp = samples.response_mask.bool().cpu()
        lengths = resp.sum(1)                                             # (B,) EOS included where generated
        start = int(resp.any(0).int().argmax())                           # responses start at one column (pack)
        last = samples.input_ids.cpu()[torch.arange(len(samples)), start + lengths - 1]
        ended = torch.isin(last, torch.tensor(self.eos_ids))
        return {"len": float((lengths - ended.long()).double().mean()),
                "truncated": float((~ended).double().mean()),
                "empty": sum(not t.strip() for t in samples.texts) / len(samples)}

    def frozen_copy(self, dtype=None) -> "LMPolicy":
        """A copy of the model (no grad, eval mode) sharing the tokenizer and template: π_ref, an anchor. dtype: the
        copy's Linear weights in it (common.model.copy_model: bf16 on CUDA, where it computes under autocast exactly
        what the fp32 policy does, with half the Linear memory; the trained policy keeps fp32 master weights)."""
        from common.model import copy_model
        model = copy_model(self.model, dtype).requires_grad_(False).eval()
        out = LMPolicy(model, self.tokenizer, self.eos_id, self.pad_id, self.max_new_tokens, self.eos_ids,
                       self.chat_template, self.files, self.generation_config, self._prompt_cache)
        out.infer_batch = self.infer_batch
        return out

    def save_checkpoint(self, path):
        """A run's checkpoint of the policy: save(path), the complete HF folder (fp32 weights: exact)."""
        self.save(path)

    def load_checkpoint(self, path):
        """The weights of a save_checkpoint() folder into this policy's model (same architecture, device, dtype)."""
        from common.model import from_pretrained
        p = self.model.lm_head_weight
        with torch.no_grad():
            self.model.load_state_dict(from_pretrained(path, device=p.device, dtype=p.dtype).state_dict())

    def save(self, path):
        """A complete HF-layout checkpoint, written to a temporary folder and renamed into place: config.json +
        model.safetensors (common/model.py), tokenizer.json, the input folder's tokenizer_config.json and chat
        template files (a minimal tokenizer_config.json when it had none), and its generation_config.json with
        eos_token_id = every EOS id (end-of-turn included). transformers' AutoTokenizer / AutoModelForCausalLM load
        it and apply_chat_template works on it."""
        def write(tmp):
            self.model.save_pretrained(tmp)
            self.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            files = dict(self.files)
            if "tokenizer_config.json" not in files:
                tok = {"tokenizer_class": "PreTrainedTokenizerFast",
                       "eos_token": self.tokenizer.id_to_token(self.eos_id),
                       "pad_token": self.tokenizer.id_to_token(self.pad_id)}
                files["tokenizer_config.json"] = json.dumps(tok, indent=2).encode()
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            gc = dict(self.generation_config)
            gc.update(eos_token_id=self.eos_ids if len(self.eos_ids) > 1 else self.eos_id, pad_token_id=self.pad_id)
            if not self.generation_config:
                gc["max_new_tokens"] = self.max_new_tokens
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(gc, f, indent=2)
        _atomic_dir(path, write)
