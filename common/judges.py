"""Preference oracles ("judges"): P(a ≻ b | prompt) for batches, and Bernoulli labels drawn from it.

    judge.prob(prompts, a, b)               -> (B,) float64 tensor, P(a_i ≻ b_i | prompts_i)
    judge.label(prompts, a, b, generator)   -> (B,) bool tensor, u_i < P with u_i ~ U(0, 1) from the generator
    judge.check(prompts)                    raises before a run starts if the judge cannot read a prompt
A prompt is a Game's text (str, the arena) or a chat prompt (common.chat.Conversation; a str is one user turn).
make_judge(--judge flag) builds one of: ArenaJudge (the games' matrices), RewardModelJudge (rm:DIR, Bradley–Terry),
PairJudge (pair:DIR, a causal LM comparing two responses) and PyJudge (py:FILE.py:NAME, the user's function, which may
declare a CategoryGame over response classes). docs/internals.md, "Judges".
"""
import importlib.util
import os

import numpy as np
import torch

from common.arena import Games, equilibrium, kl, load_games, with_invalid
from common.chat import (ChatTemplate, Conversation, conversation, encode_prompt, encode_response, load_tokenizer,
                         one_line, special_token_ids)
from common.model import from_pretrained, pad_rows


class JudgeError(ValueError):
    """A judge that cannot be built or that answered wrongly: one line naming the judge and what was wrong."""


class Judge:
    def prob(self, prompts, a, b) -> torch.Tensor:
        raise NotImplementedError

    def check(self, prompts):
        """Called once before a run starts, on the run's prompts (one prompt or a list): a judge that cannot answer
        fails here, before any file is written. The default asks for one pair on the first prompt; a model judge also
        renders every prompt with its template (a template that refuses a conversation fails here, not mid-run)."""
        prompts = [prompts] if isinstance(prompts, (str, Conversation)) else list(prompts)
        for p in dict.fromkeys(_prompt_key(p) for p in prompts):
            self.render_check(p)
        self.prob([prompts[0]] * 2, ["Yes.", "No."], ["No.", "Yes."])

    def render_check(self, prompt):
        """Build this judge's input for `prompt` without scoring it (model judges); nothing by default."""

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
        self.by_prompt = {}       # prompt -> (game, {candidate: index}, the matrix with the invalid action last)
        for g in games:
            if g.prompt in self.by_prompt:
                raise ValueError(f"{games.path}: games {self.by_prompt[g.prompt][0].id!r} and {g.id!r} share a prompt; "
                                 f"the arena judge identifies a game by its prompt")
            self.by_prompt[g.prompt] = (g, {c.strip(): i for i, c in enumerate(g.candidates)}, with_invalid(g.P))

    def _key(self, prompt):
        """A single-turn chat prompt is its text; a game is found by its prompt text."""
        if isinstance(prompt, str):
            return prompt
        c = conversation(prompt)
        return c.text if len(c.messages) == 1 else None

    def knows(self, prompt) -> bool:
        return self._key(prompt) in self.by_prompt

    def check(self, prompts):
        """Every prompt must be one of the games' (a chat prompt: a single user turn with a game's text)."""
        unknown = [p for p in ([prompts] if isinstance(prompts, (str, Conversation)) else prompts) if not self.knows(p)]
        if unknown:
            raise ValueError(f"--judge arena knows only the prompts of {self.games.path}; a prompt is "
                             f"{str(unknown[0])!r} (use --judge rm:DIR, pair:DIR or py:FILE.py:NAME)")

    def index(self, prompt, text) -> int:
        """Candidate index of `text` in the game of `prompt` (exact match after strip()), −1 if invalid."""
        prompt = self._key(prompt)
        if prompt not in self.by_prompt:
            raise KeyError(f"ArenaJudge: prompt {prompt!r} is not in {self.games.path}")
        return self.by_prompt[prompt][1].get(text.strip(), -1)

    def prob(self, prompts, a, b) -> torch.Tensor:
        _check_batch(prompts, a, b)
        out = torch.empty(len(prompts), dtype=torch.float64)
        for k, (x, ya, yb) in enumerate(zip(prompts, a, b)):
            i, j = self.index(x, ya), self.index(x, yb)   # −1 (invalid text): with_invalid's last row / column
            out[k] = float(self.by_prompt[self._key(x)][2][i, j])
        return out


