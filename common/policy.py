"""The one policy interface of the algorithm scripts, the helpers every loop uses, and the tabular policy.

Every script's loop is written against these members, so it runs on a table (TabularPolicy, below) and on a language
model (common/lm_policy.py, LMPolicy) alike:
    sample(prompts, n, generator, temperature=1.0) -> Samples   rows = prompt 0 n times, prompt 1 n times, …
    encode(prompts, responses) -> Samples        the same for given texts (candidates, pairs from a file)
    logprobs(samples) -> (B,)                    ℓ(y|x) summed over response tokens, EOS included (LM), or log π(action)
                                                 (tabular); differentiable w.r.t. parameters()
    token_logprobs(samples) -> (B, T)            the per-token terms of that sum (T = 1 for tabular), 0 off
                                                 samples.token_mask (per-token KL credit in nash_mp.py)
    distribution(games) -> [float64 arrays]      exact, over each game's candidates (+ the invalid mass last, LM)
    frozen_copy(dtype), parameters(), save(dir), save_checkpoint(dir) / load_checkpoint(dir)
Prompts are Game objects (common/arena.py) or chat prompts (common.chat.Conversation, or a str: one user turn).
Helpers: unique_responses() (identical samples scored once), backward_in_micro_batches() (gradient accumulation over
--micro-batch rows), batched_logprobs() (frozen log-probs, --infer-batch rows at a time), copy_parameters(), adam().
"""
import contextlib
import copy
import json
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from common.arena import Game, Games
from common.chat import Conversation
from common.files import atomic_dir, read_json


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
        tensors = {f.name: getattr(self, f.name).cpu() for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        prompts = [{"messages": [list(m) for m in p.messages]} if isinstance(p, Conversation) else p
                   for p in self.prompts]
        return tensors, {"prompts": prompts, "texts": list(self.texts), "game_ids": list(self.game_ids)}

    @classmethod
    def from_state(cls, tensors, lists, device="cpu") -> "Samples":
        """The inverse of to_state(), with the tensors where sampling puts them: actions on the CPU, an LM's token
        tensors on `device` (the policy's)."""
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
    sample() returns them); rows are identical when they have the same prompt and response tokens (or action).
    Returns rows (U,), the first row of each distinct response, and counts (U,), how many rows it stands for: a sum
    over the rows of a function of (prompt, response) is the sum over `rows` weighted by `counts`."""
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
    """loss.backward() for loss, aux = loss_fn(logps), logps = policy.logprobs(samples) (B,) or token_logprobs (B, T)
    with per_token, holding at most `micro_batch` rows in the autograd graph (`samples` may be a tuple of Samples:
    loss_fn then takes one logps each). Beyond micro_batch rows, two passes: logps of every row under no_grad give
    g = dloss/dlogps on leaf copies, then each micro-batch's logps again with autograd, backward(g[rows]); the sum
    Σ_rows g_r ∇logp_r equals the one-pass gradient (tests/test_micro_batch.py), as long as loss_fn depends on the
    parameters only through logps. autocast: a context-manager factory around each forward. Returns (loss, aux)."""
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


@torch.no_grad()
def copy_parameters(dst, src):
    """The trained parameters of `src` (a frozen_copy of `dst`: a table, a model, or LoRA adapters) into `dst`."""
    for p, q in zip(dst.parameters(), src.parameters(), strict=True):
        p.copy_(q)


def adam(policy, lr):
    """Adam over the policy's trained parameters, one tensor at a time (foreach=False): the same values as torch's
    default multi-tensor step, bit for bit, without its temporaries the size of all the parameters (peak memory)."""
    return torch.optim.Adam(policy.parameters(), lr=lr, foreach=False)


def batched_logprobs(policy, samples, batch_size=None, per_token=False):
    """ℓ(y|x) (B,) of every row of `samples` under a frozen policy, or its per-token terms (B, T) with per_token, on
    the CPU, no grad, batch_size rows at a time (--infer-batch; None: 256)."""
    batch_size = batch_size or 256
    fn = policy.token_logprobs if per_token else policy.logprobs
    out = []
    with torch.no_grad():
        for s in range(0, len(samples), batch_size):
            rows = torch.arange(s, min(s + batch_size, len(samples)))
            out.append(fn(samples.select(rows)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


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

    def frozen_copy(self, dtype=None, adapters=True) -> "TabularPolicy":
        """A copy with no grad (dtype, adapters: LMPolicy's interface; a table stays float64 and has no adapters)."""
        return copy.deepcopy(self).requires_grad_(False)

    def matrices(self, games) -> torch.Tensor:
        """(G, n_max, n_max) float64 on theta's device: the P of each game in `games` at its row of theta,
        zero-padded; every other row is 0, so exact expectations over a subset (the training split) weight the
        other games 0."""
        P = torch.zeros(self.theta.shape + self.theta.shape[-1:], dtype=torch.float64)
        for g in games:
            P[self.index[g.id], :g.n, :g.n] = torch.tensor(g.P, dtype=torch.float64)
        return P.to(self.theta.device)

    def minimize(self, loss_fn, steps):
        """The exact (tabular) losses' minimizer: `steps` L-BFGS steps (each up to 200 iterations, strong Wolfe line
        search) on loss_fn() of the float64 logits. Returns the loss after each step (a list of 0-dim tensors) and
        max |∇| at the point reached."""
        opt = torch.optim.LBFGS(self.parameters(), lr=1, max_iter=200, tolerance_grad=1e-13, tolerance_change=1e-16,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        losses = []
        for _ in range(steps):
            opt.step(closure)
            losses.append(closure().detach())   # the loss at the point reached (step() returns the starting one)
        return losses, self.theta.grad.abs().max()

    def save(self, path):
        """`path`/policy.json: {"<game id>": [probabilities over candidates]}."""
        dist = self.distribution(self.games)
        obj = {g.id: p.tolist() for g, p in zip(self.games, dist)}

        def write(tmp):
            with open(os.path.join(tmp, "policy.json"), "w") as f:
                json.dump(obj, f)
        atomic_dir(path, write)

    def save_checkpoint(self, path):
        """The exact float64 logits (theta.safetensors; a resumed run continues bitwise) and policy.json."""
        os.makedirs(path, exist_ok=True)
        save_file({"theta": self.theta.detach().cpu().contiguous()}, os.path.join(path, "theta.safetensors"))
        self.save(path)

    def load_checkpoint(self, path):
        with torch.no_grad():
            self.theta.copy_(load_file(os.path.join(path, "theta.safetensors"))["theta"])

    @classmethod
    def load(cls, path, games: Games) -> "TabularPolicy":
        """From a policy.json (or a folder holding one); every game of `games` must be present."""
        f = os.path.join(path, "policy.json") if os.path.isdir(path) else path
        obj = read_json(f)
        if obj is None:
            raise FileNotFoundError(f"{f}: not found")
        probs = []
        for g in games:
            p = obj.get(g.id) if isinstance(obj, dict) else None
            if not isinstance(p, list) or len(p) != g.n or not all(isinstance(x, (int, float)) and x > 0 for x in p):
                raise ValueError(f"{f}: game {g.id!r}: expected {g.n} positive probabilities")
            probs.append(p)
        return cls(games, probs)
