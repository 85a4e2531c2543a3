"""The plumbing every algorithm script shares: Args dataclass -> command line, and the run directory.

  args = parse_args(Args)          # one --flag per field; help text = the string literal under the field
  run = RunDir(args, algo="inpo")  # runs/<algo>__<seed>__<time>/ (contract 3), written as <dir>.incomplete
  run.log({"iteration": t, ...})   # one JSON line in metrics.jsonl (contract 4)
  run.finish()                     # renamed into place only when the run completes

Bad command lines get one line on stderr naming the flag, and exit status 2 (argparse's convention).
"""
import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import shutil
import sys
import textwrap
import time



_ACTIVE_RUN = []   # the RunDir of this process, once its folder exists (for mid-run errors and the interrupt message)


def fail(msg: str, code: int = 2):
    """One line on stderr, non-zero exit. Called before anything is written, or mid-run: then the line starts after
    the progress bar's (tqdm writes no newline while it runs)."""
    print(f"{chr(10) if _ACTIVE_RUN else ''}error: {msg}", file=sys.stderr)
    raise SystemExit(code)


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, **kw)  # a flag is its full name: --resume can tell which were given

    def error(self, message):  # one line instead of usage + message
        fail(f"{message} (see --help)")


def _field_docs(cls) -> dict:
    """The string literal written under each dataclass field (cleanrl's Args convention), of `cls` and of the
    dataclasses it extends (WorldArgs)."""
    docs = {}
    for c in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(c):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(c)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) \
                    and isinstance(b.value.value, str):
                docs[a.target.id] = b.value.value
    return docs