class ModelJudge(Judge):
    """A judge that runs a model folder (common/model.py) with its tokenizer, chat template and pad id, under no_grad,
    batch_size rows of similar length per pass (bf16 autocast when the caller enables it). parts = (model, tokenizer,
    chat template) builds it from objects in memory instead (bench/gpu_check.py); `path` then only names it."""

    def __init__(self, path, device, dtype, batch_size, parts=None):
        if parts is None:
            model, tokenizer, template = from_pretrained(path, device=device, dtype=dtype), load_tokenizer(path), \
                ChatTemplate.load(path)
            ids = special_token_ids(path)
        else:
            (model, tokenizer, template), cfg = parts, parts[0].config
            ids = {"eos_id": cfg.eos_token_id, "pad_id": cfg.pad_token_id}
        self.model, self.tokenizer, self.chat_template = model.eval().requires_grad_(False), tokenizer, template
        self.eos_id, self.pad_id = ids["eos_id"], ids["pad_id"] if ids["pad_id"] is not None else 0
        self.batch_size = batch_size

    @torch.no_grad()
    def run(self, rows, fn) -> torch.Tensor:
        """(N,) float64: fn(ids, attention_mask) -> (b,) on the token-id lists `rows`, left-padded."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out, dev = torch.zeros(len(rows), dtype=torch.float64), self.model.embed_tokens.weight.device
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            ids, attn = (t.to(dev) for t in pad_rows([rows[i] for i in idx], self.pad_id))
            out[idx] = fn(ids, attn).double().cpu()
        return out


class RewardModelJudge(ModelJudge):
    """σ(r(x, a) − r(x, b)) with a *ForSequenceClassification checkpoint (num_labels = 1)."""

    def __init__(self, path, device="cpu", dtype=torch.float32, batch_size=64, parts=None):
        super().__init__(path, device, dtype, batch_size, parts)
        if not self.model.config.is_reward_model or self.model.config.num_labels != 1:
            raise ValueError(f"{path}: not a reward model (expected a *ForSequenceClassification config.json "
                             f"with num_labels = 1)")

    def encode(self, prompt, response) -> list:
        """Token ids the reward model scores: the conversation + the answer as an assistant turn, rendered with its
        own chat template (as such models are trained and scored); without one, the arena's raw layout."""
        if self.chat_template is not None:
            turns = conversation(prompt).as_dicts() + [{"role": "assistant", "content": response}]
            return self.chat_template.encode(self.tokenizer, turns, add_generation_prompt=False)
        text = prompt if isinstance(prompt, str) else conversation(prompt).text
        ids = encode_prompt(self.tokenizer, text) + encode_response(self.tokenizer, response)
        if self.eos_id is not None and self.eos_id != self.pad_id:
            ids.append(self.eos_id)
        return ids

    def render_check(self, prompt):
        self.encode(prompt, "Yes.")

    def score(self, prompts, responses) -> torch.Tensor:
        """(B,) float64 rewards r(x, y): the score head at the last token of each row."""
        return self.run([self.encode(x, y) for x, y in zip(prompts, responses)], self.model)

    def prob(self, prompts, a, b) -> torch.Tensor:
        """One reward-model pass over the distinct (prompt, response) pairs of both sides: all pairs among K
        responses (inpo.py --pairs all) cost K scores, not K(K − 1)."""
        _check_batch(prompts, a, b)
        keys = [(_prompt_key(x), y) for x, y in zip(list(prompts) + list(prompts), list(a) + list(b))]
        distinct = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        r = self.score([x for x, _ in distinct], [y for _, y in distinct])
        r = r[torch.tensor([distinct[k] for k in keys], dtype=torch.long)]
        return torch.sigmoid(r[:len(a)] - r[len(a):])


def _prompt_key(prompt):
    """A hashable prompt: its Conversation (a str is one user turn), so equal prompts are scored once."""
    return conversation(prompt)


