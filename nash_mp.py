"""Nash Mirror Prox (Nash-MP).

Paper: Tiapkin, Calandriello, Belomestny, Moulines, Naumov, Rasul, Valko, Ménard — "Accelerating Nash Learning from
Human Feedback via Mirror Prox", arXiv 2505.19731 **v1** (later versions of that id describe a different algorithm,
"Nash Prox"). Provenance: the abstract is the only primary text read [paper]; the update below comes from agreeing
secondary summaries [review]; its closed form is derived here [derived]. Details: docs/algorithms.md §3.

The game: J(π₁, π₂) = E P(y ≻ y') − β KL(π₁‖π_ref) + β KL(π₂‖π_ref), equilibrium π*. Each iteration makes two
proximal steps, both anchored at π^k (the extragradient structure of mirror prox):
    π^{k+½} = argmin_π { P(π^k ≻ π)     + β KL(π‖π_ref) + (β/η) KL(π‖π^k) }                     [review]
    π^{k+1} = argmin_π { P(π^{k+½} ≻ π) + β KL(π‖π_ref) + (β/η) KL(π‖π^k) }                     [review]
Closed form [derived: set the derivative of the concave objective E_π P(y ≻ opp) − β KL(π‖π_ref) − (β/η) KL(π‖π^k)
to a constant]:
    log π^{k+½} = [log π^k + η log π_ref + (η/β) P(· ≻ π^k)] / (1+η) + c
    log π^{k+1} = [log π^k + η log π_ref + (η/β) P(· ≻ π^{k+½})] / (1+η) + c'          fixed point: π*.
Claim [paper]: last-iterate linear convergence, KL(π*‖π^k) ≤ (1+2β)^{−N/2} · const with N preference queries
(two per iteration), independent of the number of actions; conditions [review]: β ≤ ½, η ≤ 2β.

The approximate version (the paper's LLM algorithm; abstract only [paper], this sketch is ours [derived]):
each proximal step starts from π^k's parameters and follows stochastic policy gradients of
    f(π) = E_{y∼π, y'∼opp} P(y ≻ y') − β KL(π‖π_ref) − (β/η) KL(π‖π^k):
    ∇ℓ_θ(y) · sg[ P(y ≻ opp) − b(y) − β log(π_θ/π_ref)(y) − (β/η) log(π_θ/π^k)(y) ]   (Nash-MD-PG style),
with per-token KL credit: token n is credited the KL terms of tokens m ≥ n only (they are what it influences), and
a baseline b that does not depend on y (the leave-one-out mean return of the prompt's other samples).
With exact expectations and enough inner steps it reproduces the closed form (tests/test_nash_mp.py).

Paper → code
    the two proximal steps (extragradient, both anchored at π^k)     main(), "half step" / "full step"
    closed form of a proximal step                                  prox_step()            (--step closed)
    stochastic policy-gradient approximation                        pg_loss(), pg_step()   (--step pg)
    its estimates: P(y ≻ opponent), the baseline                    opponent_reward(), leave_one_out()
    the same gradient with exact expectations (tabular)             pg_step(..., exact=True) (--step pg-exact)
    both exact variants, one iteration                              exact_iteration()
    β, η                                                            Args.beta, Args.eta

Deviations (numbered)
    1. The update equations are known from secondary summaries of v1, not its text [review]; the PG estimator,
       the per-token KL credit and the leave-one-out baseline are our reading of "stochastic policy gradients"
       [derived].
    2. No exponential moving average: a summary says the LLM version adds an EMA "for stability" without saying
       of what; here the anchor is exactly π^k (the previous iterate's parameters).
    3. The reward of a sampled y is P(y ≻ opponent) estimated as the mean of the oracle's probabilities P(y ≻ y'_j)
       over K_opp opponent samples of the prompt (not a Bernoulli label against one y'), drawn once per proximal
       step: every inner step plays the same empirical opponent, which is unbiased for the true one but whose error
       does not average out within the step (the tabular runs level off higher with fewer opponent samples:
       docs/results.md, "Evidence behind the deviations").
    4. β defaults to the world's β (the games file's: the regularization the metrics measure), η to 2β (the largest
       step the stated conditions allow; then the claimed rate is (1+2β)^{−1} per iteration).
    5. Inner optimization: Adam at a constant learning rate for `inner_steps` steps per proximal step, K fresh
       on-policy samples per prompt each step; identical responses of a prompt are scored once, weighted by their
       count (the paper's optimizer and batch are not known). Each sample's baseline is the mean sequence return of
       the prompt's other K − 1 samples (RLOO), which leaves the gradient unbiased; it and the many opponent samples
       were chosen over a fixed ½ baseline against one opponent sample by their effect on the arena LM's gap
       (docs/results.md, "Evidence behind the deviations").
    6. Arena LM: π_ref is the SFT model's exact distribution including its invalid mass (common/arena.py).
    7. Tabular defaults (`--policy tabular`; `--help` lists each flag's default per world): large K and K_opp (a
       table scores each distinct action once, so they cost little) and a smaller learning rate, which lower the
       sampled iterates' floor (deviation 3's opponent error, Adam's constant-step jitter) below a tenth of the
       starting gap (bench/results/tabular_testbed.md). The paper's own setting is not known (deviation 1);
       `--step closed` is the exact update.
"""
from dataclasses import dataclass
from typing import Literal

