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



def fail(msg: str, code: int = 2):
    """One line on stderr, non-zero exit. Call before anything is written."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        fail(f"{message} (see --help)")


def _field_docs(cls) -> dict:
    """The string literal written under each dataclass field (cleanrl's Args convention)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) \
                and isinstance(b.value.value, str):
            docs[a.target.id] = b.value.value
    return docs


def parse_args(cls, argv=None):
    """Build a dataclass instance from the command line: --field-name VALUE, --flag / --no-flag for bools."""
    docs = _field_docs(cls)
    p = _Parser(description=(cls.__doc__ or "").strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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


class RunDir:
    """runs/<algo>__<seed>__<time>/ with args.json and metrics.jsonl. Lives at <path>.incomplete until
    finish() renames it, so an interrupted run never looks like a finished one."""

    def __init__(self, args, algo: str):
        self.path = args.run_dir or os.path.join("runs", f"{algo}__{args.seed}__{int(time.time())}")
        if os.path.exists(self.path):
            fail(f"--run-dir {self.path}: already exists")
        self.tmp = self.path + ".incomplete"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        with open(os.path.join(self.tmp, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
        self._metrics = open(os.path.join(self.tmp, "metrics.jsonl"), "w")

    def file(self, name: str) -> str:
        """Path inside the (still incomplete) run dir."""
        return os.path.join(self.tmp, name)

    def log(self, row: dict):
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def finish(self) -> str:
        self._metrics.close()
        os.replace(self.tmp, self.path)
        return self.path


# ---- the three worlds of DESIGN.md ---------------------------------------------------------------------

@dataclasses.dataclass
class World:
    """Everything an algorithm's loop needs, built and validated before any file is written."""
    policy: object          # TabularPolicy | LMPolicy (common/policy.py): the one being trained
    ref: object             # frozen π_ref (the SFT model / the games file's ref)
    judge: object           # common/judges.py
    games: object           # common.arena.Games used for exact evaluation, or None (real-checkpoint world)
    prompts: list           # training prompts: Game objects (arena / tabular) or strings (--prompts file)
    eval_prompts: list      # prompts of the sampled evaluation (real-checkpoint world only)
    beta: float             # the games file's β: the regularization the metrics measure (0.1 without games)
    device: str
    generator: object       # torch.Generator: every random draw of the run
    ref_dist: list = None   # π_ref's exact distribution over the games (LM), computed on the first evaluate()

    def autocast(self):
        """bf16 autocast on CUDA (weights stay fp32: the optimizer state is exact); nothing on CPU."""
        import contextlib
        import torch
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda") \
            else contextlib.nullcontext()

    def evaluate(self, policy, n_samples=1) -> dict:
        """Exact arena metrics (contract 4) when there is a games file; otherwise eval/win_vs_ref estimated by
        the judge on eval_prompts, one response per prompt from π and from π_ref (a fixed seed per call)."""
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
            g = torch.Generator(device=self.generator.device).manual_seed(12345)
            a = policy.sample(self.eval_prompts, n_samples, generator=g)
            b = self.ref.sample(self.eval_prompts, n_samples, generator=g)
            return {"eval/win_vs_ref": float(self.judge.prob(a.prompts, a.texts, b.texts).mean())}


def read_prompts(path) -> list:
    """A .jsonl file with one {"prompt": "..."} object per line (blank lines skipped)."""
    out = []
    try:
        with open(path) as f:
            for k, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{k}: not a JSON object") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                    raise ValueError(f'{path}:{k}: expected {{"prompt": "<non-empty text>"}}')
                out.append(obj["prompt"])
    except FileNotFoundError:
        raise ValueError(f"--prompts {path}: file not found") from None
    if not out:
        raise ValueError(f"--prompts {path}: no prompts")
    return out


def setup_world(args) -> World:
    """The world selected by --policy / --model / --judge / --prompts / --games (DESIGN.md, three worlds).
    Any bad input ends here with one line on stderr and exit status 2, before a file is written."""
    import random

    import numpy as np
    import torch

    from common.arena import ARENA_DIR, GAMES_PATH, GamesError, load_games
    from common.judges import ArenaJudge, make_judge
    from common.policy import LMPolicy, TabularPolicy

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads < 1:
        fail(f"--threads {args.threads}: must be ≥ 1")
    torch.set_num_threads(args.threads)
    try:
        if args.policy not in ("lm", "tabular"):
            raise ValueError(f"--policy {args.policy!r}: expected 'lm' or 'tabular'")
        games = load_games(args.games or GAMES_PATH) if (args.prompts is None or args.games) else None
        if args.policy == "tabular":
            if args.prompts is not None or args.model is not None:
                raise ValueError("--policy tabular takes its actions from --games; --prompts/--model do not apply")
            policy = TabularPolicy(games).to(device)
        else:
            policy = LMPolicy.load(args.model or ARENA_DIR, device=device)
        judge = make_judge(args.judge, games, device=device)
        if args.prompts is not None:
            prompts = read_prompts(args.prompts)
            eval_prompts = prompts[:64]
        else:
            prompts = list(games.select(split="train")) or list(games)
            eval_prompts = []
        if args.prompts is not None and isinstance(judge, ArenaJudge):
            unknown = [p for p in prompts if p not in judge.by_prompt]
            if unknown:
                raise ValueError(f"--judge arena knows only the prompts of {judge.games.path}; {args.prompts} has "
                                 f"{unknown[0]!r} (use --judge rm:DIR)")
    except (GamesError, ValueError, KeyError, FileNotFoundError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        fail(str(msg))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    return World(policy=policy, ref=policy.frozen_copy(), judge=judge, games=games, prompts=prompts,
                 eval_prompts=eval_prompts, beta=games.beta if games is not None else 0.1, device=device,
                 generator=gen)


def comparison_table(before: dict, after: dict, games) -> str:
    """Plain table of SFT (before) vs trained (after): one row per split and split/family, then all."""
    from common.arena import METRICS
    if games is None:
        keys = [""]
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


def batched_logprobs(policy, samples, batch_size=256):
    """ℓ(y|x) of every row of `samples` under a frozen policy, in batches, no grad: (B,) on CPU."""
    import torch
    out = []
    with torch.no_grad():
        for s in range(0, len(samples), batch_size):
            rows = torch.arange(s, min(s + batch_size, len(samples)))
            out.append(policy.logprobs(samples.select(rows)).cpu())
    return torch.cat(out) if out else torch.zeros(0)
