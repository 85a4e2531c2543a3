"""Preference oracles ("judges"): P(a ≻ b | prompt) for batches, and Bernoulli labels drawn from it.

    judge.prob(prompts, a, b)               -> (B,) float64 tensor, P(a_i ≻ b_i | prompts_i)
    judge.label(prompts, a, b, generator)   -> (B,) bool tensor, True where a_i ≻ b_i, drawn as u_i < P with
                                               u_i ~ U(0, 1) from the explicit torch.Generator (on its device)
Implementations:
    ArenaJudge(games)      text in, the games file's matrix out: P[i, j] when a and b are candidates i and j of the
                           prompt's game (exact match after strip()); 0 for invalid text against a candidate,
                           1 for a candidate against invalid text, ½ for two invalid texts (DESIGN.md, the arena)
    RewardModelJudge(dir)  a Bradley–Terry reward model, a *ForSequenceClassification folder loaded with
                           common/model.py: P = σ(r(x, a) − r(x, b)), r the score at the last token of
                           encode(prompt) + encode(answer) + [EOS] (contract 2; EOS omitted when it is the pad id)
    TabularJudge(games)    the same matrices over action indices: prompts are game ids, a and b LongTensors of
                           candidate indices (−1 = invalid, same rules as ArenaJudge); no strings involved
make_judge("arena" | "rm:DIR", games) builds one from a --judge flag.
"""
import os

import torch

from common.arena import Games, load_games
from common.policy import encode_prompt, encode_response


class Judge:
    def prob(self, prompts, a, b) -> torch.Tensor:
        raise NotImplementedError

    def label(self, prompts, a, b, generator=None) -> torch.Tensor:
        """Bernoulli(P(a ≻ b)) per row: u < P with u ~ U(0, 1) drawn from `generator`."""
        p = self.prob(prompts, a, b)
        device = generator.device if generator is not None else p.device
        u = torch.rand(p.shape, generator=generator, dtype=torch.float64, device=device)
        return (u < p.to(device=device, dtype=torch.float64)).to(p.device)


def _check_batch(prompts, a, b):
    if not (len(prompts) == len(a) == len(b)):
        raise ValueError(f"judge: prompts, a and b must have the same length, got {len(prompts)}, {len(a)}, {len(b)}")


class ArenaJudge(Judge):
    """The games file's P for any two strings (see module docstring)."""

    def __init__(self, games: Games):
        self.games = games
        self.by_prompt = {}
        for g in games:
            if g.prompt in self.by_prompt:
                raise ValueError(f"{games.path}: games {self.by_prompt[g.prompt][0].id!r} and {g.id!r} share a prompt; "
                                 f"the arena judge identifies a game by its prompt")
            self.by_prompt[g.prompt] = (g, {c.strip(): i for i, c in enumerate(g.candidates)})

    def index(self, prompt, text) -> int:
        """Candidate index of `text` in the game of `prompt` (exact match after strip()), −1 if invalid."""
        if prompt not in self.by_prompt:
            raise KeyError(f"ArenaJudge: prompt {prompt!r} is not in {self.games.path}")
        return self.by_prompt[prompt][1].get(text.strip(), -1)

    def prob(self, prompts, a, b) -> torch.Tensor:
        _check_batch(prompts, a, b)
        out = torch.empty(len(prompts), dtype=torch.float64)
        for k, (x, ya, yb) in enumerate(zip(prompts, a, b)):
            i, j = self.index(x, ya), self.index(x, yb)
            if i >= 0 and j >= 0:
                out[k] = float(self.by_prompt[x][0].P[i, j])
            else:  # invalid loses to valid, two invalid tie
                out[k] = 0.5 if i == j == -1 else float(i >= 0)
        return out


