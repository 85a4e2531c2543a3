"""
Benchmark: tiled token_logprobs (common/losses.py) vs the naive log_softmax(h @ W.T).gather.

Not a test; prints ratios fused / naive measured side by side in one run, for
    (a) forward + backward (grads w.r.t. hidden and weight),
    (b) forward under no_grad,
at a Qwen2.5-0.5B head by default (N = 1024 response tokens, d = 896, V = 151936, float32).

Memory, "extra peak": the peak above the inputs (and, for (a), above the two gradients that must be
returned), measured for each variant in a fresh subprocess in two ways:
    rss:     Linux peak RSS (VmHWM, reset through /proc/self/clear_refs after the inputs are built),
             minus the RSS right after the inputs were built (on CUDA: torch.cuda.max_memory_allocated);
    tracker: live tensor bytes counted by a TorchDispatchMode (each new output storage added, and
             subtracted when it is freed), run once more in the same subprocess.
Time: median (and min) over --repeats after one warm-up, the two variants interleaved in one process
(wall time, and on CPU also this process's CPU time, which other load on a shared machine disturbs
less).

    python bench/bench_logprobs.py [--n 1024] [--d 896] [--v 151936] [--repeats 3] [--device cpu|cuda]
                                    [--dtype float32] [--threads 0]
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.losses import token_logprobs  # noqa: E402


def naive_logprobs(hidden, weight, targets):
    logits = hidden @ weight.T  # (N, V)
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)


VARIANTS = {"naive": naive_logprobs, "fused": token_logprobs}


def make_inputs(args, requires_grad):
    gen = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    h = torch.randn(args.n, args.d, generator=gen).to(args.device, dtype)
    w = (torch.randn(args.v, args.d, generator=gen) * args.d**-0.5).to(args.device, dtype)
    t = torch.randint(args.v, (args.n,), generator=gen).to(args.device)
    g = torch.randn(args.n, generator=gen).to(args.device)
    h.requires_grad_(requires_grad)
    w.requires_grad_(requires_grad)
    return h, w, t, g


def run_once(fn, h, w, t, g, train):
    """Returns (log-probs, grads or None)."""
    if train:
        lp = fn(h, w, t)
        return lp.detach(), torch.autograd.grad(lp, (h, w), g.to(lp.dtype))
    with torch.no_grad():
        return fn(h, w, t), None


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class LiveBytes(TorchDispatchMode):
    """Counts bytes of tensor storages allocated by ops run under it, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                st = x.untyped_storage()
                if st.nbytes() and st.data_ptr() not in inputs and not hasattr(st, "_counted"):
                    st._counted = True
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, st.nbytes())
        return out


# --- memory, in a fresh subprocess per variant ---

def _rss_kb(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def worker(args):
    train = args.mode == "train"
    fn = VARIANTS[args.variant]
    h, w, t, g = make_inputs(args, train)
    returned = (h.numel() * h.element_size() + w.numel() * w.element_size()) if train else 0
    cuda = args.device.startswith("cuda")
    if cuda:
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kb("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        except OSError:
            pass  # fall back to ru_maxrss, which may include an earlier peak
    res = run_once(fn, h, w, t, g, train)
    sync(args.device)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        try:
            peak = _rss_kb("VmHWM") * 1024
        except (AttributeError, OSError):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del res
    with LiveBytes() as tracker:
        res = run_once(fn, h, w, t, g, train)
        sync(args.device)
    print(json.dumps({"rss": peak - base - returned, "tracker": tracker.peak - returned}))


def measure_memory(args, variant, mode):
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--mode", mode,
           "--n", str(args.n), "--d", str(args.d), "--v", str(args.v), "--device", args.device,
           "--dtype", args.dtype, "--seed", str(args.seed),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- time and exactness, both variants in this process ---

def measure_time(args, train):
    h, w, t, g = make_inputs(args, train)
    times = {name: [] for name in VARIANTS}
    cpu_times = {name: [] for name in VARIANTS}
    results = {}
    for r in range(args.repeats + 1):  # r = 0 is the warm-up
        order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
        for name in order:
            results.pop(name, None)  # free the previous result before timing
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_once(VARIANTS[name], h, w, t, g, train)
            sync(args.device)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
            results[name] = res
    (lp_n, gr_n), (lp_f, gr_f) = results["naive"], results["fused"]
    err = {"logp": (lp_f - lp_n).abs().max().item()}
    if train:
        err["grad_h"] = (gr_f[0] - gr_n[0]).abs().max().item()
        err["grad_w"] = (gr_f[1] - gr_n[1]).abs().max().item()
    return times, cpu_times, err


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--n", type=int, default=1024, help="response tokens (rows)")
    p.add_argument("--d", type=int, default=896, help="hidden size")
    p.add_argument("--v", type=int, default=151936, help="vocabulary size")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (after one warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["train", "infer"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)

    print(f"N={args.n} d={args.d} V={args.v} {args.dtype} device={args.device} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} torch {torch.__version__} load average {os.getloadavg()[0]:.1f}")
    mb = 2**20
    rows = [("", "naive", "fused", "fused/naive")]
    errs = {}
    for mode, label in [("train", "fwd+bwd"), ("infer", "no-grad fwd")]:
        mem = {v: measure_memory(args, v, mode) for v in VARIANTS}
        times, cpu_times, errs[label] = measure_time(args, mode == "train")
        for kind in ("rss", "tracker"):
            n, f = mem["naive"][kind], mem["fused"][kind]
            rows.append((f"{label} extra peak MB ({kind})", f"{n / mb:.1f}", f"{f / mb:.1f}", f"{f / n:.3f}"))
        stats = [("wall time s (median)", times, statistics.median), ("wall time s (min)", times, min)]
        if args.device == "cpu":  # CPU time of this process: less sensitive to other load on a shared machine
            stats.append(("cpu time s (median)", cpu_times, statistics.median))
        for name, ts, stat in stats:
            n, f = stat(ts["naive"]), stat(ts["fused"])
            rows.append((f"{label} {name}", f"{n:.3f}", f"{f:.3f}", f"{f / n:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths))))
    for label, e in errs.items():
        print(f"{label} max |fused - naive|: " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()))
    print(f"load average at the end {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cpus)")


if __name__ == "__main__":
    main()