# The RLHFlow pairwise preference model's plain context template (its model card), which renders the conversation
# so far as the text between [CONTEXT] and [RESPONSE A].
PLAIN_CONTEXT_TEMPLATE = ("\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n "
                          "{{ message['content'] }}{% else %}\n\n<turn> assistant\n {{ message['content'] }}"
                          "{% endif %}{% endfor %}\n\n\n")
PAIR_MESSAGE = "[CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b} \n"


class PairJudge(ModelJudge):
    """A causal LM as a pairwise preference oracle, in the format of the RLHFlow pairwise preference model (the oracle
    of INPO's experiments):
        context = the conversation rendered with PLAIN_CONTEXT_TEMPLATE
        message = PAIR_MESSAGE with the context and the two responses, as one user turn rendered with the judge's own
                  chat template and add_generation_prompt=True (tokenized without adding special tokens again)
        p(a, b) = softmax over the next-token logits of the single tokens "A" and "B", at "A"
        P(a ≻ b) = ½ [p(a, b) + 1 − p(b, a)]      both orders: position bias cancels, P(a ≻ b) + P(b ≻ a) = 1
    Each distinct ordered (prompt, first, second) is scored once per call. Any instruct model becomes an LLM judge this
    way, and a trained pairwise preference model can be used in it; unlike a reward model it can be intransitive. The
    rendering follows this project's specification (the judge's template with add_generation_prompt=True, its BOS
    once); the RLHFlow scripts may differ in such details (a generation prompt, a BOS stripped), not checked here."""

    def __init__(self, path, device="cpu", dtype=torch.float32, batch_size=16, parts=None):
        super().__init__(path, device, dtype, batch_size, parts)
        if self.model.config.is_reward_model:
            raise ValueError(f"--judge pair:{path}: a *ForSequenceClassification model; a pair judge is a causal LM "
                             f"(use rm:{path})")
        if self.chat_template is None:
            raise ValueError(f"--judge pair:{path}: the judge has no chat template (tokenizer_config.json "
                             f"chat_template or chat_template.jinja)")
        self.plain = ChatTemplate(PLAIN_CONTEXT_TEMPLATE, where="the pair judge's context template")
        choice = []
        for t in ("A", "B"):
            ids = self.tokenizer.encode(t, add_special_tokens=False).ids
            if len(ids) != 1:
                raise ValueError(f"--judge pair:{path}: its tokenizer encodes {t!r} as {len(ids)} tokens; a pair judge "
                                 f"needs single tokens A and B")
            choice.append(ids[0])
        self.choice = torch.tensor(choice)                      # (2,) ids of "A", "B"
        self._context = {}

    def encode(self, prompt, first, second) -> list:
        """Token ids of the judge's input with `first` as response A and `second` as response B."""
        key = conversation(prompt)
        if key not in self._context:                            # rendered once per prompt
            self._context[key] = self.plain.render(key.as_dicts(), add_generation_prompt=False)
        context = self._context[key]
        message = PAIR_MESSAGE.format(context=context, a=first, b=second)
        return self.chat_template.encode(self.tokenizer, [{"role": "user", "content": message}],
                                         add_generation_prompt=True)

    def render_check(self, prompt):
        self.encode(prompt, "Yes.", "No.")

    def first_wins(self, prompts, first, second) -> torch.Tensor:
        """(N,) float64 p(first, second): the judge's probability of "A" against "B" after the input."""
        w = self.model.lm_head_weight
        head = w[self.choice.to(w.device)]                      # (2, d): only the two answer tokens' logits

        def a_vs_b(ids, attn):                                  # the last token's state -> softmax over (A, B), at A
            h = self.model.hidden_states(ids, attention_mask=attn)[:, -1]
            return (h.float() @ head.float().T).double().softmax(-1)[:, 0]
        return self.run([self.encode(x, f, s) for x, f, s in zip(prompts, first, second)], a_vs_b)

    def prob(self, prompts, a, b) -> torch.Tensor:
        _check_batch(prompts, a, b)
        keys = [(_prompt_key(x), u, v) for x, u, v in zip(prompts, a, b)]
        keys = keys + [(x, v, u) for x, u, v in keys]          # both orders
        distinct = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        p = self.first_wins(*zip(*distinct)) if distinct else torch.zeros(0, dtype=torch.float64)
        p = p[torch.tensor([distinct[k] for k in keys], dtype=torch.long)]
        n = len(a)
        return 0.5 + 0.5 * (p[:n] - p[n:])                      # ½ [p(a, b) + 1 − p(b, a)]


