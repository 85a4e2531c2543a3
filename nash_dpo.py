"""Direct Nash Optimization (DNO-Prct), with online DPO and iterative DPO as flags of the same loop.

Paper: Rosset, Cheng, Mitra, Santacroce, Awadallah, Xie — "Direct Nash Optimization: Teaching Language Models to
Self-Improve with General Preferences", arXiv 2404.03715v1 (full text read; equation numbers as there) [paper].
Equations, provenance and derivations: docs/algorithms.md §2.
Iterative DPO: the RLHFlow recipe, run_loop2.sh of RLHFlow/Online-RLHF at commit c5f1d27 (best vs worst of K
samples by a reward model, DPO against the previous iterate) [code]; online DPO: pairs of two on-policy samples,
each labelled once by the oracle, DPO against the fixed SFT model (deviation 8).

DNO's conceptual algorithm (Alg. 1) is soft policy iteration on the preference game:
    r_t(x, y) = P(y ≻ π_t | x)                        the expected win rate against the current policy
    π_{t+1}(y) ∝ π_t(y) · exp(r_t(y) / η)             the target (Eq. 9)
reached by the regression of Eq. (8), with Δ = log π(y₁)/π_t(y₁) − log π(y₂)/π_t(y₂):
    max_π E_{y₁,y₂}[ σ(r_t(y₁) − r_t(y₂)) log σ(η Δ) + σ(r_t(y₂) − r_t(y₁)) log σ(−η Δ) ],
whose maximizer has η Δ = r_t(y₁) − r_t(y₂) on every pair, i.e. Eq. (9). DNO-Prct (Alg. 2) samples K outputs per
prompt from π_t, ranks them by their win rates against each other, keeps a large-margin (best, worst) pair and
minimizes the contrastive loss of Eq. (13), DPO with the previous iterate as the anchor:
    L(π) = −E log σ( η [ log π(y⁺)/π_t(y⁺) − log π(y⁻)/π_t(y⁻) ] ).
The same loss with another anchor and other pairs gives the baselines (docs/algorithms.md §2):
    DNO-Prct         --ref prev --pairs dno          (the default) anchor π_t, win-rate best vs worst, margin filter
    iterative DPO    --ref prev --pairs best-worst   anchor π_t, best vs worst by the oracle's scores (RLHFlow)
    online DPO       --ref sft  --pairs random       anchor π_ref, one i.i.d. pair per group, one Bernoulli label
The DPO β of the baselines is this script's η (same place in the loss). With anchor π_t the iterates chase the
UNregularized game (Eq. 9 has no π_ref); with anchor π_ref on Bradley–Terry preferences online DPO converges to
π_ref e^{r/η}, the KL-regularized RLHF optimum, which is not π* in general (Calandriello et al. 2024, App. F).
Symbols: η is the inverse step size of a mirror-descent step here as in inpo.py (π_t^{1−τ/η}… with τ = 0);
nash_mp.py's η is a different quantity (the ratio of its two KL weights), as in that paper.

Paper → code
    Alg. 1/2 loop (π₁ = π_ref; sample from π_t, query, train π_{t+1} from π_t)   main(), the iteration loop
    r_t and the target of Eq. (9) (tabular)                                       soft_policy_iteration_step()
    Eq. (8) soft-label regression, Eq. (13) contrastive loss                      dpo_loss()
    Alg. 2: K samples, win-rate ranking, large-margin pairs                      round_robin(), dno_pairs()
    RLHFlow best vs worst / online DPO random pair                                best_worst_pairs(), random_pairs()
    exact expectation of the chosen objective (tabular)                           exact_loss(), exact_iteration()

Deviations from the paper (numbered)
    1. Sampling at temperature 1 without top-p (paper: 5 samples at temperature 0.7, top-p 0.95), so the samples
       are draws from π_t itself and their win rates against each other estimate Alg. 1's r_t(y) = P(y ≻ π_t);
       `--temperature 0.7` restores the paper's temperature.
    2. No gold (teacher) response among the K candidates: the oracle is the only source of preference.
    3. Win rates from one Bernoulli oracle label per pair of the K samples (the paper's annotator scores each
       pair with GPT-4); "large margin" is r̂(y⁺) − r̂(y⁻) ≥ `--margin` (default ½; our threshold).
    4. η defaults to the world's β (the games file's: the regularization the arena metrics measure) for every mode.
    5. Optimization: Adam at a constant learning rate for `epochs` passes over the iteration's pairs (paper:
       AdamW, one epoch or less per iteration, on a 7B model). Each prompt gets `groups_per_prompt` independent
       groups of K samples (one pair per group) so that 72 arena prompts give enough pairs per iteration.
    6. `--pairs exact` (tabular only) minimizes the exact expectation with L-BFGS in float64: with --ref prev the
       soft-label regression of Eq. (8) over all ordered pairs of i.i.d. draws from π_t (one iteration = Eq. 9);
       with --ref sft online DPO's expected loss, every ordered pair weighted π_t(y)π_t(y')P(y ≻ y'). (Hard
       best-vs-worst pairs alone have no finite minimizer, so the exact check uses Eq. 8.)
    7. Arena LM: π_ref is the SFT model's exact distribution including its invalid mass (common/arena.py).
    8. The baselines' settings (not DNO's paper). Iterative DPO: run_loop2.sh samples K = 4 at temperature 1 and
       trains 2 epochs with label smoothing 0.1; here K = `samples_per_prompt` (default 5, as for DNO), no label
       smoothing. Online DPO is "online" per iteration: all of an iteration's pairs are drawn from the frozen π_t,
       then trained on for `epochs` passes, where OAIF (Guo et al. 2024, arXiv 2402.04792) samples fresh pairs
       from the current policy at every optimizer step.
    9. Tabular defaults (`--policy tabular`; `--help` lists each flag's default per world), for every mode: more
       groups per prompt and full-batch Adam steps (batch 2²⁰), which make the number of steps independent of how many
       games a file holds; with them, online DPO's last iterate gets within a tenth of the starting KL(π_r‖π_ref) of
       π_r on the BT games of tests/test_tabular_defaults.py (bench/results/tabular_testbed.md). The paper's DNO-Prct
       sampling (K = 5, the default, at temperature 0.7) is `--temperature 0.7`.
"""
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common.cli import BETA, cli, flag
from common.policy import adam, backward_in_micro_batches, batched_logprobs
from common.run import RunDir
from common.world import WorldArgs, setup_world


