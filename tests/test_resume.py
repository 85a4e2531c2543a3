"""Checkpoints and --resume, end to end, with real signals (the promise: after every iteration a run's folder holds a
complete checkpoint; --resume RUN_DIR continues with the run's args.json and ends bitwise equal (CPU) to a run never
stopped. SIGINT/SIGTERM leave the last complete iteration. A NaN stops the run with one line; a NaN policy is never
saved as the result.)

Every script (inpo, nash_mp, nash_dpo, tanpo, tanpo --single-agent) on both worlds (a tabular games file, the arena
LM): a run stopped by SIGTERM or SIGINT after a complete iteration, then resumed, ends with the same bytes as the
run never stopped. A run stopped before its first checkpoint starts again from scratch. A NaN stops the run and
keeps the last good checkpoint. Bad --resume input is refused with one line and touches nothing.

The uninterrupted reference runs are shared by the tests (one per script and world, started in the background next
to the run that is interrupted: the machine has two cores)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, random_P, read_metrics, run_script, write_arena4, write_games

ENV = dict(os.environ, PYTHONPATH=ROOT)
ITERATIONS = 3
COMMON = ["--threads", "1", "--iterations", str(ITERATIONS)]
SCRIPTS = {  # name -> (argv before the flags, the smallest arena-LM settings that still train)
    "inpo": (["inpo.py"], ["--samples-per-prompt", "4", "--epochs", "1"]),
    "nash_mp": (["nash_mp.py"], ["--samples-per-prompt", "2", "--opponent-samples", "2", "--inner-steps", "1"]),
    "nash_dpo": (["nash_dpo.py"], ["--samples-per-prompt", "2", "--groups-per-prompt", "1", "--epochs", "1"]),
    "tanpo": (["tanpo.py"], ["--pairs-per-prompt", "1", "--bonus-samples", "1", "--epochs", "1"]),
    "sadpo": (["tanpo.py", "--single-agent"], ["--pairs-per-prompt", "1", "--bonus-samples", "1", "--epochs", "1"]),
    "nash_mp_lora": (["nash_mp.py"], ["--samples-per-prompt", "2", "--opponent-samples", "2", "--inner-steps", "1",
                                      "--lora-rank", "4", "--lr", "0.01"]),     # LoRA: checkpoints hold the adapters
    "tanpo_lora": (["tanpo.py"], ["--pairs-per-prompt", "1", "--bonus-samples", "1", "--epochs", "1",
                                  "--lora-rank", "4", "--lr", "0.01"]),
}
LORA = {"nash_mp_lora", "tanpo_lora"}
TWO_PLAYERS = {"tanpo", "tanpo_lora"}
SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


# ---- helpers -----------------------------------------------------------------------------------------------

class Proc:
    """A script run in the background from the repo root (PYTHONPATH = the repo), its output in files."""

    def __init__(self, argv, log_dir, name):
        os.makedirs(log_dir, exist_ok=True)
        self.out, self.err = os.path.join(log_dir, name + ".out"), os.path.join(log_dir, name + ".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=out, stderr=err)
        self.pid = self.p.pid

    def running(self):
        return self.p.poll() is None

    def wait(self, timeout=600):
        """(exit status, stdout, stderr)"""
        rc = self.p.wait(timeout=timeout)
        with open(self.out) as f, open(self.err) as g:
            return rc, f.read(), g.read()


def read_latest(inc):
    try:
        with open(os.path.join(inc, "latest.json")) as f:  # replaced atomically: never half-written
            return json.load(f)
    except FileNotFoundError:
        return None


def wait_for(proc, cond, timeout=300):
    """Poll cond() every millisecond while proc runs; True once it holds, False if proc ended first."""
    t0 = time.monotonic()
    while proc.running():
        if cond():
            return True
        assert time.monotonic() - t0 < timeout, "timed out waiting for the run"
        time.sleep(0.001)
    return False


def lines_of(err):
    """stderr's non-empty lines (a tqdm bar's redraws are separated by \\r)."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip()]