import torch

from common.cli import BETA, cli, flag
from common.policy import adam, backward_in_micro_batches, batched_logprobs, copy_parameters, unique_responses
from common.run import RunDir
from common.world import WorldArgs, setup_world


@dataclass
class Args(WorldArgs):
    iterations: int | None = flag(lm=7, tabular=30, ge=1)
    """mirror-prox iterations k, each two proximal steps of `inner_steps` policy-gradient steps; every inner step
    judges each distinct sample against each distinct opponent sample of its prompt (deviation 7)"""
    step: Literal["pg", "pg-exact", "closed"] = "pg"
    """pg (stochastic policy gradient), pg-exact (tabular: that gradient in exact expectation) or closed (tabular)"""
    samples_per_prompt: int | None = flag(lm=8, tabular=1024, ge=1)
    """K responses y ∼ π_θ per prompt and inner step (≥ 2: each one's baseline is the mean return of the others)"""
    opponent_samples: int | None = flag(lm=16, tabular=2048, ge=1)
    """responses y' ∼ opponent per prompt, drawn once per proximal step; P(y ≻ opponent) is the mean over them"""
    inner_steps: int | None = flag(lm=4, tabular=6, ge=1)
    """optimizer steps per proximal step"""
    beta: float | None = flag(rule=BETA, gt=0)
    """β: KL coefficient to π_ref"""
    eta: float | None = flag(gt=0, rule=("2β, the largest the convergence conditions allow",
                                         lambda a, beta: 2 * a.beta))
    """η: the proximal term is (β/η) KL(π‖π^k)"""
    lr: float | None = flag(arena=3e-4, real=1e-6, tabular=0.03, gt=0,
                             lora={"arena": 0.003, "real": 1e-4})
    """Adam learning rate of the inner steps"""
    temperature: float = flag(1.0, gt=0)
    """sampling temperature of π_θ and of the opponent"""

    def check(self):
        super().check()
        if self.step != "pg" and self.policy != "tabular":
            raise ValueError(f"--step {self.step} needs --policy tabular (exact expectations over a finite action set)")
        if self.step == "pg" and self.samples_per_prompt < 2:
            raise ValueError("--samples-per-prompt must be ≥ 2 (each sample's baseline is the mean return of the "
                             "others)")


# ALGO LOGIC: the closed form and the policy-gradient loss -------------------------------------------------------

