"""LoRA (common/lora.py) and the bf16 path (--precision bf16) on CPU.

LoRA: a fresh adapter (B = 0) is the base model exactly; merged weights give the unmerged logits; only the adapters
receive gradients and the base stays bitwise; π_ref (the adapters off) is the base model loaded on its own; peft loads
our PEFT-layout folder and gives our logits; a run's checkpoints hold the adapters only.
bf16: the arena model's log-probs under CPU bf16 autocast stay within a stated bound of fp32's, and every script runs
one iteration on the arena under --precision bf16, with and without LoRA (the tiny chat checkpoint: test_real_world).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from common.arena import ARENA_DIR, load_games
from common.lm_policy import LMPolicy
from common.lora import LoRA, target_names
from common.model import Transformer, from_pretrained
from common.policy import backward_in_micro_batches, copy_parameters
from conftest import read_metrics, run_script, write_arena4

transformers = pytest.importorskip("transformers")
V = 768   # the arena tokenizer's vocabulary


def hf_model(family):
    torch.manual_seed(0)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                                     n_positions=64, bos_token_id=0, eos_token_id=0))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0, tie_word_embeddings=False))


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def base(request, tmp_path_factory):
    """A tiny random transformers model saved with the arena's tokenizer: (folder, family)."""
    d = tmp_path_factory.mktemp(request.param)
    hf_model(request.param).save_pretrained(d)
    with open(os.path.join(ARENA_DIR, "tokenizer.json"), "rb") as f, open(d / "tokenizer.json", "wb") as g:
        g.write(f.read())
    return str(d), request.param


def batch(seed=0, B=5, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, :3] = 0     # a left-padded row
    return ids, attn