class CategoryGame:
    """A finite preference game over response classes: P(a ≻ b) = matrix[c(a)][c(b)], with c = categories(prompts,
    responses). The regularized equilibrium of such a game is a mix of classes, and since P depends on a response only
    through its class, π*(class | x) solves the class game with π_ref(class | x) as reference (docs/algorithms.md §0,
    played over classes): given π_ref's class frequencies the target is exact."""

    def __init__(self, matrix, categories, names=None, where="judge"):
        P = np.asarray(matrix, dtype=np.float64)
        if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 2:
            raise ValueError(f"{where}: matrix must be a square k x k list, k ≥ 2")
        if not (np.all((P >= 0) & (P <= 1)) and np.allclose(P + P.T, 1.0, atol=1e-9)):
            raise ValueError(f"{where}: matrix entries must lie in [0, 1] with matrix + matrixᵀ = 1")
        self.P, self.categories, self.where = P, categories, where
        self.names = list(names) if names is not None else [str(i) for i in range(len(P))]

    def classes(self, prompts, responses) -> np.ndarray:
        """(B,) class of each response."""
        try:
            c = np.asarray(self.categories([conversation(p).as_dicts() for p in prompts], list(responses)))
        except Exception as e:  # the user's function
            raise JudgeError(one_line(f"{self.where}: categories() raised {type(e).__name__}: {e}")) from None
        if c.shape != (len(responses),) or not np.issubdtype(c.dtype, np.integer) or c.min() < 0 \
                or c.max() >= len(self.P):
            raise JudgeError(f"{self.where}: categories() must return one int in [0, {len(self.P)}) per response")
        return c

    def kl_to_equilibrium(self, ca, cb, beta) -> float:
        """Mean over prompts of KL(π*_x ‖ π̂_x): ca, cb (prompts, n) classes of the policy's and π_ref's samples;
        π̂_x and π_ref(·|x) their class frequencies with add-½ (Jeffreys) smoothing, π*_x the equilibrium of the class
        game with reference π_ref(·|x)."""
        k = len(self.P)
        out = []
        for a, b in zip(ca, cb):
            pi = (np.bincount(a, minlength=k) + 0.5) / (len(a) + 0.5 * k)
            ref = (np.bincount(b, minlength=k) + 0.5) / (len(b) + 0.5 * k)
            out.append(kl(equilibrium(self.P, ref, beta), pi))   # solved once per distinct ref (cached)
        return float(np.mean(out))

    def metrics(self, a, b, n, beta, n_boot=200, seed=0) -> dict:
        """eval/bucket_kl_ne (kl_to_equilibrium of samples a of π against samples b of π_ref, n per prompt), its
        bootstrap standard error (both sample sets resampled within each prompt, n_boot times) and eval/bucket/<name>,
        π's class frequencies over all its samples."""
        ca = self.classes(a.prompts, a.texts).reshape(-1, n)
        cb = self.classes(b.prompts, b.texts).reshape(-1, n)
        rng = np.random.default_rng(seed)
        rows = np.arange(len(ca))[:, None]
        boot = [self.kl_to_equilibrium(ca[rows, rng.integers(0, n, ca.shape)], cb[rows, rng.integers(0, n, cb.shape)],
                                       beta) for _ in range(n_boot)]
        freq = np.bincount(ca.ravel(), minlength=len(self.P)) / ca.size
        return {"eval/bucket_kl_ne": self.kl_to_equilibrium(ca, cb, beta), "eval/bucket_kl_ne_se": float(np.std(boot)),
                **{f"eval/bucket/{name}": float(f) for name, f in zip(self.names, freq)}}


