"""The three worlds every script runs in, and the flags they share (WorldArgs).

    tabular  --policy tabular: one logit table per game of a games file; exact and fast, where the tests prove
             convergence to the regularized equilibrium
    arena    the default: a language model (data/arena, a tiny SFT transformer) on the arena's games, scored exactly
    real     --prompts FILE: a Hugging Face checkpoint (--model DIR) on chat prompts, scored by sampling against π_ref
             with a model or Python judge (--judge rm:DIR | pair:DIR | py:FILE.py:NAME)

setup_world(args) resolves the flags' defaults for the world (common.cli.resolve_defaults), checks every input and
builds what an algorithm's loop needs (World: the policy, π_ref, the judge, the prompts, the generators), before any
file is written; a bad input ends there with one error line and exit status 2. World.evaluate(policy) gives the
metrics of one evaluation: exact on a games file (common/arena.py), sampled otherwise (World.sampled_metrics).
"""
import contextlib
import random
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from common.arena import ARENA_DIR, GAMES_PATH, GamesError, evaluate, load_games
from common.chat import read_prompts
from common.cli import check_fields, fail, flag, resolve_defaults
from common.judges import make_judge
from common.lm_policy import LMPolicy
from common.policy import TabularPolicy

EVAL_SEED, REF_EVAL_SEED = 12345, 54321  # the sampled evaluation's draws: the same every iteration


@dataclass
class WorldArgs:
    """The flags every algorithm script shares: the world, the run, the device, memory. Each script's Args extends
    this dataclass with its algorithm's hyper-parameters only."""
    seed: int = 1
    """seed of every random draw (sampling, labels, minibatch order); CPU runs are bitwise reproducible"""
    policy: Literal["lm", "tabular"] = "lm"
    """lm (a causal LM; the arena SFT model by default) or tabular (one logit table per game)"""
    games: str | None = None
    """games file for evaluation, the tabular actions and the arena judge (default data/arena/games.json)"""
    model: str | None = None
    """HF-layout model folder to start from and regularize to (default data/arena, the arena SFT model)"""
    judge: str = "arena"
    """preference oracle: arena (the games' matrices), rm:DIR (a Bradley-Terry reward model folder), pair:DIR (a
    causal LM as a pairwise judge, RLHFlow format) or py:FILE.py:NAME (NAME(prompts, a, b) returns P(a ≻ b))"""
    prompts: str | None = None
    """.jsonl of {"prompt": ...} or {"messages": [...]} to train on (the real-checkpoint world; default: the games'
    train split)"""
    eval_prompts: str | None = None
    """.jsonl of held-out prompts for the sampled evaluation (real-checkpoint world; default: the first 64 training
    prompts)"""
    eval_samples: int = flag(4, ge=1)
    """responses per evaluation prompt from the policy and from π_ref (real-checkpoint world)"""
    chat_template: str = "auto"
    """auto (the checkpoint's own chat template; prompts stay raw when it has none), none (raw prompts: base models,
    prompts already formatted) or a .jinja file"""
    max_new_tokens: int | None = flag(ge=1)
    """longest sampled response in tokens (default: the checkpoint's generation_config.json, else 32)"""
    micro_batch: int | None = flag(real=16, ge=1)
    """rows per forward/backward pass: an optimizer step accumulates its micro-batches' gradients, equal to the one
    full-batch step (none: all of a step's rows at once)"""
    infer_batch: int | None = flag(real=32, ge=1)
    """rows per generate() call and per no-grad log-prob or judge pass (none: all of a call's rows at once, 256 rows
    per log-prob pass)"""
    grad_checkpoint: bool | None = flag(real=True, arena=False, tabular=False)
    """recompute each transformer block in backward instead of storing its activations (less memory, one more
    forward)"""
    lora_rank: int = flag(0, ge=0)
    """LoRA rank r: train low-rank adapters on the frozen model, π_ref = the model with the adapters off (0: full
    fine-tuning)"""
    lora_alpha: float | None = flag(gt=0, rule=("2 × --lora-rank", lambda a, beta: 2.0 * a.lora_rank or None))
    """LoRA α: the update is (α/r) B A"""
    lora_targets: str = "all"
    """comma-separated projections to adapt, as transformers names them (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    down_proj; GPT-2: c_attn,c_proj,c_fc), or all"""
    run_dir: str | None = None
    """output folder (default runs/<algo>__<seed>__<time>; algo sadpo for tanpo.py --single-agent)"""
    resume: str | None = None
    """continue the interrupted run in this folder (<run dir>.incomplete) from its last complete iteration, with its
    own args.json (other flags must agree with it)"""
    device: str | None = flag(rule=("cuda when available, else cpu",
                                    lambda a, beta: "cuda" if torch.cuda.is_available() else "cpu"))
    """cpu, cuda or cuda:N"""
    precision: Literal["fp32", "bf16"] | None = flag(rule=("bf16 on CUDA, fp32 on CPU", lambda a, beta:
                                                            "bf16" if a.device.startswith("cuda") else "fp32"))
    """bf16: the forward passes under bf16 autocast and the frozen models (π_ref, the judge, the LoRA base) in bf16;
    the trained weights stay fp32 either way"""
    threads: int | None = flag(lm=2, tabular=1, ge=1)
    """CPU threads of torch (sized for 2 cores; a table's tiny ops only wait on a second thread)"""

    def __post_init__(self):
        check_fields(self)   # choices and bounds, whether the Args comes from the command line or from Python

    def check(self):
        """The checks between flags, once the defaults are resolved (common.cli.resolve_defaults); a script's Args
        adds its own (calling this one first). Raises ValueError."""
        if self.eval_prompts is not None and (self.prompts is None or self.games is not None):
            raise ValueError("--eval-prompts applies to --prompts runs without --games (with a games file the "
                             "evaluation is exact, on its games)")
        if self.policy == "tabular" and (self.prompts is not None or self.model is not None or self.lora_rank):
            raise ValueError("--policy tabular takes its actions from --games; --prompts/--model/--lora-rank do not "
                             "apply")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: this torch build or machine has no CUDA device")


