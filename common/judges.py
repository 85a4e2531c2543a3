"""Preference oracles ("judges"): P(a ≻ b | prompt) for batches, and Bernoulli labels drawn from it.

    judge.prob(prompts, a, b)               -> (B,) float64 tensor, P(a_i ≻ b_i | prompts_i)
    judge.label(prompts, a, b, generator)   -> (B,) bool tensor, True where a_i ≻ b_i, drawn as u_i < P with
                                               u_i ~ U(0, 1) from the explicit torch.Generator (on its device)
A prompt is a Game's text (str, the arena) or a chat prompt (common.chat.Conversation; a str is one user turn).
Implementations:
    ArenaJudge(games)      text in, the games file's matrix out: P[i, j] when a and b are candidates i and j of the
                           prompt's game (exact match after strip()); 0 for invalid text against a candidate,
                           1 for a candidate against invalid text, ½ for two invalid texts (DESIGN.md, the arena)
    RewardModelJudge(dir)  a Bradley–Terry reward model, a *ForSequenceClassification folder loaded with
                           common/model.py: P = σ(r(x, a) − r(x, b)), r the score at the last token of the
                           conversation (prompt, answer) rendered with the reward model's own chat template, or, when it
                           has none, of encode(prompt) + encode(answer) + [EOS] (contract 2; EOS omitted when it is the
                           pad id)
    PairJudge(dir)         a causal LM as a general preference oracle in the RLHFlow pairwise format (PairJudge's
                           docstring); both orders averaged, so P(a ≻ b) + P(b ≻ a) = 1; it can be intransitive
    PyJudge(file, name)    the user's function name(prompts, a, b) -> P(a ≻ b), one value in [0, 1] per pair; prompts
                           reach it as conversations (lists of {"role", "content"} dicts). A function with the
                           attributes `categories` and `matrix` plays a finite game over response classes
                           (CategoryGame), whose regularized equilibrium mix is exact: the sampled evaluation reports
                           the distance to it
    TabularJudge(games)    the same matrices as ArenaJudge over action indices: prompts are game ids, a and b
                           LongTensors of candidate indices (−1 = invalid); no strings involved
make_judge("arena" | "rm:DIR" | "pair:DIR" | "py:FILE.py:NAME", games) builds one from a --judge flag. The model judges
score under no_grad in batches of `batch_size` rows (bf16 autocast on CUDA when the caller enables it).
"""
import importlib.util
import os

import numpy as np
import torch

from common.arena import Games, equilibrium, kl, load_games
from common.chat import ChatTemplate, Conversation, _one_line, conversation
from common.policy import encode_prompt, encode_response


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
        self.by_prompt = {}
        for g in games:
            if g.prompt in self.by_prompt:
                raise ValueError(f"{games.path}: games {self.by_prompt[g.prompt][0].id!r} and {g.id!r} share a prompt; "
                                 f"the arena judge identifies a game by its prompt")
            self.by_prompt[g.prompt] = (g, {c.strip(): i for i, c in enumerate(g.candidates)})

    def _key(self, prompt):
        """A single-turn chat prompt is its text; a game is found by its prompt text."""
        if isinstance(prompt, str):
            return prompt
        c = conversation(prompt)
        return c.text if len(c.messages) == 1 else None

    def knows(self, prompt) -> bool:
        return self._key(prompt) in self.by_prompt

    def check(self, prompts):
        pass  # setup_world has checked every prompt with knows()

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
            i, j = self.index(x, ya), self.index(x, yb)
            if i >= 0 and j >= 0:
                out[k] = float(self.by_prompt[self._key(x)][0].P[i, j])
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


def _pad_left(rows, pad_id, device):
    """Left-padded ids and attention mask (B, T) of token-id lists: the last column is every row's last token."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        attn[i, T - len(r):] = 1
    return ids.to(device), attn.to(device)


def _batches(rows, batch_size):
    """Indices of `rows` in batches of at most batch_size rows of similar length (less padding)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


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
        self.chat_template = ChatTemplate.load(path)
        ids = special_token_ids(path)
        self.eos_id, self.pad_id = ids["eos_id"], ids["pad_id"]
        if self.pad_id is None:
            self.pad_id = 0
        self.batch_size = batch_size

    def encode(self, prompt, response) -> list:
        """Token ids the reward model scores: the conversation + the answer as an assistant turn, rendered with its
        own chat template (as such models are trained and scored); without one, contract 2's raw layout."""
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

    @torch.no_grad()
    def score(self, prompts, responses) -> torch.Tensor:
        """(B,) float64 rewards r(x, y): the score head at the last token of each row, batch_size rows at a time."""
        rows = [self.encode(x, y) for x, y in zip(prompts, responses)]
        dev = self.model.embed_tokens.weight.device
        out = torch.zeros(len(rows), dtype=torch.float64)
        for idx in _batches(rows, self.batch_size):
            ids, attn = _pad_left([rows[i] for i in idx], self.pad_id, dev)
            out[idx] = self.model(ids, attention_mask=attn).double().cpu()
        return out

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


class PairJudge(Judge):
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

    def __init__(self, path, device="cpu", dtype=torch.float32, batch_size=16):
        from common.model import from_pretrained, load_tokenizer, special_token_ids
        self.model = from_pretrained(path, device=device, dtype=dtype).eval().requires_grad_(False)
        if self.model.config.is_reward_model:
            raise ValueError(f"--judge pair:{path}: a *ForSequenceClassification model; a pair judge is a causal LM "
                             f"(use rm:{path})")
        self.tokenizer = load_tokenizer(path)
        self.chat_template = ChatTemplate.load(path)
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
        ids = special_token_ids(path)
        self.pad_id = ids["pad_id"] if ids["pad_id"] is not None else 0
        self.batch_size = batch_size
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

    @torch.no_grad()
    def first_wins(self, prompts, first, second) -> torch.Tensor:
        """(N,) float64 p(first, second): the judge's probability of "A" against "B" after the input."""
        rows = [self.encode(x, f, s) for x, f, s in zip(prompts, first, second)]
        w = self.model.lm_head_weight
        head = w[self.choice.to(w.device)]                      # (2, d): only the two answer tokens' logits
        out = torch.zeros(len(rows), dtype=torch.float64)
        for idx in _batches(rows, self.batch_size):
            ids, attn = _pad_left([rows[i] for i in idx], self.pad_id, w.device)
            h = self.model.hidden_states(ids, attention_mask=attn)[:, -1]          # (b, d) the last token's state
            logits = h.float() @ head.float().T                                     # (b, 2)
            out[idx] = logits.double().softmax(-1)[:, 0].cpu()
        return out

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
    through its class, π*(class | x) solves the class game with π_ref(class | x) as reference (ALGORITHMS.md §0 on the
    classes): given π_ref's class frequencies the target is exact."""

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
            raise JudgeError(_one_line(f"{self.where}: categories() raised {type(e).__name__}: {e}")) from None
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
            raise ValueError(_one_line(f"--judge {self.spec}: {file} does not import ({type(e).__name__}: {e})")) \
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
            raise JudgeError(_one_line(f"--judge {self.spec}: raised {type(e).__name__}: {e}")) from None
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
