"""common/model.py against transformers: logits, checkpoints both ways, reward models, KV cache, padding, bad input.

Tiny random configs of every supported family; weights are re-drawn with a larger spread than the default init
so that the logits are far from uniform and a wrong RoPE / norm / bias shows up well above the 1e-4 tolerance.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from common.chat import special_token_ids  # noqa: E402
from common.model import ModelConfig, Transformer, from_pretrained  # noqa: E402

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def hf_configs():
    T = transformers
    return {
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=0, eos_token_id=1)),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**SMALL, num_key_value_heads=2, rms_norm_eps=1e-5,
                                                    rope_theta=500000.0)),
        "llama3-rope": (T.LlamaForCausalLM, T.LlamaConfig(**SMALL, num_key_value_heads=2, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16), rope_theta=10000.0)),
        "mistral": (T.MistralForCausalLM, T.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=None)),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16)),
    }


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=list(hf_configs()))
def pair(request, tmp_path_factory):
    """(name, transformers model, folder it was saved to, our model loaded from that folder)."""
    cls, cfg = hf_configs()[request.param]
    torch.manual_seed(0)
    hf = randomize(cls(cfg)).eval()
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    return request.param, hf, path, from_pretrained(path).eval()


def ids(B, T, seed=1):
    return torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(pair):
    _, hf, _, ours = pair
    x = ids(3, 21)
    ref = hf(x).logits
    assert ref.std() > 0.5  # the check is not vacuous: logits are far from uniform
    assert (ours(x) - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_our_checkpoint_loads_in_transformers(pair, tmp_path):
    name, hf, _, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    x = ids(2, 15)
    assert torch.equal(back(x).logits, hf(x).logits)  # same weights, same code: bit-identical
    assert (ours(x) - back(x).logits).abs().max() <= 1e-4
    # and our loader reads what we wrote
    again = from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(again(x), ours(x))


@torch.no_grad()
def test_ragged_left_padded_batch_equals_rows_alone(pair):
    _, _, _, ours = pair
    rows = [ids(1, n, seed=n)[0] for n in (5, 12, 9)]
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, T - len(r):], mask[i, T - len(r):] = r, 1
    batched = ours(x, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for i, r in enumerate(rows):
        alone = ours(r[None])[0]
        assert (batched[i, T - len(r):] - alone).abs().max() <= 1e-5


@torch.no_grad()
def test_kv_cache_decoding_equals_full_recomputation(pair):
    _, _, _, ours = pair
    rows = [ids(1, n, seed=10 + n)[0] for n in (4, 7)]
    P, steps = 7, 6
    x = torch.zeros(2, P, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, P - len(r):], mask[i, P - len(r):] = r, 1
    cont = ids(2, steps, seed=3)
    full_ids = torch.cat([x, cont], 1)
    full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    full = ours(full_ids, attention_mask=full_mask)
    cache = ours.new_cache(2, P + steps)
    got = [ours(x, attention_mask=mask, cache=cache)]
    for t in range(steps):
        got.append(ours(cont[:, t:t + 1], attention_mask=full_mask[:, :P + t + 1], cache=cache))
    got = torch.cat(got, 1)
    assert cache.pos == P + steps
    valid = full_mask.bool()
    assert (got - full)[valid].abs().max() <= 1e-5


@torch.no_grad()
def test_bf16_load_runs(pair):
    _, _, path, ours = pair
    m = from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    x = ids(1, 9)
    assert (m(x).float() - ours(x)).abs().max() < 0.5  # bf16 rounding only


@torch.no_grad()
def test_sharded_checkpoint(tmp_path):
    cls, cfg = hf_configs()["qwen3"]
    hf = randomize(cls(cfg)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = from_pretrained(tmp_path).eval()
    x = ids(2, 10)
    assert (ours(x) - hf(x).logits).abs().max() <= 1e-4


REWARD = {
    "qwen2": lambda T: (T.Qwen2ForSequenceClassification,
                        T.Qwen2Config(**SMALL, num_key_value_heads=2, num_labels=1, pad_token_id=0)),
    "llama": lambda T: (T.LlamaForSequenceClassification,
                        T.LlamaConfig(**SMALL, num_key_value_heads=4, num_labels=1, pad_token_id=0)),
    "gpt2": lambda T: (T.GPT2ForSequenceClassification,
                       T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=1,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=1)),
}


@pytest.mark.parametrize("family", list(REWARD))
@torch.no_grad()
def test_reward_model_scores_match_transformers(family, tmp_path):
    cls, cfg = REWARD[family](transformers)
    hf = randomize(cls(cfg)).eval()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    assert ours.config.is_reward_model
    # right-padded batch (pad id 0, never used inside the rows)
    lens = [6, 11, 3]
    x = torch.zeros(3, 11, dtype=torch.long)
    for i, n in enumerate(lens):
        x[i, :n] = ids(1, n, seed=20 + i)[0]
    mask = (x != 0).long()
    ref = hf(x, attention_mask=mask).logits.squeeze(-1)
    assert ours(x).shape == (3,)
    assert (ours(x, attention_mask=mask) - ref).abs().max() <= 1e-4
    assert (ours(x) - ref).abs().max() <= 1e-4  # pooling from pad_token_id when no mask is given
    assert ref.std() > 1e-2
    ours.save_pretrained(tmp_path / "ours")
    back = cls.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(back(x, attention_mask=mask).logits, hf(x, attention_mask=mask).logits)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gpt2"])
def test_fresh_model_round_trip(tmp_path, model_type):
    """A model we build from scratch (as data/make_arena.py does) saves, and transformers and we load it back."""
    cfg = ModelConfig(model_type=model_type, vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4 if model_type == "gpt2" else 2, intermediate_size=48, max_position_embeddings=32,
                      tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    ours = randomize(Transformer(cfg)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(2, 12)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= 1e-4
        assert torch.equal(from_pretrained(tmp_path)(x), ours(x))


# ---- special ids --------------------------------------------------------------------------------------

def test_special_token_ids_resolution(tmp_path):
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "hi": 2}, unk_token="<pad>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    assert special_token_ids(tmp_path) == {"eos_id": 1, "pad_id": 0, "bos_id": None, "eos_ids": [1]}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    ids_ = special_token_ids(tmp_path)
    assert ids_["eos_id"] == 2 and ids_["eos_ids"] == [2, 1] and ids_["pad_id"] == 0
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 1, "pad_token_id": 2}))
    ids_ = special_token_ids(tmp_path)
    assert ids_["eos_id"] == 1 and ids_["pad_id"] == 2  # config.json first


# ---- bad input ----------------------------------------------------------------------------------------

@pytest.fixture()
def saved_llama(tmp_path):
    cls, cfg = hf_configs()["llama"]
    cls(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)


def test_missing_weights(saved_llama):
    os.remove(saved_llama / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(saved_llama)


def test_unknown_model_type(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (saved_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model_type 'mamba'"):
        from_pretrained(saved_llama)


def test_missing_and_misshaped_tensor(saved_llama):
    from safetensors.torch import load_file, save_file
    f = str(saved_llama / "model.safetensors")
    sd = load_file(f)
    key = "model.layers.1.mlp.up_proj.weight"
    bad = dict(sd)
    bad[key] = torch.zeros(3, 3)
    save_file(bad, f)
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight.*shape"):
        from_pretrained(saved_llama)
    del bad[key]
    save_file(bad, f)
    with pytest.raises(KeyError, match=key):
        from_pretrained(saved_llama)


def test_sequence_longer_than_context():
    cfg = ModelConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=8)
    m = Transformer(cfg)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 8"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 8"):
        m.new_cache(1, 9)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import common.model as cm
    cfg = ModelConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(cm, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        Transformer(cfg).save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []
