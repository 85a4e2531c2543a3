"""Memory bounded by a flag: for each script's loss, the gradient accumulated over micro-batches
(common.policy.backward_in_micro_batches, --micro-batch) equals the one-pass full-batch gradient, and activation
checkpointing (--grad-checkpoint) changes no gradient. The model is the arena's small LM (0.89M parameters, moved off
π_ref) and the rows are its candidate answers, so they have different prompt and response lengths (padding and length
buckets change with the micro-batch).

Two models: a tiny random Llama in fp32, where max |Δ| ≤ 1e-5 · max(1, max |g|) (float rounding of sums taken in
another order: 2.5e-6 at |g| = 3 was seen on the CI machine, 8 float32 ulps), and the arena model in float64, where
max |Δ| ≤ 1e-12 · max(1, max |g|): the two passes compute the same gradient, not an
approximation of it (in fp32 the arena model's INPO gradient, |g| ≈ 28, differs by ~3e-5 at micro-batch 1: rounding)."""
import pytest
import torch

import inpo
import nash_dpo
import nash_mp
import tanpo
from common.arena import ARENA_DIR, load_games
from common.lm_policy import LMPolicy
from common.policy import backward_in_micro_batches

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}   # relative to max(1, max |g|)


def tiny_random_policy():
    from common.chat import load_tokenizer
    from common.model import ModelConfig, Transformer
    cfg = ModelConfig(model_type="llama", vocab_size=768, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=0, pad_token_id=1)
    return LMPolicy(Transformer(cfg), load_tokenizer(ARENA_DIR), eos_id=0, pad_id=1)


@pytest.fixture(scope="module", params=["tiny-random-fp32", "arena-fp64"])
def setup(request):
    torch.manual_seed(0)
    policy = tiny_random_policy() if request.param == "tiny-random-fp32" else \
        LMPolicy.load(ARENA_DIR, dtype=torch.float64)
    ref = policy.frozen_copy()
    with torch.no_grad():                     # move the policy off π_ref so that every loss has a gradient
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    games = load_games()
    prompts, texts = [], []
    for g in list(games)[:6]:
        for c in g.candidates[:3]:
            prompts.append(g)
            texts.append(c)
    rows = policy.encode(prompts, texts)      # 18 rows: 6 prompts x 3 answers
    with torch.no_grad():
        ref_lp, ref_tok = ref.logprobs(rows), ref.token_logprobs(rows)
    return policy, rows, ref_lp, ref_tok


def grads(policy, samples, loss_fn, micro_batch, per_token=False):
    policy.zero_grad(set_to_none=True)
    loss, _ = backward_in_micro_batches(policy, samples, loss_fn, micro_batch, per_token=per_token)
    return loss, [p.grad.clone() for p in policy.parameters()]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def assert_same_gradients(policy, samples, loss_fn, per_token=False, micro_batches=(1, 4, 7)):
    loss_full, g_full = grads(policy, samples, loss_fn, None, per_token)
    scale = max(float(g.abs().max()) for g in g_full)
    assert scale > 1e-4                                                 # a gradient worth comparing
    tol = TOL[g_full[0].dtype] * max(1.0, scale)
    for mb in micro_batches:
        loss_mb, g_mb = grads(policy, samples, loss_fn, mb, per_token)
        torch.testing.assert_close(loss_mb, loss_full, atol=tol, rtol=0)
        worst = max_diff(g_mb, g_full)
        assert worst <= tol, f"micro-batch {mb}: max |Δgrad| = {worst:.2e} (max |g| = {scale:.3g})"


def test_inpo_loss(setup):
    """Eq. (8) on all pairs of each prompt's 3 answers, every response scored once (inpo.py's minibatch layout)."""
    policy, rows, ref_lp, _ = setup
    win = torch.tensor([0, 1, 3, 4, 6, 8, 9, 13, 12, 15, 17])
    lose = torch.tensor([1, 2, 5, 3, 7, 6, 10, 14, 14, 16, 15])
    prev = ref_lp + 0.1 * torch.arange(len(rows)).to(ref_lp) / len(rows)   # a π_t that is not π_ref
    weights = torch.linspace(0.5, 2.0, len(win), dtype=torch.float64)
    used, pos = torch.unique(torch.cat([win, lose]), return_inverse=True)
    B = len(win)

    def loss_of(lp_rows):
        lp = lp_rows[pos]
        return inpo.inpo_loss(lp[:B], lp[B:], ref_lp[win], ref_lp[lose], prev[win], prev[lose], 0.3, 0.1,
                              weights.to(lp.dtype))
    assert_same_gradients(policy, rows.select(used), loss_of)