def files_of(d):
    """{relative path: bytes} of every file under d, and its folders' relative paths."""
    files, dirs = {}, []
    for root, ds, fs in os.walk(d):
        dirs += [os.path.relpath(os.path.join(root, x), d) for x in ds]
        for x in fs:
            p = os.path.join(root, x)
            with open(p, "rb") as f:
                files[os.path.relpath(p, d)] = f.read()
    return files, sorted(dirs)


def rows_without_perf(run_dir):
    """metrics.jsonl without the perf/* timings, as JSON text (NaN compares equal to NaN)."""
    return [json.dumps({k: v for k, v in row.items() if not k.startswith("perf/")}, sort_keys=True)
            for row in read_metrics(run_dir)]


def interrupt_message(script, inc, sig):
    return re.compile(rf"interrupted \({SIGNALS[sig]}\): (\d+) iteration\(s\) complete in {re.escape(inc)}; "
                      rf"continue with: python {re.escape(script)} --resume {re.escape(inc)}")


def argv_of(name, world, games):
    head, lm_flags = SCRIPTS[name]
    if world == "tabular":
        return head + COMMON + ["--policy", "tabular", "--games", games["tabular"]]
    return head + COMMON + lm_flags + ["--games", games["lm"]]


def players_of(name):
    return ["max_player", "min_player"] if name in TWO_PLAYERS else ["policy"]


def result_files(name, world):
    """The trained policies a finished run holds at its root."""
    if world == "tabular":
        return ["policy.json"] + (["policy_max.json"] if name in TWO_PLAYERS else [])
    files = ["model.safetensors"] + (["adapter/adapter_model.safetensors"] if name in LORA else [])
    return files + [os.path.join("max_player", f) for f in files if name in TWO_PLAYERS]


def assert_finished_like(ref, d, name, world, moved=False):
    """d (resumed) is the finished run ref (never stopped): the same files, bit for bit; args.json the same but for
    --run-dir (which names d, unless the interrupted folder was moved there); metrics.jsonl the same rows but for
    perf/*; no checkpoint left behind."""
    assert os.path.isdir(d) and not os.path.exists(d + ".incomplete")
    leftovers = [p for p in os.listdir(d) if p.startswith((".", "checkpoint-", "latest.json"))]
    assert leftovers == [], leftovers
    (ref_files, ref_dirs), (files, dirs) = files_of(ref), files_of(d)
    assert sorted(files) == sorted(ref_files) and dirs == ref_dirs
    for f in result_files(name, world):
        assert f in files, f
    for f in files:
        if f not in ("args.json", "metrics.jsonl"):
            assert files[f] == ref_files[f], f"{f} differs from the uninterrupted run's"
    ref_args, args = json.loads(ref_files["args.json"]), json.loads(files["args.json"])
    assert ref_args.pop("run_dir") == ref and (args.pop("run_dir") == d or moved)
    assert args == ref_args
    assert [row["iteration"] for row in read_metrics(d)] == list(range(ITERATIONS + 1))
    assert rows_without_perf(d) == rows_without_perf(ref)


class References:
    """The uninterrupted runs, one per (script, world), each started once in the background and shared."""

    def __init__(self, root):
        self.root, self.procs = root, {}

    def start(self, name, world, argv):
        key = f"{name}-{world}"
        if key not in self.procs:
            d = os.path.join(self.root, key)
            self.procs[key] = (d, Proc(argv + ["--run-dir", d], os.path.join(self.root, "logs"), key))
        return key

    def get(self, key):
        d, proc = self.procs[key]
        rc, _, err = proc.wait()
        assert rc == 0, err[-2000:]
        return d


@pytest.fixture(scope="session")
def games(tmp_path_factory):
    """The tabular games (conftest.random_games: three random 10-action games, β = 0.1, non-uniform refs) and a
    4-game arena (one train game of each family of data/arena/games.json: the LM's prompts are arena prompts)."""
    root = tmp_path_factory.mktemp("games")
    rng = np.random.default_rng(0)
    Ps = [random_P(10, rng) for _ in range(3)]
    refs = [rng.dirichlet(np.ones(10)) + 0.01 for _ in range(3)]
    refs = [r / r.sum() for r in refs]
    tabular = write_games(root / "games.json", Ps, refs=refs)
    return {"tabular": tabular, "lm": write_arena4(root / "arena4.json")}


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    refs = References(str(tmp_path_factory.mktemp("references")))
    yield refs
    for _, proc in refs.procs.values():
        if proc.running():
            proc.p.kill()
            proc.p.wait()