@dataclass
class Args(WorldArgs):
    iterations: int | None = flag(lm=6, tabular=10, ge=1)
    """T: number of iterations (π_{t+1} is trained from π_t)"""
    ref: Literal["prev", "sft"] = "prev"
    """anchor of the loss: prev (π_t: DNO Eq. 13, iterative DPO) or sft (the fixed π_ref: online DPO)"""
    pairs: Literal["dno", "best-worst", "random", "exact"] = "dno"
    """dno (win rates, large margin), best-worst (RLHFlow), random (online DPO) or exact (tabular, L-BFGS)"""
    samples_per_prompt: int = flag(5, ge=2)
    """K, samples in each group (DNO: 5); --pairs random uses 2"""
    groups_per_prompt: int | None = flag(lm=8, tabular=2048, ge=1)
    """independent groups of K samples per prompt and iteration; each group gives at most one pair"""
    margin: float = flag(0.5, gt=0)
    """--pairs dno keeps a pair only when r̂(y⁺) − r̂(y⁻) ≥ margin (win rates among the K samples), in (0, 1]"""
    eta: float | None = flag(rule=BETA, gt=0)
    """η of Eqs. (8), (9), (13), the DPO β of the baselines"""
    lr: float | None = flag(arena=2e-4, real=1e-6, tabular=0.03, gt=0,
                             lora={"arena": 0.002, "real": 1e-4})
    """Adam learning rate"""
    epochs: int | None = flag(lm=2, tabular=30, ge=1)
    """passes over an iteration's pairs"""
    batch_size: int | None = flag(lm=64, tabular=2 ** 20, ge=1)
    """pairs per optimizer step (tabular: all of an iteration's pairs)"""
    temperature: float = flag(1.0, gt=0)
    """sampling temperature of π_t (paper 0.7; 1 samples from π_t itself)"""

    def check(self):
        super().check()
        if self.pairs == "exact" and self.policy != "tabular":
            raise ValueError("--pairs exact needs --policy tabular (exact expectations over a finite action set)")
        if self.margin > 1:
            raise ValueError(f"--margin {self.margin}: a win-rate difference in (0, 1]")


# ALGO LOGIC: the loss and its closed form ------------------------------------------------------------------

