"""The run: its folder, metrics, checkpoints and resume, and the plumbing around each iteration of a script's loop.

    run = RunDir(args, "inpo", world, {"policy": policy})   # runs/<algo>__<seed>__<time>.incomplete/, or --resume's
                                         # last complete iteration restored (run.restored: the algorithm's state)
    for t in run.iterations():           # the iterations still to run, with a progress bar
        with run.timed("sample"): ...    # perf/sample_s of this iteration's row
        run.end_iteration(t, {"train/loss": loss, ...})   # NaN check, evaluation, metrics line, checkpoint
    return run.finish(policy.save)       # the policy saved at the folder's root, renamed into place, table printed

The folder holds args.json, run.json and metrics.jsonl (one JSON object per evaluation, keys in docs/metrics.md) and
lives at <path>.incomplete until finish() renames it, so an interrupted run never looks like a finished one.
"""
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from common.arena import METRICS, split_keys
from common.cli import active_runs, fail
from common.files import atomic_dir, write_atomic
from common.policy import Samples


class RunDir:
    """runs/<algo>__<seed>__<time>/ (or --run-dir) for one run of a script.

    After every iteration a complete checkpoint-<t>/ (each player, every generator's state, the algorithm's extra
    state) is written, then latest.json points at it: a crash or a signal at any point leaves a complete checkpoint,
    from which --resume continues bitwise (CPU); metrics.jsonl is cut back to its rows (docs/internals.md).
    players: name -> policy, every policy the run trains (checkpointed; gradients freed after each iteration).
    evaluated: metrics prefix -> (policy, title), the policies each evaluation scores (default: the first player as
    eval/…); the title heads its table when there are several."""

    def __init__(self, args, algo: str, world, players: dict, evaluated: dict = None):
        self.args, self.algo, self.world, self.players = args, algo, world, players
        self.evaluated = evaluated or {"eval": (next(iter(players.values())), None)}
        self.generators = {"sample": world.generator, "shuffle": world.shuffle_generator}
        self.rows, self.iteration, self.finished, self.perf = [], 0, False, {}
        if args.resume:
            self.tmp = os.path.normpath(args.resume)
            self.path = self.tmp[:-len(".incomplete")]
            self._latest = self._read_latest()
            keep = self._latest["metrics_lines"] if self._latest else 0
            with open(os.path.join(self.tmp, "metrics.jsonl")) as f:   # the checkpoint's rows; a later line may be cut
                self.rows = [json.loads(line) for line in f.read().splitlines()[:keep]]
            write_atomic(os.path.join(self.tmp, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in self.rows))
        else:
            self._latest = None
            self.path = args.run_dir or os.path.join("runs", f"{algo}__{args.seed}__{int(time.time())}")
            self.tmp = self.path + ".incomplete"
            if os.path.exists(self.path):
                fail(f"--run-dir {self.path}: already exists")
            if os.path.exists(self.tmp):
                fail(f"--run-dir {self.path}: an interrupted run is there; continue it with --resume {self.tmp} or "
                     f"delete the folder")

            def write(staging):
                with open(os.path.join(staging, "args.json"), "w") as f:
                    json.dump(dataclasses.asdict(args), f, indent=2)
                with open(os.path.join(staging, "run.json"), "w") as f:
                    json.dump({"algo": algo, "script": os.path.basename(sys.argv[0])}, f)
                open(os.path.join(staging, "metrics.jsonl"), "w").close()
            atomic_dir(self.tmp, write)   # the folder appears whole, or not at all
        self._metrics = open(os.path.join(self.tmp, "metrics.jsonl"), "a")
        active_runs.append(self)
        self.restored = self._start()

    def file(self, name: str) -> str:
        """Path inside the (still incomplete) run dir."""
        return os.path.join(self.tmp, name)

    # ---- the loop ---------------------------------------------------------------------------------------

    def _start(self) -> dict:
        """A resumed run: load the last complete checkpoint; returns its extra state (name -> tensor or Samples). A
        fresh run: log iteration 0, the evaluation of π_ref (every player starts there; it is evaluated once);
        returns {}."""
        if self._latest is not None:
            return self._restore()
        if not self.rows:
            metrics = self.world.evaluate(next(iter(self.evaluated.values()))[0])
            row = {"iteration": 0, **metrics}
            for prefix in list(self.evaluated)[1:]:
                row.update({k.replace("eval/", prefix + "/", 1): v for k, v in metrics.items()})
            self._log(row)
        return {}

    def iterations(self):
        """The loop's iteration numbers after the last complete one, 1-based, with a tqdm bar."""
        total = self.args.iterations
        self.bar = tqdm(range(self.iteration + 1, total + 1), desc=self.algo, unit="iter", initial=self.iteration,
                        total=total)
        return self.bar

    @contextlib.contextmanager
    def timed(self, name: str):
        """Wall time of the block, as perf/<name>_s of this iteration's row."""
        t0 = time.perf_counter()
        yield
        self.perf[f"perf/{name}_s"] = time.perf_counter() - t0

    def end_iteration(self, t: int, row: dict, extra: dict = None):
        """After iteration t's update: stop on a NaN or inf (check_finite), free the players' gradients, evaluate,
        log `row` (train/… values; tensors become floats) with the metrics and the timings, checkpoint (extra: the
        algorithm's own state, name -> tensor or Samples), update the bar."""
        self.check_finite(t, [v for k, v in row.items() if k.startswith("train/") and v is not None])
        for player in self.players.values():
            player.zero_grad(set_to_none=True)   # the gradients' memory is free for sampling and evaluation
        with self.timed("eval"):
            for prefix, (policy, _) in self.evaluated.items():
                row.update({k.replace("eval/", prefix + "/", 1): v for k, v in self.world.evaluate(policy).items()})
        row = {"iteration": t, **{k: float(v) if torch.is_tensor(v) else v for k, v in row.items()}, **self.perf}
        self.perf = {}
        self._log(row)
        self._checkpoint(t, extra)
        self.bar.set_postfix({k.split("/")[-1]: f"{row[k]:.4f}" for k in ("eval/dual_gap", "eval/win_vs_ref")
                              if k in row})

    def check_finite(self, iteration: int, losses):
        """Stop the run, one line, when a loss or a parameter is NaN or inf (one host sync per iteration). The last
        good checkpoint stays; nothing of this iteration is saved, and the folder is never renamed into place."""
        params = [p for pl in self.players.values() for p in pl.parameters()]
        dev = params[0].device if params else "cpu"
        flags = [torch.isfinite(torch.as_tensor(x, device=dev)).all() for x in losses]
        flags += [torch.isfinite(p).all() for p in params]
        if flags and not bool(torch.stack(flags).all()):     # the one sync
            kept = f"iteration {self.iteration}'s checkpoint is kept" if self._latest else "no iteration was complete"
            fail(f"iteration {iteration}: a loss or a parameter is NaN or inf; the run stopped ({kept} in "
                 f"{self.tmp}; try a smaller --lr)", code=3)

    def finish(self, save) -> str:
        """save(folder) writes the final policy into the run folder; then the folder is renamed into place and the
        checkpoints removed from it (a signal at any point leaves either an interrupted run that resumes or a finished
        one), and the table of π_ref against the trained policy is printed. Returns the folder."""
        save(self.tmp)
        self._metrics.close()
        os.replace(self.tmp, self.path)
        self.finished = True
        for name in os.listdir(self.path):
            if name.startswith((".checkpoint-", "checkpoint-")) or name.startswith("latest.json"):
                p = os.path.join(self.path, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        for prefix, (_, title) in self.evaluated.items():
            if len(self.evaluated) > 1:
                print(title)
            before, after = ({"eval/" + k[len(prefix) + 1:]: v for k, v in r.items() if k.startswith(prefix + "/")}
                             for r in (self.rows[0], self.rows[-1]))
            print(comparison_table(before, after, self.world.games))
        print(f"run dir: {self.path}")
        return self.path

    # ---- metrics and checkpoints ------------------------------------------------------------------------

    def _log(self, row: dict):
        self.rows.append(row)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def _read_latest(self):
        f = os.path.join(self.tmp, "latest.json")
        if not os.path.isfile(f):
            return None
        with open(f) as fh:
            return json.load(fh)

    def _checkpoint(self, iteration: int, extra: dict = None):
        """Save the run's state after `iteration` (class docstring)."""
        name = f"checkpoint-{iteration}"
        final = os.path.join(self.tmp, name)
        shutil.rmtree(final, ignore_errors=True)       # a half-written one from an earlier, interrupted attempt
        tmp = os.path.join(self.tmp, f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for key, player in self.players.items():
            player.save_checkpoint(os.path.join(tmp, key))
        tensors = {f"generator/{k}": g.get_state() for k, g in self.generators.items()}
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
        write_atomic(os.path.join(self.tmp, "latest.json"), json.dumps(latest))
        if self._latest and self._latest["checkpoint"] != name:
            shutil.rmtree(os.path.join(self.tmp, self._latest["checkpoint"]), ignore_errors=True)
        self._latest, self.iteration = latest, iteration

    def _restore(self) -> dict:
        """Load the last complete checkpoint into the players and generators; returns its extra state."""
        d = os.path.join(self.tmp, self._latest["checkpoint"])
        for key, player in self.players.items():
            player.load_checkpoint(os.path.join(d, key))
        tensors = load_file(os.path.join(d, "state.safetensors"))
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
        for k, g in self.generators.items():
            g.set_state(tensors[f"generator/{k}"])
        torch.set_rng_state(tensors["generator/torch_global"])
        extra = {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}
        device = next(p for pl in self.players.values() for p in pl.parameters()).device
        for key, lists in state["samples"].items():
            pre = f"samples/{key}/"
            extra[key] = Samples.from_state({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, lists,
                                            device)
        for name in os.listdir(self.tmp):  # half-written checkpoints of the interrupted attempt
            if name.startswith((".checkpoint-", "checkpoint-")) and name != self._latest["checkpoint"]:
                shutil.rmtree(os.path.join(self.tmp, name), ignore_errors=True)
        self.iteration = self._latest["iteration"]
        return extra


SAMPLED_METRICS = ("win_vs_ref", "len", "truncated", "empty", "bucket_kl_ne")


def comparison_table(before: dict, after: dict, games) -> str:
    """Plain table of π_ref (before) vs the trained policy (after): one row per split and split/family, then all
    (arena, tabular); one row of the sampled metrics (real-checkpoint world)."""
    if games is None:
        keys, metrics = [""], [m for m in SAMPLED_METRICS if f"eval/{m}" in after]
    else:
        keys, metrics = ["/" + k for k in split_keys(games)] + [""], [m for m in METRICS if f"eval/{m}" in after]
    head = f"{'split/family':<16}" + "".join(f"{m + ' sft→trained':>26}" for m in metrics)
    lines = [head, "-" * len(head)]
    for k in keys:
        cells = "".join(f"{before[f'eval/{m}{k}']:>12.4f} → {after[f'eval/{m}{k}']:<11.4f}" for m in metrics)
        lines.append(f"{(k[1:] or 'all'):<16}" + cells)
    return "\n".join(lines)