def interrupt(argv, log_dir, d, sig, after=1, attempts=4):
    """Run argv with --run-dir d and send it `sig` once d.incomplete's latest.json shows iteration `after` complete.
    A tabular iteration takes milliseconds: when the run finished before the signal came (or the signal landed after
    the folder was renamed into place), it is run again in a fresh folder. Returns (folder, exit status, stderr)."""
    for attempt in range(attempts):
        run_dir = f"{d}{attempt}"
        inc = run_dir + ".incomplete"
        proc = Proc(argv + ["--run-dir", run_dir], log_dir, os.path.basename(run_dir))
        sent = wait_for(proc, lambda: (read_latest(inc) or {}).get("iteration", 0) >= after)
        if sent:
            os.kill(proc.pid, sig)
        rc, _, err = proc.wait()
        if not sent or (os.path.isdir(run_dir) and not os.path.exists(inc)):  # the race was lost: again
            assert rc in (0, 128 + sig), err[-2000:]
            shutil.rmtree(run_dir, ignore_errors=True)
            continue
        return run_dir, rc, err
    pytest.fail(f"the run always finished before {SIGNALS[sig]} arrived ({attempts} attempts)")


def check_interrupted(script, run_dir, rc, err, sig, players):
    """Exit status 128 + signal, the last stderr line names the resume command, the .incomplete folder holds
    latest.json and the complete checkpoint it names, no finished folder. Returns latest.json."""
    inc = run_dir + ".incomplete"
    assert rc == 128 + sig, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    last = lines_of(err)[-1]
    m = interrupt_message(script, inc, sig).fullmatch(last)
    assert m, last
    assert not os.path.exists(run_dir)
    latest = read_latest(inc)
    assert latest is not None and 1 <= latest["iteration"] <= ITERATIONS, latest
    assert int(m.group(1)) <= latest["iteration"]
    ckpt = os.path.join(inc, latest["checkpoint"])
    assert latest["checkpoint"] == f"checkpoint-{latest['iteration']}" and os.path.isdir(ckpt)
    with open(os.path.join(ckpt, "state.json")) as f:
        assert json.load(f)["iteration"] == latest["iteration"]
    assert os.path.isfile(os.path.join(ckpt, "state.safetensors"))
    for player in players:
        assert os.listdir(os.path.join(ckpt, player)), player
    assert len(read_metrics(inc)) >= latest["metrics_lines"] == latest["iteration"] + 1
    return latest


# ---- 1. every script, both worlds: a real signal after a complete iteration, then --resume -----------------

CASES = []
for i, name in enumerate(SCRIPTS):
    for j, world in enumerate(("lm",) if name in LORA else ("tabular", "lm")):
        sig = signal.SIGTERM if (i + j) % 2 == 0 else signal.SIGINT   # each script gets both signals
        CASES.append(pytest.param(name, world, sig, id=f"{name}-{world}-{SIGNALS[sig]}"))


@pytest.mark.parametrize("name,world,sig", CASES)
def test_interrupted_run_resumes_bitwise_equal(tmp_path, games, references, name, world, sig):
    argv = argv_of(name, world, games)
    key = references.start(name, world, argv)            # the run never stopped, alongside
    run_dir, rc, err = interrupt(argv, str(tmp_path / "logs"), str(tmp_path / "run"), sig)
    script = argv[0]
    latest = check_interrupted(script, run_dir, rc, err, sig, players_of(name))
    if name in LORA:   # a LoRA run's checkpoints hold its adapters, not the model
        for player in players_of(name):
            assert sorted(os.listdir(os.path.join(run_dir + ".incomplete", latest["checkpoint"], player))) == \
                ["adapter_config.json", "adapter_model.safetensors"]
    r = run_script(script, "--resume", run_dir + ".incomplete")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"run dir: {run_dir}" in r.stdout
    ref = references.get(key)
    assert_finished_like(ref, run_dir, name, world)
    if world == "lm":  # it trained: the weights moved off the SFT model's
        with open(os.path.join(ROOT, "data", "arena", "model.safetensors"), "rb") as f:
            assert files_of(ref)[0]["model.safetensors"] != f.read()