def dpo_loss(policy_chosen_logps, policy_rejected_logps, anchor_chosen_logps, anchor_rejected_logps, eta,
             labels=None, weights=None):
    """Eq. (13) of arXiv 2404.03715v1 (= DPO, Eq. 7 of arXiv 2305.18290v3, with anchor ℓ_a for π_ref and η for β):
    −log σ(margin), margin = η[(ℓ_θ − ℓ_a)(y⁺) − (ℓ_θ − ℓ_a)(y⁻)].

    *_logps : (B,) summed log-probs; ℓ_θ carries the gradient, the anchor ℓ_a (π_t or π_ref) is frozen.
    labels  : (B,) optional soft labels p ∈ [0, 1] — Eq. (8): −[p log σ(margin) + (1 − p) log σ(−margin)];
              None means p = 1 (hard pairs, Eq. 13).
    weights : (B,) optional pair weights (exact expectations); the loss is Σ w·ℓ / Σ w.
    Returns (loss, margin) with margin (B,) detached."""
    margin = eta * ((policy_chosen_logps - anchor_chosen_logps) - (policy_rejected_logps - anchor_rejected_logps))
    per_pair = -F.logsigmoid(margin) if labels is None else \
        -(labels * F.logsigmoid(margin) + (1 - labels) * F.logsigmoid(-margin))
    loss = per_pair.mean() if weights is None else (weights * per_pair).sum() / weights.sum()
    return loss, margin.detach()


def soft_policy_iteration_step(pi_t, P, eta):
    """Eq. (9): π_{t+1} ∝ π_t · exp(r_t/η), r_t = P(· ≻ π_t); float64 tensors, one game."""
    return torch.softmax(pi_t.log() + (P @ pi_t) / eta, dim=-1)


# ALGO LOGIC: pairs ----------------------------------------------------------------------------------------

def _compare(y, i, j, judge, gen=None):
    """Oracle on rows i vs j (LongTensors): Bernoulli labels (gen given) or probabilities P(y_i ≻ y_j)."""
    prompts = [y.prompts[k] for k in i.tolist()]
    a, b = [y.texts[k] for k in i.tolist()], [y.texts[k] for k in j.tolist()]
    return judge.label(prompts, a, b, gen).cpu() if gen is not None else judge.prob(prompts, a, b).cpu()


def round_robin(y, K, judge, gen=None):
    """Rows gK … gK + K − 1 of y are group g: K i.i.d. samples for one prompt. Every pair (i < j) of a group meets
    once (K(K−1)/2 oracle calls, each for all groups at once). Returns the first rows (G,) and each sample's wins
    (G, K): Bernoulli labels when `gen` is given, else the expected wins Σ_j P(y_i ≻ y_j)."""
    base = torch.arange(0, len(y), K)
    wins = torch.zeros(len(base), K, dtype=torch.float64)
    for i in range(K):
        for j in range(i + 1, K):
            i_won = _compare(y, base + i, base + j, judge, gen).to(torch.float64)
            wins[:, i] += i_won
            wins[:, j] += 1 - i_won
    return base, wins


def dno_pairs(y, K, judge, gen, margin):
    """Alg. 2 of the paper: every pair of a group's K samples is labelled once, each sample's win rate
    r̂(y) = wins/(K − 1) estimates r_t(y) = P(y ≻ π_t); (y⁺, y⁻) = (argmax r̂, argmin r̂), kept only when
    r̂(y⁺) − r̂(y⁻) ≥ margin. Returns chosen rows, rejected rows (LongTensors) and the win rates (G, K)."""
    base, wins = round_robin(y, K, judge, gen)
    rate = wins / (K - 1)
    keep = (rate.max(1).values - rate.min(1).values) >= margin
    return (base + rate.argmax(1))[keep], (base + rate.argmin(1))[keep], rate


def best_worst_pairs(y, K, judge):
    """RLHFlow's iterative DPO with a general oracle: score each sample by its expected win rate against the other
    K − 1 of its group (under Bradley–Terry the same order as the reward), chosen = best, rejected = worst; groups
    whose scores are all equal (e.g. K copies of one answer) give no pair. No label noise, no margin filter."""
    base, score = round_robin(y, K, judge)
    keep = score.max(1).values > score.min(1).values
    return (base + score.argmax(1))[keep], (base + score.argmin(1))[keep]


def random_pairs(y, judge, gen):
    """Online DPO: rows (2g, 2g+1) are two i.i.d. samples from π_t; one Bernoulli label orders them."""
    a = torch.arange(0, len(y), 2)
    b = a + 1
    a_wins = _compare(y, a, b, judge, gen)
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def exact_loss(policy, pi_t, anchor, P, eta, soft):
    """Tabular only: the exact expectation over the training games of every ordered pair (y₁, y₂), y₁ ≠ y₂, drawn
    i.i.d. from π_t. soft=True: Eq. (8), label σ(r_t(y₁) − r_t(y₂)), r_t = P(· ≻ π_t), weight π_t(y₁)π_t(y₂);
    soft=False: online DPO's λ_P expectation, hard label, weight π_t(y₁)π_t(y₂)P(y₁ ≻ y₂).
    policy, pi_t, anchor: TabularPolicy over the games; P: (G, n, n) float64, 0-padded (weight 0 off the train set)."""
    lp, lt, la = policy.log_probs(), pi_t.log_probs(), anchor.log_probs()             # (G, n), −inf on padding
    valid = policy.valid
    lp, lt, la = (x.masked_fill(~valid, 0.0) for x in (lp, lt, la))
    diff = lambda x: x[:, :, None] - x[:, None, :]                                     # (G, n, n): x_y₁ − x_y₂
    pt = lt.exp() * valid
    weights = pt[:, :, None] * pt[:, None, :] * (1 - torch.eye(P.shape[-1], dtype=P.dtype, device=P.device))
    weights = weights * (P.abs().sum(-1, keepdim=True) > 0)                            # games in the train split
    if soft:
        r = (P @ pt[..., None])[..., 0]                                                # (G, n): r_t(y) = P(y ≻ π_t)
        labels = torch.sigmoid(diff(r))
    else:
        weights, labels = weights * P, None
    loss, _ = dpo_loss(diff(lp), 0.0, diff(la), 0.0, eta, labels, weights)
    return loss