def prox_step(pi_k, pi_ref, P, opponent, beta, eta):
    """argmax_π E_π P(y ≻ opponent) − β KL(π‖π_ref) − (β/η) KL(π‖π^k), one game, float64 tensors:
    log π = [log π^k + η log π_ref + (η/β) P(· ≻ opponent)] / (1+η) + const."""
    logits = (pi_k.log() + eta * pi_ref.log() + (eta / beta) * (P @ opponent)) / (1 + eta)
    return torch.softmax(logits, dim=-1)


def pg_loss(policy_tok, ref_tok, anchor_tok, mask, reward, beta, eta, weights=None, baseline=None):
    """Policy-gradient surrogate of one proximal step of Nash-MP (arXiv 2505.19731 v1). No equation number: the
    estimator is our derivation [derived], see the module docstring and deviation 1; its gradient is that estimator.

    policy_tok, ref_tok, anchor_tok: (B, T) per-token log-probs of the sampled y under π_θ (grad), π_ref, π^k;
    mask (B, T) the scored positions; reward (B,) P(y ≻ opponent); weights (B,) optional (sample counts, or
    probabilities for exact expectations); baseline (B,) optional, default ½ (it must not depend on the row's y).
    Token n's advantage: reward − baseline − Σ_{m ≥ n} [β (log π_θ − log π_ref) + (β/η) (log π_θ − log π^k)]_m.
    Returns (loss, mean KL-to-ref estimate, mean KL-to-anchor estimate)."""
    mask = mask.to(policy_tok.dtype)
    kl_ref, kl_anchor = sampled_kl(policy_tok, ref_tok, anchor_tok, mask)      # (B, T) each
    per_tok = beta * kl_ref + (beta / eta) * kl_anchor
    to_go = per_tok.flip(-1).cumsum(-1).flip(-1)                               # Σ_{m ≥ n}
    b = 0.5 if baseline is None else baseline[:, None]
    adv = (reward[:, None] - b - to_go) * mask
    surrogate = -(policy_tok * adv * mask).sum(-1)                             # (B,)
    if weights is None:
        return surrogate.mean(), kl_ref.sum(-1).mean(), kl_anchor.sum(-1).mean()
    w = weights / weights.sum()
    return (w * surrogate).sum(), (w * kl_ref.sum(-1)).sum(), (w * kl_anchor.sum(-1)).sum()


def sampled_kl(policy_tok, ref_tok, anchor_tok, mask):
    """Per-token sampled KL terms (B, T), no grad: log π_θ − log π_ref and log π_θ − log π^k at the scored positions."""
    lp = policy_tok.detach()
    return (lp - ref_tok) * mask, (lp - anchor_tok) * mask


def sequence_return(policy_tok, ref_tok, anchor_tok, mask, reward, beta, eta):
    """(B,) R(y) = P(y ≻ opp) − β log(π_θ/π_ref)(y) − (β/η) log(π_θ/π^k)(y): the sampled value of the proximal
    objective f whose policy gradient pg_loss estimates (no grad)."""
    kl_ref, kl_anchor = sampled_kl(policy_tok, ref_tok, anchor_tok, mask.to(policy_tok.dtype))
    return reward - (beta * kl_ref + (beta / eta) * kl_anchor).sum(-1)


def leave_one_out(values, counts, group, K):
    """(U,) the mean of `values` over the other K − 1 samples of the row's prompt (RLOO baseline): rows are distinct
    responses standing for `counts` samples each (common.policy.unique_responses), `group` their prompt index.
    It does not depend on the row's own sample, so subtracting it leaves the policy gradient unbiased."""
    total = torch.zeros(int(group.max()) + 1, dtype=values.dtype, device=values.device)
    total.index_add_(0, group, counts.to(values) * values)
    return (total[group] - values) / (K - 1)