def world_kind(args) -> str:
    """tabular, arena (an LM on the games' prompts) or real (an LM on a --prompts file)."""
    return "tabular" if args.policy == "tabular" else "real" if args.prompts is not None else "arena"


def frozen_dtype(precision):
    """dtype of the frozen models' weights: bf16 with --precision bf16, where every pass runs under bf16 autocast (a
    model judge and a LoRA base are cast whole; π_ref of full fine-tuning only its Linear weights, LMPolicy.frozen_copy,
    so that it computes what the fp32 policy computes); None (unchanged) with fp32. Trained weights stay fp32."""
    return torch.bfloat16 if precision == "bf16" else None


@dataclass
class World:
    """Everything an algorithm's loop needs, built and validated before any file is written."""
    kind: str               # tabular, arena or real (world_kind)
    policy: object          # TabularPolicy | LMPolicy: the one being trained
    ref: object             # frozen π_ref (the SFT model / the games file's ref)
    judge: object           # common/judges.py
    games: object           # common.arena.Games used for exact evaluation, or None (real-checkpoint world)
    prompts: list           # training prompts: Game objects (arena / tabular) or Conversations (--prompts file)
    eval_prompts: list      # prompts of the sampled evaluation (real-checkpoint world only)
    beta: float             # the games file's β: the regularization the metrics measure (0.1 without games)
    device: str
    precision: str          # fp32 or bf16 (autocast)
    generator: object       # torch.Generator on the device: every sample and label of the run
    shuffle_generator: object  # torch.Generator on the CPU: minibatch orders
    eval_samples: int = 4   # responses per evaluation prompt (real-checkpoint world)
    ref_dist: list = None   # π_ref's exact distribution over the games (LM), computed on the first evaluate()
    ref_eval: object = None  # π_ref's evaluation samples (real-checkpoint world), drawn on the first evaluate()

    def autocast(self):
        """bf16 autocast with --precision bf16, on CPU as on CUDA (weights stay fp32: the optimizer state is exact);
        nothing with fp32."""
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16) if self.precision == "bf16" \
            else contextlib.nullcontext()

    def evaluate(self, policy) -> dict:
        """Exact arena metrics when there is a games file; otherwise sampled_metrics()."""
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


def setup_world(args) -> World:
    """The world selected by --policy / --model / --judge / --prompts / --games, with args' defaults resolved for it.
    Any bad input ends here with one line on stderr and exit status 2, before a file is written."""
    kind = world_kind(args)
    try:
        games = load_games(args.games or GAMES_PATH) if (args.prompts is None or args.games) else None
        resolve_defaults(args, kind, games.beta if games is not None else 0.1)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        device, frozen = args.device, frozen_dtype(args.precision)
        torch.set_num_threads(args.threads)
        if kind == "tabular":
            policy = TabularPolicy(games).to(device)
        else:   # full fine-tuning: fp32 master weights; LoRA: a frozen base in the frozen dtype, fp32 adapters
            targets = None if args.lora_targets == "all" else [t.strip() for t in args.lora_targets.split(",")]
            policy = LMPolicy.load(args.model or ARENA_DIR, device=device, max_new_tokens=args.max_new_tokens,
                                   chat_template=args.chat_template, infer_batch=args.infer_batch,
                                   dtype=(frozen or torch.float32) if args.lora_rank else torch.float32,
                                   lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=targets)
            policy.model.grad_checkpoint = args.grad_checkpoint
        judge = make_judge(args.judge, games, device=device, batch_size=args.infer_batch, dtype=frozen)
        if kind == "real":
            prompts = read_prompts(args.prompts)
            eval_prompts = read_prompts(args.eval_prompts, "--eval-prompts") if args.eval_prompts else prompts[:64]
        else:
            prompts, eval_prompts = list(games.select(split="train")) or list(games), []
        if kind != "tabular":   # renders and encodes each prompt once: a bad template or length ends here
            policy.check_prompts(prompts + eval_prompts)
        judge.check([p.prompt if hasattr(p, "prompt") else p for p in prompts + eval_prompts])
    except (GamesError, ValueError, KeyError, FileNotFoundError, OSError) as e:
        fail(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    if kind == "real" and policy.chat_template is None and args.chat_template == "auto":
        print(f"note: {args.model or ARENA_DIR} has no chat template: prompts are fed as raw text", file=sys.stderr)
    return World(kind=kind, policy=policy, ref=policy.frozen_copy(frozen, adapters=False), judge=judge, games=games,
                 prompts=prompts, eval_prompts=eval_prompts, beta=games.beta if games is not None else 0.1,
                 device=device, precision=args.precision,
                 generator=torch.Generator(device=device).manual_seed(args.seed),
                 shuffle_generator=torch.Generator().manual_seed(args.seed), eval_samples=args.eval_samples)
