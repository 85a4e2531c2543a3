"""Nash Mirror Prox (Nash-MP).

Paper: Tiapkin, Calandriello, Ferret, Perrin, Vieillard, Ramé, Blondel — "Accelerating Nash Learning from Human
Feedback via Mirror Prox", arXiv 2505.19731 **v1** (later versions describe a different algorithm, "Nash Prox").
Provenance (ALGORITHMS.md §3): the abstract is the only primary text read [paper]; the update below comes from
agreeing secondary summaries [review]; its closed form is derived here [derived].

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
    ∇ℓ_θ(y) · sg[ P(y ≻ y') − ½ − β log(π_θ/π_ref)(y) − (β/η) log(π_θ/π^k)(y) ]   (Nash-MD-PG style),
with per-token KL credit: token n is credited the KL terms of tokens m ≥ n only (they are what it influences).
With exact expectations and enough inner steps it reproduces the closed form (tests/test_nash_mp.py).

Paper → code
    the two proximal steps (extragradient, both anchored at π^k)     main(), "half step" / "full step"
    closed form of a proximal step                                  prox_step()            (--step closed)
    stochastic policy-gradient approximation                        pg_loss(), pg_step()   (--step pg)
    the same gradient with exact expectations (tabular)             pg_step(..., exact=True) (--step pg-exact)
    β, η                                                            Args.beta, Args.eta

Deviations (numbered)
    1. The update equations are known from secondary summaries of v1, not its text [review]; the PG estimator,
       the per-token KL credit and the ½ baseline are our reading of "stochastic policy gradients" [derived].
    2. No exponential moving average: a summary says the LLM version adds an EMA "for stability" without saying
       of what; here the anchor is exactly π^k (the previous iterate's parameters).
    3. The reward of a sampled pair is the oracle's probability P(y ≻ y') (what a preference model returns),
       not a Bernoulli label; both are unbiased for the same gradient.
    4. β defaults to the games file's β (the regularization the metrics measure), η to 2β (the largest step the
       stated conditions allow; then the claimed rate is (1+2β)^{−1} per iteration).
    5. Inner optimization: Adam at a constant learning rate for `inner_steps` steps per proximal step, fresh
       on-policy samples each step (the paper's optimizer is not known).
    6. Arena LM: π_ref is the SFT model's exact distribution including its invalid mass (common/arena.py).
"""
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common.run import RunDir, comparison_table, fail, parse_args, setup_world


@dataclass
class Args:
    seed: int = 1
    """seed of every random draw (sampling, labels); CPU runs are bitwise reproducible"""
    policy: str = "lm"
    """lm (a causal LM; the arena SFT model by default) or tabular (one logit table per game)"""
    games: str | None = None
    """games file for evaluation, the tabular actions and the arena judge (default data/arena/games.json)"""
    model: str | None = None
    """HF-layout model folder to start from and regularize to (default data/arena, the arena SFT model)"""
    judge: str = "arena"
    """preference oracle: arena (the games' matrices) or rm:DIR (a Bradley-Terry reward model folder)"""
    prompts: str | None = None
    """.jsonl of {"prompt": ...} to train on (real-checkpoint world; default: the games' train split)"""
    run_dir: str | None = None
    """output folder (default runs/nash_mp__<seed>__<time>)"""
    device: str | None = None
    """cpu or cuda (default cuda when available; bf16 autocast there)"""
    threads: int = 1
    """CPU threads of torch (1 is fastest for the arena's 1M-parameter model and for tables)"""
    iterations: int = 6
    """mirror-prox iterations k (two proximal steps, two preference queries per sample, each)"""
    step: str = "pg"
    """pg (stochastic policy gradient), pg-exact (tabular: the same gradient in exact expectation) or closed (tabular)"""
    samples_per_prompt: int = 4
    """responses y ∼ π_θ (each against one y' ∼ opponent) per prompt and inner step"""
    inner_steps: int = 4
    """optimizer steps per proximal step"""
    beta: float | None = None
    """β: KL coefficient to π_ref (default: the games file's β)"""
    eta: float | None = None
    """η: the proximal term is (β/η) KL(π‖π^k) (default 2β, the largest the convergence conditions allow)"""
    lr: float | None = None
    """Adam learning rate of the inner steps (default 2e-4 for lm, 0.3 for tabular)"""
    temperature: float = 1.0
    """sampling temperature of π_θ and of the opponent"""


# ALGO LOGIC: the closed form and the policy-gradient loss -------------------------------------------------------

def prox_step(pi_k, pi_ref, P, opponent, beta, eta):
    """argmax_π E_π P(y ≻ opponent) − β KL(π‖π_ref) − (β/η) KL(π‖π^k), one game, float64 tensors:
    log π ∝ [log π^k + η log π_ref + (η/β) P(· ≻ opponent)] / (1+η)."""
    logits = (pi_k.log() + eta * pi_ref.log() + (eta / beta) * (P @ opponent)) / (1 + eta)
    return torch.softmax(logits, dim=-1)


