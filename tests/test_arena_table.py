"""bench/arena_table.py: the table's cells are the mean ± std of the runs' final metrics, and the README splice."""
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, read_metrics, run_script

sys.path.insert(0, os.path.join(ROOT, "bench"))
import arena_table  # noqa: E402


def test_table_cells_are_mean_and_std_of_the_runs(tmp_path):
    runs, out, readme = tmp_path / "runs", tmp_path / "table", tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:begin -->\nold\n<!-- table:end -->\noutro\n")
    r = run_script("bench/arena_table.py", "--policy", "tabular", "--only", "INPO,online DPO", "--seeds", "2",
                   "--extra", "--iterations 1", "--runs", str(runs), "--out", str(out), "--readme", str(readme))
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "table.md").read_text()
    finals = [read_metrics(runs / f"nash_dpo_refsft_pairsrandom__{s}")[-1] for s in (1, 2)]
    for split_family, k in (("train/cyclic", "eval/{}/train/cyclic"), ("train", "eval/{}/train")):
        section = md.split(f"### {split_family}\n", 1)[1].split("###", 1)[0]
        row = next(line for line in section.splitlines() if line.startswith("| online DPO |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        for m, cell in zip(arena_table.METRICS, cells):
            xs = np.array([f[k.format(m)] for f in finals])
            assert cell == f"{xs.mean():.4f} ± {xs.std(ddof=1):.4f}", (m, cell)
    # the headline: train and test dual_gap, the test change against the SFT model's, test/cyclic kl_ne, valid
    sft_test = read_metrics(runs / "inpo__1")[0]["eval/dual_gap/test"]
    head = next(line for line in md.split("| algorithm | train dual_gap |", 1)[1].splitlines()
                if line.startswith("| online DPO |"))
    cells = [c.strip() for c in head.strip("|").split("|")][1:]
    for cell, k in zip(cells, ["eval/dual_gap/train", "eval/dual_gap/test", None, "eval/kl_ne/test/cyclic",
                               "eval/valid"]):
        xs = np.array([f[k] for f in finals]) if k else np.array([f["eval/dual_gap/test"] for f in finals])
        want = f"{xs.mean():.4f} ± {xs.std(ddof=1):.4f}" if k else f"{100 * (xs.mean() / sft_test - 1):+.0f}%"
        assert cell == want, (k, cell, want)
    sft = read_metrics(runs / "inpo__1")[0]["eval/dual_gap/train"]
    assert "| SFT (π_ref) | " in md and f"{sft:.4f}" in md
    text = readme.read_text()
    assert text.startswith("intro\n<!-- table:begin -->\n") and text.endswith("<!-- table:end -->\noutro\n")
    assert "old" not in text and "| online DPO |" in text
    # a second invocation reuses the finished runs
    r = run_script("bench/arena_table.py", "--policy", "tabular", "--only", "INPO", "--seeds", "2",
                   "--runs", str(runs), "--out", str(out))
    assert r.returncode == 0 and "inpo__1: reused" in r.stderr


@pytest.mark.parametrize("case", ["algorithm", "readme"])
def test_bad_input_is_one_line_error_before_any_run(tmp_path, case):
    (tmp_path / "README.md").write_text("no table region here\n")
    argv = {"algorithm": ["--only", "PPO"], "readme": ["--readme", str(tmp_path / "README.md")]}[case]
    r = run_script("bench/arena_table.py", *argv, "--runs", str(tmp_path / "runs"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert {"algorithm": "PPO", "readme": "table:begin"}[case] in lines[0]
    assert not (tmp_path / "runs").exists()