def parse_args(cls, argv=None):
    """Build a dataclass instance from the command line: --field-name VALUE, --flag / --no-flag for bools."""
    docs = _field_docs(cls)
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature: the script's first docstring line instead
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
    p = _Parser(description=doc.strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ = hints[f.name]
        help_ = docs.get(f.name, "")
        if typ is bool:
            p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
        else:
            base = typ
            if getattr(typ, "__args__", None):  # Optional[X] / X | None
                base = next(t for t in typ.__args__ if t is not type(None))
            p.add_argument(flag, type=_typed(base, flag), default=default, help=help_)
    ns = p.parse_args(argv)
    return cls(**vars(ns))


def _typed(base, flag):
    def conv(s):
        try:
            v = base(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: expected {base.__name__}, got {s!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{flag}: expected a finite number, got {s!r}")
        return v
    conv.__name__ = base.__name__
    return conv


@dataclasses.dataclass
class WorldArgs:
    """The flags every algorithm script shares (DESIGN.md contract 3): the world, the run, the device. Each script's
    Args extends this dataclass with its algorithm's hyper-parameters only."""
    seed: int = 1
    """seed of every random draw (sampling, labels, minibatch order); CPU runs are bitwise reproducible"""
    policy: str = "lm"
    """lm (a causal LM; the arena SFT model by default) or tabular (one logit table per game)"""
    games: str | None = None
    """games file for evaluation, the tabular actions and the arena judge (default data/arena/games.json)"""
    model: str | None = None
    """HF-layout model folder to start from and regularize to (default data/arena, the arena SFT model)"""
    judge: str = "arena"
    """preference oracle: arena (the games' matrices), rm:DIR (a Bradley-Terry reward model folder), pair:DIR (a
    causal LM as a pairwise judge, RLHFlow format) or py:FILE.py:NAME (NAME(prompts, a, b) returns P(a ≻ b))"""
    prompts: str | None = None
    """.jsonl of {"prompt": ...} or {"messages": [...]} to train on (real-checkpoint world; default: the games'
    train split)"""
    eval_prompts: str | None = None
    """.jsonl of held-out prompts for the sampled evaluation (real-checkpoint world; default: the first 64 training
    prompts)"""
    eval_samples: int = 4
    """responses per evaluation prompt from the policy and from π_ref (real-checkpoint world)"""
    chat_template: str = "auto"
    """auto (the checkpoint's own chat template; prompts stay raw when it has none), none (raw prompts: base models,
    prompts already formatted) or a .jinja file"""
    max_new_tokens: int | None = None
    """longest sampled response in tokens (default: the checkpoint's generation_config.json, else 32)"""
    micro_batch: int | None = None
    """rows per forward/backward pass: an optimizer step accumulates its micro-batches' gradients, equal to the one
    full-batch step (default: all of a step's rows on the arena and tabular worlds, 16 with --prompts)"""
    infer_batch: int | None = None
    """rows per generate() call and per no-grad log-prob or judge pass (default: all at once on the arena, 32 with
    --prompts)"""
    grad_checkpoint: bool = False
    """recompute each transformer block in backward instead of storing its activations (less memory, one more
    forward)"""
    run_dir: str | None = None
    """output folder (default runs/<algo>__<seed>__<time>; algo sadpo for tanpo.py --single-agent)"""
    resume: str | None = None
    """continue the interrupted run in this folder (<run dir>.incomplete) from its last complete iteration, with its
    own args.json (other flags must agree with it)"""
    device: str | None = None
    """cpu or cuda (default cuda when available; bf16 autocast there)"""
    threads: int | None = None
    """CPU threads of torch (default 2 for an LM, sized for 2 cores; 1 for tabular, whose tiny ops only wait on a
    second thread; bench/arena_table.py runs 2 jobs of 1 thread)"""


class Interrupted(BaseException):
    """SIGINT / SIGTERM, raised by cli()'s handler in the main loop: nothing is finished half-way. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way (a user's py: judge) takes it for an error."""
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class RunDir:
    """runs/<algo>__<seed>__<time>/ with args.json, run.json and metrics.jsonl. Lives at <path>.incomplete until
    finish() renames it, so an interrupted run never looks like a finished one.

    After every iteration, checkpoint() writes the complete state of the run into <path>.incomplete/checkpoint-<t>/:
    each player (policy.save_checkpoint: the LM in HF layout, a table's exact logits), every generator's state, the
    algorithm's extra state (tanpo.py's pairs D) and the metrics so far; then latest.json is replaced to point at it
    (written to a temporary name and renamed), and the older checkpoint is removed. A crash or a signal at any point
    leaves latest.json naming a complete checkpoint. None of the four algorithms keeps optimizer state across
    iterations (Adam restarts every iteration, or every proximal step), so there is none to save.
    With args.resume (--resume DIR), the same folder is reopened: restore() loads the last complete checkpoint and
    metrics.jsonl is cut back to its rows, so the run continues as if never stopped (bitwise on CPU)."""

    def __init__(self, args, algo: str):
        self.algo = algo
        self.rows, self.iteration = [], 0
        self.finished = False
        if getattr(args, "resume", None):
            self.tmp = os.path.normpath(args.resume)
            self.path = self.tmp[:-len(".incomplete")]
            self._latest = self._read_latest()
            keep = self._latest["metrics_lines"] if self._latest else 0
            with open(os.path.join(self.tmp, "metrics.jsonl")) as f:   # the checkpoint's rows; a later line may be cut
                self.rows = [json.loads(line) for line in f.read().splitlines()[:keep]]
            _write_atomic(os.path.join(self.tmp, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in self.rows))
            self._metrics = open(os.path.join(self.tmp, "metrics.jsonl"), "a")
            _ACTIVE_RUN.append(self)
            return
        self._latest = None
        self.path = args.run_dir or os.path.join("runs", f"{algo}__{args.seed}__{int(time.time())}")
        self.tmp = self.path + ".incomplete"
        if os.path.exists(self.path):
            fail(f"--run-dir {self.path}: already exists")
        if os.path.exists(self.tmp):
            fail(f"--run-dir {self.path}: an interrupted run is there; continue it with --resume {self.tmp} or "
                 f"delete the folder")
        from common.policy import _atomic_dir

        def write(staging):
            with open(os.path.join(staging, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=2)
            with open(os.path.join(staging, "run.json"), "w") as f:
                json.dump({"algo": algo, "script": os.path.basename(sys.argv[0])}, f)
            open(os.path.join(staging, "metrics.jsonl"), "w").close()
        _atomic_dir(self.tmp, write)   # built under a hidden name and renamed: the folder appears whole, or not at all
        self._metrics = open(os.path.join(self.tmp, "metrics.jsonl"), "a")
        _ACTIVE_RUN.append(self)

    def file(self, name: str) -> str:
        """Path inside the (still incomplete) run dir."""
        return os.path.join(self.tmp, name)

    def log(self, row: dict):
        self.rows.append(row)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def iterations(self, total: int, desc: str):
        """The loop's iteration numbers after the last complete one, 1-based, with a tqdm bar."""
        from tqdm import tqdm
        return tqdm(range(self.iteration + 1, total + 1), desc=desc, unit="iter", initial=self.iteration, total=total)

    # ---- checkpoints ------------------------------------------------------------------------------------

    def _read_latest(self):
        f = os.path.join(self.tmp, "latest.json")
        if not os.path.isfile(f):
            return None
        with open(f) as fh:
            return json.load(fh)

    def checkpoint(self, iteration: int, players: dict, generators: dict, extra: dict = None):
        """Save the run's state after `iteration` (class docstring). players: name -> policy; generators: name ->
        torch.Generator; extra: name -> tensor or Samples (common.policy), the algorithm's own state."""
        import torch
        from safetensors.torch import save_file

        from common.policy import Samples
        name = f"checkpoint-{iteration}"
        final = os.path.join(self.tmp, name)
        shutil.rmtree(final, ignore_errors=True)       # a half-written one from an earlier, interrupted attempt
        tmp = os.path.join(self.tmp, f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for key, player in players.items():
            player.save_checkpoint(os.path.join(tmp, key))
        tensors = {f"generator/{k}": g.get_state() for k, g in generators.items()}
        tensors["generator/torch_global"] = torch.get_rng_state()
        samples = {}
        for key, v in (extra or {}).items():
            if isinstance(v, Samples):
                t, samples[key] = v.to_state()
                tensors.update({f"samples/{key}/{n}": x for n, x in t.items()})
            else:
                tensors[f"extra/{key}"] = v.detach().cpu().contiguous()
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "state.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"iteration": iteration, "samples": samples}, f)
        os.replace(tmp, final)
        latest = {"checkpoint": name, "iteration": iteration, "metrics_lines": len(self.rows)}
        _write_atomic(os.path.join(self.tmp, "latest.json"), json.dumps(latest))
        if self._latest and self._latest["checkpoint"] != name:
            shutil.rmtree(os.path.join(self.tmp, self._latest["checkpoint"]), ignore_errors=True)
        self._latest, self.iteration = latest, iteration

    def restore(self, players: dict, generators: dict) -> dict:
        """A resumed run: load the last complete checkpoint into players and generators; returns its extra state
        (name -> tensor or Samples). A fresh run, or one stopped before its first checkpoint: nothing, {}."""
        if self._latest is None:
            return {}
        import torch
        from safetensors.torch import load_file

        from common.policy import Samples
        d = os.path.join(self.tmp, self._latest["checkpoint"])
        for key, player in players.items():
            player.load_checkpoint(os.path.join(d, key))
        tensors = load_file(os.path.join(d, "state.safetensors"))
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
        for k, g in generators.items():
            g.set_state(tensors[f"generator/{k}"])
        torch.set_rng_state(tensors["generator/torch_global"])
        extra = {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}
        device = next(p for pl in players.values() for p in pl.parameters()).device
        for key, lists in state["samples"].items():
            pre = f"samples/{key}/"
            extra[key] = Samples.from_state({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, lists,
                                            device)
        for name in os.listdir(self.tmp):  # half-written checkpoints of the interrupted attempt
            if name.startswith((".checkpoint-", "checkpoint-")) and name != self._latest["checkpoint"]:
                shutil.rmtree(os.path.join(self.tmp, name), ignore_errors=True)
        self.iteration = self._latest["iteration"]
        return extra

    def check_finite(self, iteration: int, losses, *players):
        """Stop the run, one line, when a loss or a parameter is NaN or inf (one host sync per iteration). The last
        good checkpoint stays; nothing of this iteration is saved, and the folder is never renamed into place."""
        import torch
        params = [p for pl in players for p in pl.parameters()]
        dev = params[0].device if params else "cpu"
        flags = [torch.isfinite(torch.as_tensor(x, device=dev)).all() for x in losses]
        flags += [torch.isfinite(p).all() for p in params]
        if flags and not bool(torch.stack(flags).all()):     # the one sync
            kept = f"iteration {self.iteration}'s checkpoint is kept" if self._latest else "no iteration was complete"
            fail(f"iteration {iteration}: a loss or a parameter is NaN or inf; the run stopped ({kept} in "
                 f"{self.tmp}; try a smaller --lr)", code=3)

    def finish(self) -> str:
        """Rename <path>.incomplete into place, then remove the checkpoints from it (the final policy is at the folder's
        root): a signal at any point leaves either an interrupted run that resumes or a finished one."""
        self._metrics.close()
        os.replace(self.tmp, self.path)
        self.finished = True
        for name in os.listdir(self.path):
            if name.startswith((".checkpoint-", "checkpoint-")) or name.startswith("latest.json"):
                p = os.path.join(self.path, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        return self.path


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- the three worlds of DESIGN.md ---------------------------------------------------------------------

EVAL_SEED, REF_EVAL_SEED = 12345, 54321  # the sampled evaluation's draws: the same every iteration


@dataclasses.dataclass
class World:
    """Everything an algorithm's loop needs, built and validated before any file is written."""
    policy: object          # TabularPolicy | LMPolicy (common/policy.py): the one being trained
    ref: object             # frozen π_ref (the SFT model / the games file's ref)
    judge: object           # common/judges.py
    games: object           # common.arena.Games used for exact evaluation, or None (real-checkpoint world)
    prompts: list           # training prompts: Game objects (arena / tabular) or Conversations (--prompts file)
    eval_prompts: list      # prompts of the sampled evaluation (real-checkpoint world only)
    beta: float             # the games file's β: the regularization the metrics measure (0.1 without games)
    device: str
    generator: object       # torch.Generator: every random draw of the run
    eval_samples: int = 4   # responses per evaluation prompt (real-checkpoint world)
    ref_dist: list = None   # π_ref's exact distribution over the games (LM), computed on the first evaluate()
    ref_eval: object = None  # π_ref's evaluation samples (real-checkpoint world), drawn on the first evaluate()

    @property
    def kind(self) -> str:
        """tabular, arena (an LM on the games' prompts) or real (an LM on a --prompts file): the worlds of the
        defaults."""
        from common.arena import Game
        from common.policy import TabularPolicy
        if isinstance(self.policy, TabularPolicy):
            return "tabular"
        return "arena" if self.prompts and isinstance(self.prompts[0], Game) else "real"

    def autocast(self):
        """bf16 autocast on CUDA (weights stay fp32: the optimizer state is exact); nothing on CPU."""
        import contextlib
        import torch
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda") \
            else contextlib.nullcontext()

    def evaluate(self, policy) -> dict:
        """Exact arena metrics (contract 4) when there is a games file; otherwise sampled_metrics()."""
        import torch

        from common.arena import evaluate
        from common.policy import TabularPolicy
        with torch.no_grad(), self.autocast():
            if self.games is not None:  # a table's π_ref is the games file's ref; an LM's is the SFT model
                if isinstance(policy, TabularPolicy):
                    return evaluate(policy, self.games)
                if self.ref_dist is None:  # π_ref is frozen: one exact pass per run, not one per evaluation
                    self.ref_dist = self.ref.distribution(self.games)
                return evaluate(policy, self.games, self.ref_dist)
            return self.sampled_metrics(policy)

    def sampled_metrics(self, policy) -> dict:
        """The real-checkpoint world's evaluation on eval_prompts, n = eval_samples responses per prompt from π and
        from π_ref (the same draws every iteration: fixed seeds; π_ref's drawn once per run):
            eval/win_vs_ref       mean over prompts of the mean judge probability P(y_i ≻ y_ref,i), and _se its
                                  standard error (prompts as clusters: sd of the prompt means / √prompts)
            eval/len              mean response length in tokens (EOS not counted); eval/truncated the fraction that
                                  hit max_new_tokens without an EOS; eval/empty the fraction with no visible text
            eval/bucket_kl_ne …   when the judge plays a finite game over response classes (CategoryGame):
                                  KL(π*‖π̂) of the class frequencies and its bootstrap SE (common/judges.py)."""
        import numpy as np
        import torch

        def gen(seed):
            return torch.Generator(device=self.generator.device).manual_seed(seed)
        n, n_prompts = self.eval_samples, len(self.eval_prompts)
        a = policy.sample(self.eval_prompts, n, generator=gen(EVAL_SEED))
        if self.ref_eval is None:
            self.ref_eval = self.ref.sample(self.eval_prompts, n, generator=gen(REF_EVAL_SEED))
        b = self.ref_eval
        p = self.judge.prob(a.prompts, a.texts, b.texts).double().cpu().numpy().reshape(n_prompts, n)
        per_prompt = p.mean(1)
        se = per_prompt.std(ddof=1) / np.sqrt(n_prompts) if n_prompts > 1 else \
            (p.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan"))
        out = {"eval/win_vs_ref": float(per_prompt.mean()), "eval/win_vs_ref_se": float(se)}
        out.update({f"eval/{k}": v for k, v in policy.response_stats(a).items()})
        game = getattr(self.judge, "game", None)
        if game is not None:
            out.update(game.metrics(a, b, n, self.beta))
        return out


def frozen_dtype(device):
    """dtype of the frozen models' weights: bf16 on CUDA, where every pass runs under bf16 autocast (a model judge is
    cast whole; π_ref only its Linear weights, LMPolicy.frozen_copy, so that it computes what the fp32 policy
    computes); None (fp32, unchanged) on CPU. The trained policy keeps fp32 master weights (DESIGN.md)."""
    import torch
    return torch.bfloat16 if str(device).startswith("cuda") else None


def setup_world(args) -> World:
    """The world selected by --policy / --model / --judge / --prompts / --games (DESIGN.md, three worlds).
    Any bad input ends here with one line on stderr and exit status 2, before a file is written."""
    import random

    import numpy as np
    import torch

    from common.arena import ARENA_DIR, GAMES_PATH, GamesError, load_games
    from common.chat import read_prompts
    from common.judges import ArenaJudge, make_judge
    from common.policy import LMPolicy, TabularPolicy

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is None:
        args.threads = 1 if args.policy == "tabular" else 2
    if args.threads < 1:
        fail(f"--threads {args.threads}: must be ≥ 1")
    torch.set_num_threads(args.threads)
    try:
        if args.policy not in ("lm", "tabular"):
            raise ValueError(f"--policy {args.policy!r}: expected 'lm' or 'tabular'")
        if args.eval_samples < 1:
            raise ValueError(f"--eval-samples {args.eval_samples}: must be ≥ 1")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be ≥ 1")
        real = args.prompts is not None            # the real-checkpoint world: memory bounded by default
        args.micro_batch = args.micro_batch if args.micro_batch is not None else (16 if real else None)
        args.infer_batch = args.infer_batch if args.infer_batch is not None else (32 if real else None)
        for name in ("micro_batch", "infer_batch"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be ≥ 1")
        if args.eval_prompts is not None and (args.prompts is None or args.games is not None):
            raise ValueError("--eval-prompts applies to --prompts runs without --games (with a games file the "
                             "evaluation is exact, on its games)")
        games = load_games(args.games or GAMES_PATH) if (args.prompts is None or args.games) else None
        if args.policy == "tabular":
            if args.prompts is not None or args.model is not None:
                raise ValueError("--policy tabular takes its actions from --games; --prompts/--model do not apply")
            policy = TabularPolicy(games).to(device)
        else:
            policy = LMPolicy.load(args.model or ARENA_DIR, device=device, max_new_tokens=args.max_new_tokens,
                                   chat_template=args.chat_template)
            policy.infer_batch = args.infer_batch
            policy.model.grad_checkpoint = args.grad_checkpoint
        judge = make_judge(args.judge, games, device=device, batch_size=args.infer_batch,
                           dtype=frozen_dtype(device))
        if args.prompts is not None:
            prompts = read_prompts(args.prompts)
            eval_prompts = read_prompts(args.eval_prompts, "--eval-prompts") if args.eval_prompts else prompts[:64]
            if isinstance(judge, ArenaJudge):
                unknown = [p for p in prompts + eval_prompts if not judge.knows(p)]
                if unknown:
                    raise ValueError(f"--judge arena knows only the prompts of {judge.games.path}; a prompt is "
                                     f"{str(unknown[0])!r} (use --judge rm:DIR, pair:DIR or py:FILE.py:NAME)")
            if policy.chat_template is None and args.chat_template == "auto":
                print(f"note: {args.model or ARENA_DIR} has no chat template: prompts are fed as raw text",
                      file=sys.stderr)
        else:
            prompts = list(games.select(split="train")) or list(games)
            eval_prompts = []
        if isinstance(policy, LMPolicy):   # renders and encodes each prompt once: a bad template or length ends here
            policy.check_prompts(prompts + eval_prompts)
        judge.check([p.prompt if hasattr(p, "prompt") else p for p in prompts + eval_prompts])
    except (GamesError, ValueError, KeyError, FileNotFoundError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        fail(str(msg))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    return World(policy=policy, ref=policy.frozen_copy(frozen_dtype(device)), judge=judge, games=games, prompts=prompts,
                 eval_prompts=eval_prompts, beta=games.beta if games is not None else 0.1, device=device,
                 generator=gen, eval_samples=args.eval_samples)


SAMPLED_METRICS = ("win_vs_ref", "len", "truncated", "empty", "bucket_kl_ne")


def comparison_table(before: dict, after: dict, games) -> str:
    """Plain table of SFT (before) vs trained (after): one row per split and split/family, then all (arena); one row
    of the sampled metrics (real-checkpoint world)."""
    from common.arena import METRICS
    if games is None:
        keys = [""]
        metrics = [m for m in SAMPLED_METRICS if f"eval/{m}" in after]
    else:
        keys = []
        for g in games:
            for k in (f"/{g.split}", f"/{g.split}/{g.family}"):
                if k not in keys:
                    keys.append(k)
        keys.sort(key=lambda k: (k.split("/")[1] != "train", k))
        keys.append("")
        metrics = [m for m in METRICS if f"eval/{m}" in after]
    head = f"{'split/family':<16}" + "".join(f"{m + ' sft→trained':>26}" for m in metrics)
    lines = [head, "-" * len(head)]
    for k in keys:
        cells = "".join(f"{before[f'eval/{m}{k}']:>12.4f} → {after[f'eval/{m}{k}']:<11.4f}" for m in metrics)
        lines.append(f"{(k[1:] or 'all'):<16}" + cells)
    return "\n".join(lines)


def batched_logprobs(policy, samples, batch_size=256, per_token=False):
    """ℓ(y|x) (B,) of every row of `samples` under a frozen policy, or its per-token terms (B, T) with per_token, on
    CPU, no grad, in chunks of the policy's infer_batch rows (LMPolicy), else batch_size."""
    import torch
    batch_size = getattr(policy, "infer_batch", None) or batch_size
    fn = policy.token_logprobs if per_token else policy.logprobs
    out = []
    with torch.no_grad():
        for s in range(0, len(samples), batch_size):
            rows = torch.arange(s, min(s + batch_size, len(samples)))
            out.append(fn(samples.select(rows)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def resume_args(args_cls, args, argv):
    """--resume DIR: the args of the run in DIR (its args.json), checked against DIR and the flags given with it."""
    d = os.path.normpath(args.resume)
    this = os.path.basename(sys.argv[0])
    if not d.endswith(".incomplete") and os.path.isdir(d + ".incomplete"):
        d += ".incomplete"
    if not os.path.isdir(d):
        fail(f"--resume {d}: not a folder")
    if not os.path.isfile(os.path.join(d, "args.json")) or not os.path.isfile(os.path.join(d, "run.json")):
        fail(f"--resume {d}: not a run folder (no args.json / run.json)")
    if not d.endswith(".incomplete"):
        fail(f"--resume {d}: a finished run (its folder was renamed into place); there is nothing to resume")
    def read(name):
        try:
            with open(os.path.join(d, name)) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            fail(f"--resume {d}: {name} is unreadable ({e})")
    script = read("run.json").get("script")
    if script != this:
        fail(f"--resume {d}: a run of {script}, not of {this}")
    stored = read("args.json")
    if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
        fail(f"--resume {d}: no metrics.jsonl")
    if os.path.isfile(os.path.join(d, "latest.json")):
        latest = read("latest.json")
        ckpt = os.path.join(d, str(latest.get("checkpoint")))
        with open(os.path.join(d, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
        if not os.path.isfile(os.path.join(ckpt, "state.json")) or len(lines) < latest.get("metrics_lines", 0):
            fail(f"--resume {d}: latest.json names {ckpt}, which is not a complete checkpoint")
    names = {f.name: f for f in dataclasses.fields(args_cls)}
    unknown = sorted(set(stored) - set(names))
    if unknown:
        fail(f"--resume {d}: its args.json has flags {this} does not take ({', '.join(unknown)})")
    given = set()
    for tok in argv:
        if tok.startswith("--"):
            name = tok[2:].split("=", 1)[0].replace("-", "_")
            if name.startswith("no_") and name[3:] in names:
                name = name[3:]
            given.add(name)
    for name in sorted(given - {"resume"}):
        if name in names and getattr(args, name) != stored.get(name):
            fail(f"--resume {d}: --{name.replace('_', '-')} {getattr(args, name)} contradicts the run's args.json "
                 f"({stored.get(name)})")
    out = args_cls(**stored)
    out.resume = d
    return out


def cli(main, args_cls, argv=None):
    """`python <script>.py …`: parse the flags into args_cls (--resume: the run's own args.json) and run main(args).
    SIGINT / SIGTERM raise Interrupted in the loop: the run folder keeps its last complete iteration, one line names
    the command that resumes it, exit status 128 + signal. A judge that fails mid-run (common.judges.JudgeError, e.g. a
    py: function that returns a wrong value) ends the run with one line and exit status 2; the run folder stays
    <dir>.incomplete, never renamed into place."""
    import signal

    from common.chat import ChatError
    from common.judges import JudgeError
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(args_cls, argv)
    if args.resume is not None:
        args = resume_args(args_cls, args, argv)

    def interrupt(signum, frame):
        raise Interrupted(signum)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, interrupt)
    try:
        return main(args)
    except (JudgeError, ChatError) as e:   # a judge that fails, or a template that refuses a conversation, mid-run
        fail(str(e))
    except Interrupted as e:
        for s in (signal.SIGINT, signal.SIGTERM):   # a second signal now would interrupt this message
            signal.signal(s, signal.SIG_IGN)
        name = signal.Signals(e.signum).name
        run = _ACTIVE_RUN[-1] if _ACTIVE_RUN else None
        if run is not None and run.finished:
            print(f"\ninterrupted ({name}) after the run finished: {run.path}", file=sys.stderr)
        elif run is not None:
            print(f"\ninterrupted ({name}): {run.iteration} iteration(s) complete in {run.tmp}; continue with: "
                  f"python {os.path.basename(sys.argv[0])} --resume {run.tmp}", file=sys.stderr)
        else:
            print(f"\ninterrupted ({name}) before the run started; nothing was written", file=sys.stderr)
        raise SystemExit(128 + e.signum)