def pg_loss(policy_tok, ref_tok, anchor_tok, mask, reward, beta, eta, weights=None):
    """Policy-gradient surrogate of one proximal step of Nash-MP (arXiv 2505.19731 v1). No equation number: the
    estimator is our derivation [derived], see the module docstring and deviation 1; its gradient is that estimator.

    policy_tok, ref_tok, anchor_tok: (B, T) per-token log-probs of the sampled y under π_θ (grad), π_ref, π^k;
    mask (B, T) the scored positions; reward (B,) P(y ≻ y'); weights (B,) optional (exact expectations).
    Token n's advantage: reward − ½ − Σ_{m ≥ n} [β (log π_θ − log π_ref) + (β/η) (log π_θ − log π^k)]_m.
    Returns (loss, mean KL-to-ref estimate, mean KL-to-anchor estimate)."""
    mask = mask.to(policy_tok.dtype)
    lp = policy_tok.detach()
    kl_ref = (lp - ref_tok) * mask                                             # (B, T)
    kl_anchor = (lp - anchor_tok) * mask
    per_tok = beta * kl_ref + (beta / eta) * kl_anchor
    to_go = per_tok.flip(-1).cumsum(-1).flip(-1)                               # Σ_{m ≥ n}
    adv = (reward[:, None] - 0.5 - to_go) * mask
    surrogate = -(policy_tok * adv * mask).sum(-1)                             # (B,)
    if weights is None:
        return surrogate.mean(), kl_ref.sum(-1).mean(), kl_anchor.sum(-1).mean()
    w = weights / weights.sum()
    return (w * surrogate).sum(), (w * kl_ref.sum(-1)).sum(), (w * kl_anchor.sum(-1)).sum()


def pg_step(policy, anchor, ref, opponent, world, args, exact=False):
    """One proximal step by policy gradient: policy starts at π^k's parameters (the caller's job) and takes
    args.inner_steps Adam steps on pg_loss with fresh samples y ∼ π_θ, y' ∼ opponent (or, exact=True, every
    action weighted by π_θ(y) against the opponent's exact mixture: tabular only). Returns mean stats."""
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    gen, judge = world.generator, world.judge
    stats = []
    for _ in range(args.inner_steps):
        with world.autocast():
            if exact:
                y, weights, reward = exact_batch(policy, opponent, world)
            else:
                K = args.samples_per_prompt
                y = policy.sample(world.prompts, K, generator=gen, temperature=args.temperature)
                y_opp = opponent.sample(world.prompts, K, generator=gen, temperature=args.temperature)
                reward = judge.prob(y.prompts, y.texts, y_opp.texts)
                weights = None
            with torch.no_grad():
                ref_tok, anchor_tok = ref.token_logprobs(y), anchor.token_logprobs(y)
            policy_tok = policy.token_logprobs(y)
        dev = policy_tok.device
        loss, kl_ref, kl_anchor = pg_loss(policy_tok, ref_tok.to(policy_tok),
                                          anchor_tok.to(policy_tok), y.token_mask.to(dev),
                                          reward.to(dev, policy_tok.dtype), args.beta, args.eta,
                                          None if weights is None else weights.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats.append(torch.stack([loss.detach(), reward.to(dev).mean().to(loss.dtype), kl_ref, kl_anchor]))
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


def main(args: Args):
    # setup -------------------------------------------------------------------------------------------------
    if args.step not in ("pg", "pg-exact", "closed"):
        fail(f"--step {args.step!r}: expected pg, pg-exact or closed")
    if args.step != "pg" and args.policy != "tabular":
        fail(f"--step {args.step} needs --policy tabular (exact expectations over a finite action set)")
    for name in ("iterations", "samples_per_prompt", "inner_steps"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be ≥ 1")
    world = setup_world(args)
    args.beta = world.beta if args.beta is None else args.beta
    args.eta = 2 * args.beta if args.eta is None else args.eta
    args.lr = args.lr if args.lr is not None else (0.3 if args.policy == "tabular" else 2e-4)
    if args.lr <= 0 or args.temperature <= 0:
        fail(f"--lr and --temperature must be > 0 (got {args.lr}, {args.temperature})")
    if args.beta <= 0 or args.eta <= 0:
        fail(f"need beta > 0 and eta > 0 (got beta={args.beta}, eta={args.eta})")
    policy, ref = world.policy, world.ref
    run = RunDir(args, "nash_mp")
    ref_metrics = world.evaluate(policy)
    run.log({"iteration": 0, **ref_metrics})
    metrics = ref_metrics

    bar = tqdm(range(1, args.iterations + 1), desc="nash_mp", unit="iter")
    for k in bar:
        pi_k = policy.frozen_copy()                   # the anchor of both proximal steps
        anchor_state = {n: p.detach().clone() for n, p in policy.state_dict().items()}
        t0 = time.perf_counter()
        row = {"iteration": k}
        # sample + judge + loss + update: half step (opponent π^k), then full step (opponent π^{k+½}) ------------
        if args.step == "closed":
            closed_form_update(policy, pi_k, ref, world, args)
        else:
            exact = args.step == "pg-exact"
            half_stats = pg_step(policy, pi_k, ref, pi_k, world, args, exact)
            pi_half = policy.frozen_copy()
            policy.load_state_dict(anchor_state)      # the full step starts again from π^k's parameters
            full_stats = pg_step(policy, pi_k, ref, pi_half, world, args, exact)
            for name, h, f in zip(("loss", "reward", "kl_ref", "kl_anchor"), half_stats, full_stats):
                row[f"train/half/{name}"], row[f"train/full/{name}"] = h, f
        t_train = time.perf_counter() - t0
        # eval --------------------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        metrics = world.evaluate(policy)
        row.update(metrics)
        row.update({"train/beta": args.beta, "train/eta": args.eta, "perf/train_s": t_train,
                    "perf/eval_s": time.perf_counter() - t0})
        run.log(row)
        bar.set_postfix({k_.split("/")[-1]: f"{metrics[k_]:.4f}" for k_ in ("eval/dual_gap", "eval/win_vs_ref")
                         if k_ in metrics})

    # save ------------------------------------------------------------------------------------------------------
    policy.save(run.tmp)
    path = run.finish()
    print(comparison_table(ref_metrics, metrics, world.games))
    print(f"run dir: {path}")
    return path


if __name__ == "__main__":
    main(parse_args(Args))