class TabularJudge(Judge):
    """P over action indices: prob(game_ids, a, b) with a, b (B,) long candidate indices, −1 = invalid."""

    def __init__(self, games: Games):
        self.games = games
        self.index = {g.id: k for k, g in enumerate(games)}
        n = max(g.n for g in games)
        # (G, n+1, n+1): column/row n is "invalid": P[i, n] = 1, P[n, i] = 0, P[n, n] = ½
        P = torch.ones(len(games), n + 1, n + 1, dtype=torch.float64)
        P[:, n, :] = 0.0
        P[:, n, n] = 0.5
        for k, g in enumerate(games):
            P[k, :g.n, :g.n] = torch.tensor(g.P)
        self.P, self.n = P, n

    def prob(self, prompts, a, b) -> torch.Tensor:
        _check_batch(prompts, a, b)
        rows = torch.tensor([self.index[p.id if hasattr(p, "id") else p] for p in prompts], dtype=torch.long)
        a = torch.as_tensor(a, dtype=torch.long).cpu()
        b = torch.as_tensor(b, dtype=torch.long).cpu()
        a = torch.where(a < 0, self.n, a)
        b = torch.where(b < 0, self.n, b)
        return self.P[rows, a, b]


class RewardModelJudge(Judge):
    """σ(r(x, a) − r(x, b)) with a *ForSequenceClassification checkpoint (num_labels = 1)."""

    def __init__(self, path, device="cpu", dtype=torch.float32, batch_size=64):
        from common.model import from_pretrained, load_tokenizer, special_token_ids
        self.model = from_pretrained(path, device=device, dtype=dtype).eval().requires_grad_(False)
        cfg = self.model.config
        if not cfg.is_reward_model or cfg.num_labels != 1:
            raise ValueError(f"{path}: not a reward model (expected a *ForSequenceClassification config.json "
                             f"with num_labels = 1)")
        self.tokenizer = load_tokenizer(path)
        ids = special_token_ids(path)
        self.eos_id, self.pad_id = ids["eos_id"], ids["pad_id"]
        if self.pad_id is None:
            self.pad_id = 0
        self.batch_size = batch_size

    def encode(self, prompt, response) -> list:
        ids = encode_prompt(self.tokenizer, prompt) + encode_response(self.tokenizer, response)
        if self.eos_id is not None and self.eos_id != self.pad_id:
            ids.append(self.eos_id)
        return ids

    @torch.no_grad()
    def score(self, prompts, responses) -> torch.Tensor:
        """(B,) float64 rewards r(x, y): the score head at the last token of each right-padded row."""
        rows = [self.encode(x, y) for x, y in zip(prompts, responses)]
        dev = self.model.embed_tokens.weight.device
        out = []
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            T = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
            attn = torch.zeros(len(chunk), T, dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = torch.tensor(r)
                attn[i, :len(r)] = 1
            out.append(self.model(ids.to(dev), attention_mask=attn.to(dev)).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def prob(self, prompts, a, b) -> torch.Tensor:
        """One reward-model pass over the distinct (prompt, response) pairs of both sides: all pairs among K
        responses (inpo.py --pairs all) cost K scores, not K(K − 1)."""
        _check_batch(prompts, a, b)
        keys = list(zip(prompts, a)) + list(zip(prompts, b))
        distinct = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        r = self.score([x for x, _ in distinct], [y for _, y in distinct])
        r = r[torch.tensor([distinct[k] for k in keys], dtype=torch.long)]
        return torch.sigmoid(r[:len(a)] - r[len(a):])


def make_judge(spec: str, games: Games = None, device="cpu") -> Judge:
    """--judge flag: "arena" (the games file's matrices; default games: data/arena) or "rm:DIR"."""
    if spec == "arena":
        return ArenaJudge(games if games is not None else load_games())
    if spec.startswith("rm:") and len(spec) > 3:
        path = spec[3:]
        if not os.path.isdir(path):
            raise ValueError(f"--judge {spec}: {path} is not a folder")
        return RewardModelJudge(path, device=device)
    raise ValueError(f"--judge {spec!r}: expected 'arena' or 'rm:DIR' (a *ForSequenceClassification folder)")