def randomize(lora, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.B.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def logits(model, ids, attn, lora=None):
    with torch.no_grad():
        return model.hidden_states(ids, attn, lora=lora) @ model.lm_head_weight.T


def test_fresh_adapter_is_the_base_exactly(base):
    model = from_pretrained(base[0])
    lora = LoRA(model, rank=4, alpha=8)
    assert set(lora.targets) == set(target_names(model.config.model_type))
    ids, attn = batch()
    assert torch.equal(logits(model, ids, attn, lora), logits(model, ids, attn))


def test_merged_weights_equal_the_unmerged_forward(base):
    model = from_pretrained(base[0])
    lora = LoRA(model, rank=4, alpha=8)
    randomize(lora)
    merged = Transformer(model.config)
    merged.load_state_dict(lora.merged_state_dict(model))
    ids, attn = batch()
    adapted = logits(model, ids, attn, lora)
    assert (adapted - logits(model, ids, attn)).abs().max() > 1e-2        # the adapters do something
    torch.testing.assert_close(logits(merged, ids, attn), adapted, atol=1e-5, rtol=0)


def test_target_subset_and_bad_targets(base):
    model = from_pretrained(base[0])
    first = target_names(model.config.model_type)[0]
    lora = LoRA(model, rank=2, alpha=2, targets=[first])
    assert all(key.endswith(first) for key in lora.A)
    randomize(lora)
    ids, attn = batch()
    merged = Transformer(model.config)
    merged.load_state_dict(lora.merged_state_dict(model))
    torch.testing.assert_close(logits(merged, ids, attn), logits(model, ids, attn, lora), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="--lora-targets"):
        LoRA(model, rank=2, alpha=2, targets=["query"])


def trained_policy(folder, grad_checkpoint=False, micro_batch=None, steps=3):
    """An LMPolicy with LoRA adapters after `steps` Adam steps on a loss of its log-probs of arena-like rows."""
    torch.manual_seed(0)
    policy = LMPolicy.load(folder, lora_rank=4, lora_alpha=8, max_new_tokens=6)
    policy.model.grad_checkpoint = grad_checkpoint
    base = {k: v.clone() for k, v in policy.model.state_dict().items()}
    y = policy.sample(["hello there", "a prompt"], 4, generator=torch.Generator().manual_seed(0))
    weights = torch.linspace(-1, 1, len(y))
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        backward_in_micro_batches(policy, y, lambda lp: ((weights * lp).sum(), None), micro_batch)
        grads.append([p.grad.clone() for p in policy.parameters()])
        opt.step()
    return policy, base, y, grads


def test_only_the_adapters_train_and_the_base_stays_bitwise(base):
    policy, before, y, grads = trained_policy(base[0])
    assert all(not p.requires_grad and p.grad is None for p in policy.model.parameters())
    assert {id(p) for p in policy.parameters()} == {id(p) for p in policy.lora.parameters()}
    for k, v in policy.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(b.abs().max() > 0 for b in policy.lora.B.values())     # the adapters moved
    # the same gradients with activation checkpointing and with micro-batches of 3 rows
    for kw in (dict(grad_checkpoint=True), dict(micro_batch=3)):
        _, _, _, other = trained_policy(base[0], steps=1, **kw)
        for a, b in zip(grads[0], other[0]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_reference_is_the_base_model_and_copies_are_adapters(base):
    policy, _, y, _ = trained_policy(base[0])
    ref = policy.frozen_copy(adapters=False)
    alone = LMPolicy.load(base[0], max_new_tokens=6)
    with torch.no_grad():
        assert torch.equal(ref.logprobs(y), alone.logprobs(y))
        assert not torch.allclose(policy.logprobs(y), alone.logprobs(y))
        copy = policy.frozen_copy()
        assert copy.model is policy.model and copy.lora is not policy.lora     # shares the base, copies the adapters
        assert torch.equal(copy.logprobs(y), policy.logprobs(y))
        for b in policy.lora.B.values():
            b.zero_()
        assert torch.equal(policy.logprobs(y), alone.logprobs(y))
        copy_parameters(policy, copy)                                           # nash_mp's reset to the anchor
        assert torch.equal(policy.logprobs(y), copy.logprobs(y))


def test_peft_loads_our_adapters_and_transformers_our_merged_weights(base, tmp_path):
    peft = pytest.importorskip("peft")
    folder, family = base
    policy, _, y, _ = trained_policy(folder)
    out = str(tmp_path / "out")
    policy.save(out)
    with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["r"] == 4
    ids, attn = y.input_ids, y.attention_mask
    kw = dict(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0))  # left padding
    ours = logits(policy.model, ids, attn, policy.lora)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(**kw).logits
        theirs = peft.PeftModel.from_pretrained(hf_base, os.path.join(out, "adapter")).eval()(**kw).logits
    keep = attn.bool()
    torch.testing.assert_close(theirs[keep], ours[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged[keep], ours[keep], atol=1e-5, rtol=0)


def test_checkpoints_hold_the_adapters_only(base, tmp_path):
    policy, _, y, _ = trained_policy(base[0])
    policy.save_checkpoint(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = LMPolicy.load(base[0], lora_rank=4, lora_alpha=8, max_new_tokens=6)
    fresh.load_checkpoint(str(tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(fresh.logprobs(y), policy.logprobs(y))
    other = LMPolicy.load(base[0], lora_rank=2, lora_alpha=8, max_new_tokens=6)
    with pytest.raises(ValueError, match="do not match --lora-rank 2"):
        other.load_checkpoint(str(tmp_path / "ckpt"))


def test_lora_run_saves_merged_weights_and_adapters(tmp_path):
    """inpo.py --lora-rank on the arena: the final folder's adapters moved, and its weights are the SFT weights
    merged with them (so the base did not move)."""
    d = str(tmp_path / "run")
    r = run_script("inpo.py", "--iterations", "1", "--samples-per-prompt", "4", "--epochs", "2", "--lr", "0.01",
                   "--lora-rank", "4", "--threads", "1", "--run-dir", d)
    assert r.returncode == 0, r.stderr[-2000:]
    base = from_pretrained(ARENA_DIR)
    lora = LoRA(base, rank=4, alpha=8)
    lora.load(os.path.join(d, "adapter"))
    assert any(b.abs().max() > 0 for b in lora.B.values())
    saved = from_pretrained(d).state_dict()
    for k, v in lora.merged_state_dict(base).items():
        torch.testing.assert_close(saved[k], v, atol=1e-6, rtol=0)
    assert json.load(open(os.path.join(d, "args.json")))["lora_rank"] == 4


def test_bf16_logprobs_of_the_arena_model_stay_near_fp32():
    """Exact candidate log-probs of every arena game under CPU bf16 autocast against fp32: max |Δ| ≤ 0.25 nats per
    answer and the distributions' total variation ≤ 0.04 (measured: 0.109 and 0.020, torch 2.13 CPU), i.e. bf16's
    8-bit mantissa, not a dtype mistake (which moves whole distributions)."""
    games = load_games()
    sft = LMPolicy.load(ARENA_DIR)
    fp32 = sft.distribution(games)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = sft.distribution(games)
    d_log = max(float(abs(torch.tensor(a[:-1]).log() - torch.tensor(b[:-1]).log()).max()) for a, b in zip(fp32, bf16))
    tv = max(0.5 * float(abs(torch.tensor(a) - torch.tensor(b)).sum()) for a, b in zip(fp32, bf16))
    assert d_log <= 0.25 and tv <= 0.04, (d_log, tv)


ARENA_RUNS = {
    "inpo.py": ["--samples-per-prompt", "2", "--epochs", "1"],
    "nash_mp.py": ["--samples-per-prompt", "2", "--opponent-samples", "2", "--inner-steps", "1"],
    "nash_dpo.py": ["--samples-per-prompt", "2", "--groups-per-prompt", "1", "--epochs", "1"],
    "tanpo.py": ["--pairs-per-prompt", "1", "--bonus-samples", "1", "--epochs", "1"],
}


@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("script", list(ARENA_RUNS))
def test_every_script_runs_under_bf16_on_the_arena(tmp_path, games4, script, lora):
    d = str(tmp_path / "run")
    r = run_script(script, *ARENA_RUNS[script], "--iterations", "1", "--precision", "bf16", "--lora-rank", str(lora),
                   "--games", games4, "--threads", "1", "--run-dir", d)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(d)
    assert [row["iteration"] for row in rows] == [0, 1] and all(0 < row["eval/valid"] <= 1 for row in rows)
    assert json.load(open(os.path.join(d, "args.json")))["precision"] == "bf16"
    assert os.path.isfile(os.path.join(d, "adapter", "adapter_model.safetensors")) == bool(lora)
    weights = load_file(os.path.join(d, "model.safetensors"))    # full fine-tuning: the fp32 master weights saved;
    assert all(v.dtype == (torch.bfloat16 if lora else torch.float32) for v in weights.values())   # LoRA: the base's


@pytest.fixture(scope="module")
def games4(tmp_path_factory):
    """One training game of each arena family: a small games file."""
    return write_arena4(tmp_path_factory.mktemp("games") / "arena4.json")