def exact_iteration(policy, ref, world, args) -> dict:
    """--pairs exact (tabular): one iteration without samples, the exact expected loss over the training games
    minimized by L-BFGS (deviation 6): Eq. (8) with --ref prev (one iteration = Eq. 9), online DPO's with --ref sft.
    Returns the iteration's train/ row."""
    pi_t = policy.frozen_copy()     # read during the update (a table: a copy costs nothing)
    anchor = pi_t if args.ref == "prev" else ref
    P = policy.matrices(world.prompts)   # (G, n, n), zero-padded; games outside the training split weigh 0
    losses, _ = policy.minimize(lambda: exact_loss(policy, pi_t, anchor, P, args.eta, soft=args.ref == "prev"),
                                args.epochs)
    return {"train/loss": torch.stack(losses).mean(), "train/pairs": 0, "train/eta": args.eta}


def main(args: Args):
    # setup ---------------------------------------------------------------------------------------------------------
    world = setup_world(args)   # the flags' defaults resolved for the world and checked; π_ref, judge, prompts loaded
    policy, ref, judge, gen = world.policy, world.ref, world.judge, world.generator
    run = RunDir(args, "nash_dpo", world, {"policy": policy})   # --resume: from the last complete iteration
    for t in run.iterations():
        if args.pairs == "exact":   # tabular: the exact expected loss, no samples
            with run.timed("train"):
                row = exact_iteration(policy, ref, world, args)
            run.end_iteration(t, row)
            continue
        # sample + judge + pairs: π_t is the policy before this iteration's update, sampled and scored first ---------
        row = {"train/eta": args.eta}
        with run.timed("sample"), world.autocast():
            K = 2 if args.pairs == "random" else args.samples_per_prompt
            y = policy.sample(world.prompts, K * args.groups_per_prompt, generator=gen, temperature=args.temperature)
            if args.pairs == "dno":
                chosen, rejected, rate = dno_pairs(y, K, judge, gen, args.margin)
                row["train/winrate_gap"] = (rate.max(1).values - rate.min(1).values).mean()
            elif args.pairs == "best-worst":
                chosen, rejected = best_worst_pairs(y, K, judge)
            else:
                chosen, rejected = random_pairs(y, judge, gen)
            anchor_lp = batched_logprobs(policy if args.ref == "prev" else ref, y, args.infer_batch)  # frozen ℓ_a
        # loss + update: Eq. (13) against the anchor, from π_t (deviation 5) ----------------------------------------
        with run.timed("train"):
            opt, losses, margins = adam(policy, args.lr), [], []
            for _ in range(args.epochs if len(chosen) else 0):
                order = torch.randperm(len(chosen), generator=world.shuffle_generator)
                for s in range(0, len(chosen), args.batch_size):
                    w, l = chosen[order[s:s + args.batch_size]], rejected[order[s:s + args.batch_size]]

                    def loss_of(lp):   # ℓ_θ of the chosen rows, then of the rejected ones -> Eq. (13)
                        return dpo_loss(lp[:len(w)], lp[len(w):], anchor_lp[w].to(lp.device),
                                        anchor_lp[l].to(lp.device), args.eta)
                    opt.zero_grad(set_to_none=True)
                    loss, margin = backward_in_micro_batches(policy, y.select(torch.cat([w, l])), loss_of,
                                                             args.micro_batch, autocast=world.autocast)
                    opt.step()
                    losses.append(loss)
                    margins.append(margin.mean())
        run.end_iteration(t, {"train/loss": torch.stack(losses).mean() if losses else None,
                              "train/margin": torch.stack(margins).mean() if margins else None,
                              "train/pairs": len(chosen), **row})
    # save ----------------------------------------------------------------------------------------------------------
    return run.finish(policy.save)


if __name__ == "__main__":
    cli(main, Args)