def opponent_reward(u, group, y_opp, K_opp, judge):
    """(U,) P(y ≻ opponent) estimated as the mean of P(y ≻ y'_j) over the K_opp opponent samples of y's prompt;
    each distinct (y, y') pair is judged once."""
    o_rows, o_counts = unique_responses(y_opp, K_opp)
    o = y_opp.select(o_rows)
    o_group = o_rows // K_opp
    a, b = [], []
    for k in torch.unique(group).tolist():
        i, j = (group == k).nonzero().flatten(), (o_group == k).nonzero().flatten()
        a.append(i.repeat_interleave(len(j)))
        b.append(j.repeat(len(i)))
    a, b = torch.cat(a), torch.cat(b)
    ua, ob = u.select(a), o.select(b)
    p = judge.prob(ua.prompts, ua.texts, ob.texts).cpu()
    return torch.zeros(len(u), dtype=p.dtype).index_add_(0, a, o_counts[b].to(p) * p) / K_opp


def opponent_samples(opponent, world, args):
    """K_opp responses per prompt of the opponent of a proximal step, drawn once at its start (deviation 3)."""
    with world.autocast():
        return opponent.sample(world.prompts, args.opponent_samples, generator=world.generator,
                               temperature=args.temperature)


def pg_step(policy, anchor, ref, opponent, world, args, exact=False):
    """One proximal step by policy gradient: policy starts at π^k's parameters (the caller's job) and takes
    args.inner_steps Adam steps on pg_loss. Sampled (exact=False): `opponent` holds the opponent's K_opp responses per
    prompt (opponent_samples()); each step draws K fresh responses per prompt from π_θ, scores each distinct one once
    (weighted by its count) and baselines it with the leave-one-out mean return of its prompt. exact=True (tabular):
    `opponent` is the opponent policy, every action weighted by π_θ(y) against its exact mixture. Returns mean stats."""
    opt = adam(policy, args.lr)
    gen, judge = world.generator, world.judge
    K, K_opp = args.samples_per_prompt, args.opponent_samples
    stats = []
    for _ in range(args.inner_steps):
        with world.autocast():
            if exact:
                y, weights, reward = exact_batch(policy, opponent, world)
                group = None
            else:
                y = policy.sample(world.prompts, K, generator=gen, temperature=args.temperature)
                rows, weights = unique_responses(y, K)
                group = rows // K
                y = y.select(rows)
                reward = opponent_reward(y, group, opponent, K_opp, judge)
            ref_tok = batched_logprobs(ref, y, args.infer_batch or len(y), per_token=True)   # no-grad, once a step
            anchor_tok = batched_logprobs(anchor, y, args.infer_batch or len(y), per_token=True)

        def loss_of(policy_tok):            # per-token ℓ_θ (U, T) -> the surrogate (the returns use it detached)
            dev = policy_tok.device
            r_tok, a_tok, mask = ref_tok.to(policy_tok), anchor_tok.to(policy_tok), y.token_mask.to(dev)
            rew, w = reward.to(dev, policy_tok.dtype), weights.to(dev, policy_tok.dtype)
            baseline = None
            if not exact:
                R = sequence_return(policy_tok, r_tok, a_tok, mask, rew, args.beta, args.eta)
                baseline = leave_one_out(R, weights.to(dev), group.to(dev), K)
            loss, kl_ref, kl_anchor = pg_loss(policy_tok, r_tok, a_tok, mask, rew, args.beta, args.eta, w, baseline)
            return loss, torch.stack([(w * rew).sum() / w.sum(), kl_ref, kl_anchor])
        opt.zero_grad(set_to_none=True)
        loss, aux = backward_in_micro_batches(policy, y, loss_of, args.micro_batch, per_token=True,
                                              autocast=world.autocast)
        opt.step()
        stats.append(torch.cat([loss[None], aux.detach()]))
    return torch.stack(stats).mean(0).tolist()