class PyJudge(Judge):
    """The user's preference function: `name` in `file`, called as name(prompts, a, b) with prompts a list of
    conversations (lists of {"role", "content"} dicts) and a, b lists of response strings; it returns P(a_i ≻ b_i)
    for each pair (a sequence of B numbers in [0, 1]; it should satisfy f(x, a, b) + f(x, b, a) = 1). Every answer is
    checked. Optional attributes of the function, `matrix` (k x k) and `categories(prompts, responses) -> k-class ints`,
    declare a CategoryGame (self.game)."""

    def __init__(self, file, name):
        self.spec = f"py:{file}:{name}"
        if not os.path.isfile(file):
            raise ValueError(f"--judge {self.spec}: {file} not found")
        mod_name = "nanonash_judge_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(file))
        try:
            spec = importlib.util.spec_from_file_location(mod_name, file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error it raises on import
            raise ValueError(one_line(f"--judge {self.spec}: {file} does not import ({type(e).__name__}: {e})")) \
                from None
        fn = getattr(module, name, None)
        if not callable(fn):
            raise ValueError(f"--judge {self.spec}: {file} defines no function {name!r}")
        self.fn = fn
        self.game = None
        if hasattr(fn, "matrix") and hasattr(fn, "categories"):
            self.game = CategoryGame(fn.matrix, fn.categories, getattr(fn, "names", None), f"--judge {self.spec}")

    def check(self, prompts):
        super().check(prompts)
        if self.game is not None:
            first = prompts if isinstance(prompts, (str, Conversation)) else list(prompts)[0]
            self.game.classes([first, first], ["Yes.", "No."])

    def prob(self, prompts, a, b) -> torch.Tensor:
        _check_batch(prompts, a, b)
        try:
            out = self.fn([conversation(p).as_dicts() for p in prompts], list(a), list(b))
        except Exception as e:
            raise JudgeError(one_line(f"--judge {self.spec}: raised {type(e).__name__}: {e}")) from None
        try:
            p = np.asarray(out, dtype=np.float64)
        except (TypeError, ValueError):
            raise JudgeError(f"--judge {self.spec}: returned {type(out).__name__}, expected {len(a)} numbers") from None
        if p.shape != (len(a),):
            raise JudgeError(f"--judge {self.spec}: returned shape {p.shape} for {len(a)} pairs, expected ({len(a)},)")
        if not np.all((p >= 0) & (p <= 1)):  # NaN fails too
            bad = p[~((p >= 0) & (p <= 1))][0]
            raise JudgeError(f"--judge {self.spec}: returned {float(bad)!r}, expected probabilities in [0, 1]")
        return torch.from_numpy(p.copy())


def make_judge(spec: str, games: Games = None, device="cpu", batch_size=None, dtype=None) -> Judge:
    """--judge flag: "arena" (the games file's matrices; default games: data/arena), "rm:DIR", "pair:DIR" or
    "py:FILE.py:NAME". A model judge runs batch_size rows per forward (None: its default) in `dtype` (None: fp32)."""
    if spec == "arena":
        return ArenaJudge(games if games is not None else load_games())
    for prefix, cls in (("rm:", RewardModelJudge), ("pair:", PairJudge)):
        if spec.startswith(prefix) and len(spec) > len(prefix):
            path = spec[len(prefix):]
            if not os.path.isdir(path):
                raise ValueError(f"--judge {spec}: {path} is not a folder")
            kw = {k: v for k, v in (("batch_size", batch_size), ("dtype", dtype)) if v is not None}
            return cls(path, device=device, **kw)
    if spec.startswith("py:"):
        file, sep, name = spec[3:].rpartition(":")
        if not sep or not file or not name.isidentifier():
            raise ValueError(f"--judge {spec!r}: expected py:FILE.py:NAME")
        return PyJudge(file, name)
    raise ValueError(f"--judge {spec!r}: expected arena, rm:DIR (a *ForSequenceClassification folder), pair:DIR (a "
                     f"causal LM with a chat template) or py:FILE.py:NAME")
