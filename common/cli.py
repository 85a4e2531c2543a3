"""The command line every script shares: its Args dataclass -> flags, one-line errors, --resume, signals.

    @dataclass
    class Args(WorldArgs):                           # common/world.py: the flags every script takes
        iterations: int | None = flag(lm=6, tabular=60, ge=1)
        \"\"\"T of Algorithm 1\"\"\"                       # the string under a field is its --help
        pairs: Literal["all", "iid"] = "all"         # choices
    if __name__ == "__main__":
        cli(main, Args)                              # parse (or --resume), catch signals, run main(args)

A field is the flag --field-name (a bool: --flag / --no-flag). Its choices come from a Literal type and its bounds
and defaults from flag(); both are checked when the Args is built (from the command line or in Python), so a bad
value never reaches main(). A default that depends on the world (arena, real checkpoint or tabular: common/world.py)
or on other flags is resolved, once, by resolve_defaults(), which setup_world() calls before anything is loaded; --help
prints each one as "6 (arena, real) / 60 (tabular)". Bad input gets one line on stderr naming the flag, and exit
status 2 (argparse's convention).
"""
import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import signal
import sys
import textwrap
import typing

from common.chat import ChatError
from common.judges import JudgeError

WORLDS = ("arena", "real", "tabular")   # the kinds of world a default may depend on (common/world.py)
active_runs = []   # the RunDir of this process once its folder exists (common/run.py): mid-run errors, interrupts


def fail(msg: str, code: int = 2):
    """One line on stderr, non-zero exit. Called before anything is written, or mid-run: then the line starts after
    the progress bar's (tqdm writes no newline while it runs)."""
    print(f"{chr(10) if active_runs else ''}error: {msg}", file=sys.stderr)
    raise SystemExit(code)


BETA = ("the world's β", lambda args, beta: beta)   # rule of a regularization that defaults to the metrics' β


def flag(default=None, *, lm=None, arena=None, real=None, tabular=None, lora=None, rule=None, ge=None, gt=None):
    """A dataclass field for a flag whose default or bounds need saying. default: its value when not given, else
    the per-world defaults lm (= arena and real), arena, real, tabular (or, when --lora-rank trains adapters, those of
    the dict `lora`, world -> value), else rule = (text for --help, fn(args, β) -> value), evaluated in field order
    once the per-world defaults are in (BETA: the world's β). A given value must satisfy ge (≥) and gt (>)."""
    per_world = {k: v for k, v in (("arena", lm), ("real", lm), ("arena", arena), ("real", real),
                                   ("tabular", tabular)) if v is not None}
    return dataclasses.field(default=default, metadata={"per_world": per_world, "lora": lora, "rule": rule, "ge": ge,
                                                        "gt": gt})


def _meta(f, key):
    return f.metadata.get(key) if f.metadata else None


def _choices(f):
    """The Literal[...] choices of a field (Optional[Literal[...]] too), or None."""
    for t in (f.type, *typing.get_args(f.type)):
        if typing.get_origin(t) is typing.Literal:
            return typing.get_args(t)
    return None


def _name(f):
    return "--" + f.name.replace("_", "-")


def check_fields(args):
    """Each field's choices and bounds (None: a default still to be resolved)."""
    for f in dataclasses.fields(args):
        v, choices = getattr(args, f.name), _choices(f)
        if v is None:
            continue
        if choices is not None and v not in choices:
            fail(f"{_name(f)} {v!r}: expected {', '.join(map(str, choices[:-1]))} or {choices[-1]}")
        ge, gt = _meta(f, "ge"), _meta(f, "gt")
        if (ge is not None and not v >= ge) or (gt is not None and not v > gt):
            fail(f"{_name(f)} {v}: must be {'≥ ' + str(ge) if ge is not None else '> ' + str(gt)}")


def resolve_defaults(args, kind: str, beta: float):
    """Fill the fields left None with their defaults in world `kind` (one of WORLDS), then with their rules (field
    order); then args.check(), the checks between flags, which raises ValueError."""
    for f in dataclasses.fields(args):
        if getattr(args, f.name) is None and kind in (_meta(f, "per_world") or {}):
            lora = _meta(f, "lora") if getattr(args, "lora_rank", 0) else None
            setattr(args, f.name, (lora or f.metadata["per_world"])[kind])
    for f in dataclasses.fields(args):
        if getattr(args, f.name) is None and _meta(f, "rule"):
            setattr(args, f.name, f.metadata["rule"][1](args, beta))
    check_fields(args)
    args.check()


def default_text(f) -> str:
    """What --help says of a field's default: the value, per world "6 (arena, real) / 60 (tabular)", or a rule."""
    per_world = _meta(f, "per_world") or {}
    parts = [f"{v} ({', '.join(k for k in WORLDS if per_world.get(k) == v)})"
             for v in dict.fromkeys(per_world.values())]
    if _meta(f, "rule") or len(parts) and len(per_world) < len(WORLDS):
        parts.append(f.metadata["rule"][0] if _meta(f, "rule") else "none")
    if not parts:
        return "" if f.default is None else f"default: {f.default}"
    lora = _meta(f, "lora") or {}
    return "default: " + " / ".join(parts) + ("; with --lora-rank " + " / ".join(f"{v} ({k})" for k, v in lora.items())
                                               if lora else "")


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
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def parse_args(cls, argv=None):
    """Build a dataclass instance from the command line: --field-name VALUE, --flag / --no-flag for bools."""
    docs = _field_docs(cls)
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]   # the script's first docstring line
    p = _Parser(description=doc)
    for f in dataclasses.fields(cls):
        help_ = " ".join(x for x in (docs.get(f.name, ""), f"({default_text(f)})" if default_text(f) else "") if x)
        if bool in (f.type, *typing.get_args(f.type)):
            p.add_argument(_name(f), default=f.default, action=argparse.BooleanOptionalAction, help=help_)
        else:
            base = next((t for t in (f.type, *typing.get_args(f.type)) if t in (int, float, str)), str)
            p.add_argument(_name(f), type=_typed(base, _name(f)), default=f.default, help=help_.replace("%", "%%"))
    return cls(**vars(p.parse_args(argv)))


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


class Interrupted(BaseException):
    """SIGINT / SIGTERM, raised by cli()'s handler in the main loop: nothing is finished half-way. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way (a user's py: judge) takes it for an error."""
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


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
    the command that resumes it, exit status 128 + signal. An error that only shows mid-run (a judge that fails, a
    template that refuses a conversation: a ValueError of common.judges.JudgeError or common.chat.ChatError) ends the
    run with one line and exit status 2; the run folder stays <dir>.incomplete, never renamed into place."""
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
    except (JudgeError, ChatError) as e:
        fail(str(e))
    except Interrupted as e:
        for s in (signal.SIGINT, signal.SIGTERM):   # a second signal now would interrupt this message
            signal.signal(s, signal.SIG_IGN)
        name = signal.Signals(e.signum).name
        run = active_runs[-1] if active_runs else None
        if run is not None and run.finished:
            print(f"\ninterrupted ({name}) after the run finished: {run.path}", file=sys.stderr)
        elif run is not None:
            print(f"\ninterrupted ({name}): {run.iteration} iteration(s) complete in {run.tmp}; continue with: "
                  f"python {os.path.basename(sys.argv[0])} --resume {run.tmp}", file=sys.stderr)
        else:
            print(f"\ninterrupted ({name}) before the run started; nothing was written", file=sys.stderr)
        raise SystemExit(128 + e.signum)