def exact_batch(policy, opponent, world):
    """Tabular: every candidate of every training game as one row, weighted by π_θ(y) (detached), with reward
    P(y ≻ opponent) computed exactly from the games' matrices."""
    games = world.prompts
    pi = policy.distribution(games)
    opp = opponent.distribution(games)
    prompts, texts, weights, reward = [], [], [], []
    for g, p, q in zip(games, pi, opp):
        prompts += [g.id] * g.n
        texts += list(g.candidates)
        weights += p.tolist()
        reward += (g.P @ q).tolist()
    y = policy.encode(prompts, texts)
    return y, torch.tensor(weights, dtype=torch.float64), torch.tensor(reward, dtype=torch.float64)


def closed_form_update(policy, pi_k, ref, world, args):
    """--step closed (tabular): both proximal steps exactly, on the training games; writes π^{k+1} into the logits."""
    games = world.prompts
    d_k, d_ref = pi_k.distribution(games), ref.distribution(games)
    with torch.no_grad():
        for g, pk, pr in zip(games, d_k, d_ref):
            pk, pr, P = torch.from_numpy(pk), torch.from_numpy(pr), torch.tensor(g.P)
            half = prox_step(pk, pr, P, pk, args.beta, args.eta)
            full = prox_step(pk, pr, P, half, args.beta, args.eta)
            row = policy.index[g.id]
            policy.theta[row, :g.n] = full.log()


def exact_iteration(policy, pi_k, ref, world, args) -> dict:
    """Tabular, no samples: one iteration of both proximal steps in closed form (--step closed) or by policy gradients
    in exact expectation (--step pg-exact: the half step against π^k, the full step against π^{k+½}, each from π^k).
    Returns the iteration's train/ row."""
    row = {"train/beta": args.beta, "train/eta": args.eta}
    if args.step == "closed":
        closed_form_update(policy, pi_k, ref, world, args)
        return row
    half = pg_step(policy, pi_k, ref, pi_k, world, args, exact=True)
    full_opp = policy.frozen_copy()                  # π^{k+½}
    copy_parameters(policy, pi_k)
    full = pg_step(policy, pi_k, ref, full_opp, world, args, exact=True)
    return {**step_stats(half, full), **row}


def step_stats(half, full) -> dict:
    """train/half/… and train/full/…: each proximal step's mean loss, reward P(y ≻ opponent) and sampled KLs."""
    return {f"train/{step}/{name}": v for step, stats in (("half", half), ("full", full))
            for name, v in zip(("loss", "reward", "kl_ref", "kl_anchor"), stats)}


def main(args: Args):
    # setup ---------------------------------------------------------------------------------------------------------
    world = setup_world(args)   # the flags' defaults resolved for the world and checked; π_ref, judge, prompts loaded
    policy, ref = world.policy, world.ref
    run = RunDir(args, "nash_mp", world, {"policy": policy})   # --resume: from the last complete iteration
    for k in run.iterations():
        pi_k = policy.frozen_copy()  # the anchor of both proximal steps, read at every inner step: the one copy kept
        if args.step != "pg":   # tabular: both proximal steps exactly, no samples
            with run.timed("train"):
                row = exact_iteration(policy, pi_k, ref, world, args)
            run.end_iteration(k, row)
            continue
        # sample + judge + loss + update: the half step (opponent π^k), then the full step (opponent π^{k+½}) ---------
        with run.timed("train"):
            half = pg_step(policy, pi_k, ref, opponent_samples(policy, world, args), world, args)
            full_opp = opponent_samples(policy, world, args)   # π^{k+½} plays the full step only through its samples
            copy_parameters(policy, pi_k)          # the full step starts again from π^k's parameters
            full = pg_step(policy, pi_k, ref, full_opp, world, args)
        run.end_iteration(k, {**step_stats(half, full), "train/beta": args.beta, "train/eta": args.eta})
    # save ----------------------------------------------------------------------------------------------------------
    return run.finish(policy.save)


if __name__ == "__main__":
    cli(main, Args)