# ---- 2. stopped before the first checkpoint ------------------------------------------------------------------

def test_resume_with_no_complete_iteration_starts_over(tmp_path, games, references):
    """SIGTERM once the run folder is set up (metrics.jsonl open), before latest.json: --resume runs the whole run
    and still ends bitwise equal to the run never stopped."""
    argv = argv_of("inpo", "lm", games)
    key = references.start("inpo", "lm", argv)
    for attempt in range(4):
        run_dir = str(tmp_path / f"run{attempt}")
        inc = run_dir + ".incomplete"
        proc = Proc(argv + ["--run-dir", run_dir], str(tmp_path / "logs"), f"run{attempt}")
        sent = wait_for(proc, lambda: os.path.isfile(os.path.join(inc, "metrics.jsonl")))
        if sent:
            os.kill(proc.pid, signal.SIGTERM)
        rc, _, err = proc.wait()
        if sent and read_latest(inc) is None:
            break
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(inc, ignore_errors=True)
    else:
        pytest.fail("the first iteration always completed before SIGTERM arrived")
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    m = interrupt_message("inpo.py", inc, signal.SIGTERM).fullmatch(lines_of(err)[-1])
    assert m and m.group(1) == "0", lines_of(err)[-1]
    assert not os.path.exists(run_dir)
    assert not [p for p in os.listdir(inc) if "checkpoint" in p or p.startswith("latest")], os.listdir(inc)
    r = run_script("inpo.py", "--resume", inc)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_finished_like(references.get(key), run_dir, "inpo", "lm")