def test_nash_dpo_loss(setup):
    """Eq. (13): chosen rows then rejected rows (nash_dpo.py's layout)."""
    policy, rows, ref_lp, _ = setup
    chosen, rejected = torch.tensor([0, 4, 8, 9, 14]), torch.tensor([2, 3, 6, 11, 12])
    pair_rows = torch.cat([chosen, rejected])
    B = len(chosen)

    def loss_of(lp):
        return nash_dpo.dpo_loss(lp[:B], lp[B:], ref_lp[chosen], ref_lp[rejected], 0.1)
    assert_same_gradients(policy, rows.select(pair_rows), loss_of)


def test_tanpo_loss_with_bonus(setup):
    """The min-player's L_DPO + c·E[log μ] over two sets of rows (pairs and bonus samples) at once."""
    policy, rows, ref_lp, _ = setup
    w, l = torch.tensor([0, 3, 7, 10]), torch.tensor([1, 5, 8, 9])
    pair_rows, bonus_rows = torch.cat([w, l]), torch.tensor([2, 4, 6, 11, 13, 16, 17])
    B = len(w)

    def loss_of(lp, bonus_lp):
        loss, _ = tanpo.dpo_loss(lp[:B], lp[B:], ref_lp[w], ref_lp[l], 0.1)
        return loss + tanpo.exploration_bonus(bonus_lp, 0.05), None
    assert_same_gradients(policy, (rows.select(pair_rows), rows.select(bonus_rows)), loss_of)


def test_nash_mp_pg_loss(setup):
    """The per-token policy-gradient surrogate with its leave-one-out baseline over each prompt's samples, which
    couples the rows of a prompt (nash_mp.py's pg_step)."""
    policy, rows, _, ref_tok = setup
    anchor_tok = ref_tok + 0.01 * torch.cos(torch.arange(ref_tok.numel()).view(ref_tok.shape).to(ref_tok))
    mask = rows.token_mask
    reward = torch.linspace(0.2, 0.8, len(rows)).to(ref_tok)
    counts = torch.tensor([1, 2, 1] * 6)                              # each prompt's 3 rows stand for 4 samples
    group = torch.arange(len(rows)) // 3

    def loss_of(policy_tok):
        R = nash_mp.sequence_return(policy_tok, ref_tok, anchor_tok, mask, reward, 0.1, 0.2)
        baseline = nash_mp.leave_one_out(R, counts, group, 4)
        loss, kl_ref, kl_anchor = nash_mp.pg_loss(policy_tok, ref_tok, anchor_tok, mask, reward, 0.1, 0.2,
                                                  counts.to(policy_tok.dtype), baseline)
        return loss, torch.stack([kl_ref, kl_anchor])
    assert_same_gradients(policy, rows, loss_of, per_token=True)


def test_grad_checkpoint_changes_no_gradient(setup):
    """--grad-checkpoint recomputes each block in backward: the same gradients, within float rounding."""
    policy, rows, ref_lp, _ = setup
    chosen, rejected = torch.arange(0, 18, 2), torch.arange(1, 18, 2)
    B = len(chosen)

    def loss_of(lp):
        return nash_dpo.dpo_loss(lp[:B], lp[B:], ref_lp[chosen], ref_lp[rejected], 0.1)
    samples = rows.select(torch.cat([chosen, rejected]))
    _, plain = grads(policy, samples, loss_of, None)
    policy.model.grad_checkpoint = True
    try:
        _, recomputed = grads(policy, samples, loss_of, 5)
    finally:
        policy.model.grad_checkpoint = False
    scale = max(float(g.abs().max()) for g in plain) if plain[0].dtype == torch.float64 else 1.0
    assert max_diff(plain, recomputed) <= TOL[plain[0].dtype] * max(1.0, scale)
