"""bench/gpu_check.py runs end to end on tiny shapes on the CPU (its full run needs a GPU): every section reports
finite figures, the memory model gives a figure for each INPO setting, the scripts run from their command lines, and
both output files are written."""
import json
import math

from conftest import run_script


def test_gpu_check_tiny_runs_end_to_end(tmp_path):
    r = run_script("bench/gpu_check.py", "--tiny", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(tmp_path / "gpu_check.json") as f:
        out = json.load(f)
    assert out["tiny"] and out["errors"] == {}
    assert 0 < out["logits"]["max_abs_diff"] < 0.1                       # bf16 autocast, not a dtype mistake
    for key, training in (("inpo_full", "full"), ("inpo_lora", "LoRA r=16")):
        c = out[key]
        assert c["training"] == training and c["pairs"] > 0 and math.isfinite(c["loss"])
        assert set(c["seconds"]) == {"sample", "judge", "frozen passes (π_t, π_ref)", "train"}
        assert c["memory_model_gb"] > 0 and c["peak_gb"] is None             # no GPU here: not measured, and said so
    assert [row["batch"] for row in out["sampler"]] == [1, 2]
    assert all(row["ours_tok_s"] > 0 and row["transformers_tok_s"] > 0 for row in out["sampler"])
    assert [row["rc"] for row in out["scripts"]] == [0, 0] and all("perf/train_s" in row for row in out["scripts"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "(2) one INPO iteration" in md and "not measured (no GPU)" in md