SIGNAL_DURING_SETUP = r"""
import json, os, runpy, signal, sys
_dump = json.dump
def dump(obj, fp, *a, **k):  # a real SIGTERM arrives as RunDir starts writing args.json: the folder exists already
    if os.path.basename(getattr(fp, "name", "")) == "args.json":
        os.kill(os.getpid(), signal.SIGTERM)
    return _dump(obj, fp, *a, **k)
json.dump = dump
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_signal_while_the_run_folder_is_set_up_leaves_nothing(tmp_path, games, references):
    """RunDir builds the folder under a hidden name and renames it into place whole: a SIGTERM while args.json is
    being written leaves no folder (and no hidden one), says that nothing was written, and the same --run-dir then
    starts a fresh run that ends as the reference."""
    argv = argv_of("inpo", "tabular", games)
    key = references.start("inpo", "tabular", argv)
    run_dir = str(tmp_path / "run")
    inc = run_dir + ".incomplete"
    proc = Proc(["-c", SIGNAL_DURING_SETUP, *argv, "--run-dir", run_dir], str(tmp_path / "logs"), "run")
    rc, _, err = proc.wait()
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert lines_of(err)[-1] == "interrupted (SIGTERM) before the run started; nothing was written", err
    assert not os.path.exists(run_dir) and not os.path.exists(inc)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], os.listdir(tmp_path)   # no staging folder
    r = run_script(*argv, "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_finished_like(references.get(key), run_dir, "inpo", "tabular")


# ---- 3. NaN ------------------------------------------------------------------------------------------------------

NAN_CASES = {  # id -> (argv, the iteration that fails). --policy tabular --lr 1e30 stays finite (Adam's steps are
    # ±lr: logits ~1e30, a deterministic policy); 1e160 is the first power of ten that overflows inpo's loss, and
    # nash_dpo's stays finite up to 1e307
    "inpo-tabular": ("inpo", "tabular", ["--lr", "1e200"], 1),
    "nash_dpo-tabular": ("nash_dpo", "tabular", ["--lr", "1e308"], 1),
    "inpo-lm": ("inpo", "lm", ["--lr", "1e30"], 2),          # iteration 1 ends with weights ~1e30, still finite
    "nash_dpo-lm": ("nash_dpo", "lm", ["--lr", "1e30"], 2),
}


@pytest.fixture(scope="session")
def nan_runs(tmp_path_factory, games):
    """Each NaN case run once (two at a time): id -> (run dir, exit status, stderr)."""
    root = str(tmp_path_factory.mktemp("nan"))
    out, ids = {}, list(NAN_CASES)
    for s in range(0, len(ids), 2):
        procs = {}
        for case in ids[s:s + 2]:
            name, world, flags, _ = NAN_CASES[case]
            d = os.path.join(root, case)
            procs[case] = (d, Proc(argv_of(name, world, games) + flags + ["--run-dir", d], root, case))
        for case, (d, proc) in procs.items():
            rc, _, err = proc.wait()
            out[case] = (d, rc, err)
    return out


def assert_finite_checkpoint(ckpt, world):
    import torch
    from safetensors.torch import load_file
    f = "theta.safetensors" if world == "tabular" else "model.safetensors"
    tensors = load_file(os.path.join(ckpt, "policy", f))
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    if world == "tabular":
        with open(os.path.join(ckpt, "policy", "policy.json")) as fh:
            assert all(np.isfinite(p).all() for p in json.load(fh).values())


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(nan_runs, case):
    name, world, _, failing = NAN_CASES[case]
    d, rc, err = nan_runs[case]
    inc = d + ".incomplete"
    assert rc not in (0, 2), err[-2000:]                      # it stopped (3; 2 would be a bad command line)
    assert "Traceback" not in err, err[-3000:]
    assert err.count("error:") == 1, err
    msg = err[err.index("error:"):].split("\n")[0]             # the error text (see the xfail test below)
    assert re.match(rf"error: iteration {failing}: .*\b(NaN|inf)\b", msg), msg
    assert inc in msg
    assert not os.path.exists(d) and os.path.isdir(inc)       # never renamed into place
    names = os.listdir(inc)
    assert not [f for f in names if f in ("policy.json", "model.safetensors", "config.json", "policy_max.json")]
    latest = read_latest(inc)
    rows = read_metrics(inc)
    if latest is None:
        assert "no iteration was complete" in msg
        assert not [f for f in names if "checkpoint" in f]
        assert [row["iteration"] for row in rows] == [0]
    else:
        assert latest["iteration"] < failing and latest["iteration"] == failing - 1
        assert f"iteration {latest['iteration']}'s checkpoint is kept" in msg
        assert [f for f in names if "checkpoint" in f] == [latest["checkpoint"]]
        assert_finite_checkpoint(os.path.join(inc, latest["checkpoint"]), world)
        assert [row["iteration"] for row in rows] == list(range(failing))  # nothing of the failing iteration


def test_nan_error_is_a_line_of_its_own(nan_runs):
    _, rc, err = nan_runs["inpo-tabular"]
    assert rc != 0
    assert len([line for line in lines_of(err) if line.startswith("error:")]) == 1, err


# ---- 4. bad --resume input ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def interrupted_inpo(tmp_path_factory, games):
    """An inpo.py tabular run stopped by SIGTERM after a complete iteration: its .incomplete folder."""
    root = str(tmp_path_factory.mktemp("interrupted"))
    run_dir, rc, err = interrupt(argv_of("inpo", "tabular", games), root, os.path.join(root, "run"), signal.SIGTERM)
    check_interrupted("inpo.py", run_dir, rc, err, signal.SIGTERM, ["policy"])
    return run_dir + ".incomplete"


def one_error_line(r, *names):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = lines_of(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


RESUME_CASES = ["empty", "empty.incomplete", "missing", "finished", "other-script", "contradicts-iterations",
                "contradicts-policy", "contradicts-seed"]


@pytest.mark.parametrize("case", RESUME_CASES)
def test_bad_resume_is_refused_with_one_line_and_changes_nothing(tmp_path, games, references, interrupted_inpo,
                                                                  case):
    work = tmp_path / "work"
    work.mkdir()
    target = str(work / "run.incomplete")
    if case == "empty":
        target = str(work / "empty")
        os.mkdir(target)
    elif case == "empty.incomplete":
        os.mkdir(target)
    elif case == "missing":
        target = str(work / "nowhere.incomplete")
    elif case == "finished":
        target = str(work / "finished")
        shutil.copytree(references.get(references.start("inpo", "tabular", argv_of("inpo", "tabular", games))),
                        target)
    else:
        shutil.copytree(interrupted_inpo, target)
    script, flags, expect = {
        "empty": ("inpo.py", [], "not a run folder"),
        "empty.incomplete": ("inpo.py", [], "not a run folder"),
        "missing": ("inpo.py", [], "not a folder"),
        "finished": ("inpo.py", [], "finished run"),
        "other-script": ("nash_mp.py", [], "inpo.py"),
        "contradicts-iterations": ("inpo.py", ["--iterations", "5"], "--iterations 5"),
        "contradicts-policy": ("inpo.py", ["--policy", "lm"], "--policy lm"),
        "contradicts-seed": ("inpo.py", ["--seed=2"], "--seed 2"),
    }[case]
    before = files_of(str(tmp_path))
    r = run_script(script, "--resume", target, *flags)
    one_error_line(r, target, expect)
    assert files_of(str(tmp_path)) == before                  # nothing written, moved or removed
    assert case != "missing" or not os.path.exists(target)


def test_resume_accepts_flags_equal_to_the_runs_own(tmp_path, games, references, interrupted_inpo):
    """Flags that agree with args.json (the resolved --lr included; the --flag=value form too) are accepted and the
    run ends as the run never stopped."""
    key = references.start("inpo", "tabular", argv_of("inpo", "tabular", games))
    run_dir = str(tmp_path / "run")
    shutil.copytree(interrupted_inpo, run_dir + ".incomplete")
    with open(os.path.join(run_dir + ".incomplete", "args.json")) as f:
        lr = json.load(f)["lr"]
    r = run_script("inpo.py", "--resume", run_dir + ".incomplete", "--iterations", str(ITERATIONS),
                   f"--lr={lr!r}", "--policy", "tabular", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_finished_like(references.get(key), run_dir, "inpo", "tabular", moved=True)


# ---- 5. a fresh run never wipes an interrupted one ----------------------------------------------------------------

def test_fresh_run_next_to_an_interrupted_one_refuses(tmp_path, games, interrupted_inpo):
    run_dir = str(tmp_path / "run")
    shutil.copytree(interrupted_inpo, run_dir + ".incomplete")
    before = files_of(str(tmp_path))
    r = run_script(*argv_of("inpo", "tabular", games), "--run-dir", run_dir)
    line = one_error_line(r, run_dir, f"--resume {run_dir}.incomplete")
    assert "interrupted run" in line
    assert files_of(str(tmp_path)) == before
    assert not os.path.exists(run_dir)


def test_signal_inside_a_py_judge_is_an_interrupt_not_a_judge_error(tmp_path, games):
    """The interrupt is a BaseException (like KeyboardInterrupt): a SIGINT that arrives while the user's py: judge runs
    (the judge's code, or PyJudge's `except Exception` around it, is where the signal lands) still stops the run as an
    interrupt: exit 130, the resume line, no "error:" line."""
    judge = tmp_path / "judge.py"
    judge.write_text("import os, signal\ncalls = []\n"
                     "def prefer(prompts, a, b):\n"
                     "    calls.append(1)\n"
                     "    if len(calls) == 3:                      # call 1: the check before the run; 2: iteration 1\n"
                     "        os.kill(os.getpid(), signal.SIGINT)\n"
                     "    return [0.5] * len(a)\n")
    run_dir = str(tmp_path / "run")
    argv = argv_of("inpo", "tabular", games) + ["--judge", f"py:{judge}:prefer", "--pairs", "iid"]
    rc, _, err = Proc([*argv, "--run-dir", run_dir], str(tmp_path / "logs"), "run").wait()
    assert rc == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err and not [line for line in lines_of(err) if line.startswith("error:")], err
    assert interrupt_message("inpo.py", run_dir + ".incomplete", signal.SIGINT).fullmatch(lines_of(err)[-1]), err
