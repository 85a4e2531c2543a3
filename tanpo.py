"""TANPO (two-agent Nash policy optimization) and SADPO (its single-agent approximation).

Paper: "Provably Efficient and Practical Self-Play for Better LLM Alignment", ICLR 2025 submission (rejected),
OpenReview ed75tWzgt0. The paper's text was not available: only its abstract, the reviews and the authors' replies
are public. Provenance marks (docs/algorithms.md §4): [review] known only from that public discussion; [derived]
derived here from the stated framework (the derivation is below: check it). Equation numbers other than Eq. 3 are
unknown.

The game (Eq. 3) [review]:  V(π, μ) = E_x[ r(a¹) − r(a²) − α KL(π‖π_ref) + α KL(μ‖π_ref) ],  a¹ ∼ π, a² ∼ μ;
π the max-player, μ the min-player, r a Bradley–Terry reward. Its equilibrium is π = μ = π_r ∝ π_ref e^{r/α}.
Iteration t [review]: π_t samples at temperature 0.7, μ_t at 0.5; the oracle orders each pair (a¹, a²); the
pairs accumulate in D. The max-player is updated first ("the Nash equilibrium value function under any estimated
reward is always zero … leaving only the DPO loss"); π_{t+1} is trained from π_t:
    L_max(π) = −mean_D log σ(α[(ℓ_θ − ℓ_ref)(a_w) − (ℓ_θ − ℓ_ref)(a_l)])
The min-player minimizes "a DPO loss with an additional exploration bonus", an expectation of log μ under π_{t+1}
[review]. Its form [derived]: μ plays the optimistic reward r̂ = argmax_r [ −min_μ V_r(π_{t+1}, μ) − η L_MLE(r; D) ].
The inner minimum is attained at μ_r ∝ π_ref e^{r/α}; with r = α log(μ_r/π_ref) + α log Z_r (DPO's
reparameterisation)
    −min_μ V_r(π_{t+1}, μ) = α E_{a∼π_{t+1}}[log π_ref(a) − log μ_r(a)] + α KL(π_{t+1}‖π_ref)   (last term: no r)
and L_MLE(r; D) = L_DPO(μ_r; D). Dividing by η and writing μ for μ_r (μ_{t+1} trained from μ_t):
    L_min(μ) = L_DPO(μ; D) + c_t · mean_x E_{a∼π_{t+1}(·|x)}[log μ(a|x)],    c_t = (α/η)/t   (deviation 2)
Sign: the min-player is optimistic about its own payoff −V, so the bonus lowers μ's likelihood of what the
max-player now produces: μ explores elsewhere and the pairs become more diverse (the paper's Fig. 1 claim); the
opposite sign would pull μ toward π_{t+1}. SADPO [review]: one policy; K = 4 samples per prompt, the pair = the
two with the highest and the lowest length-normalised log π_ref, labelled once;
    L(π) = L_DPO(π; D) + c_t · mean_x E_{a∼π_ref(·|x)}[log π(a|x)].
Diversity (Fig. 1) [review]: mean over the new pairs of |ℓ_ref(a¹)/|a¹| − ℓ_ref(a²)/|a²||, |a| in tokens.

Paper → code
    Eq. (3): α, and η of the optimistic reward                        Args.alpha (it plays DPO's β), Args.eta
    iteration t: sample (temperatures 0.7 / 0.5), label, append to D  main(), "sample + judge + pairs", cat_samples()
    max-player: DPO on D against π_ref                                dpo_loss(), update()
    min-player: DPO + exploration bonus under π_{t+1}                 dpo_loss() + exploration_bonus(), update()
    SADPO: extremes of ℓ_ref/length among K samples, bonus under π_ref  extreme_pairs(), --single-agent
    diversity metric (Fig. 1)                                         train/diversity
    exact expectations (tabular, deviation 5)                         exact_dpo(), exact_iteration(), --pairs exact

Deviations (numbered)
    1. The losses are reconstructed from the reviews and the authors' replies [review]; the bonus term and its sign
       are derived [derived]. The paper's η is unknown: default η = 10 (smaller values let the bonus win, deviation
       2; the arena figure: docs/results.md, "Evidence behind the deviations").
    2. Bonus weight c_t = (α/η)/t. The theory's L_MLE is a SUM over the history (t·N pairs after t iterations)
       while the bonus carries α/η once; dividing both by |D| to use a mean gives the 1/t decay (N is folded into
       η). It matters: the bonus pulls c_t·π_{t+1}(a) against the DPO term's α·(D's mass of pairs that a wins), and
       when it wins, L_min decreases without bound as μ(a) → 0 — at η = 1 this happens on typical games. Tabular
       --pairs exact stops with an error then; sampled runs take finitely many Adam steps and drift (the arena LM's
       min-player moves its mass to invalid text). On a BT game π_r is a stationary point of L_min as soon as
       π_{t+1} = π_r (the bonus gradient in the logits, c_t(π_{t+1} − μ), vanishes there), and a local minimum once
       c_t is small: the exact iterates reach it (tests/test_tanpo.py).
    3. Cost: D grows every iteration, but each player takes epochs × ⌈new pairs / batch⌉ Adam steps per iteration,
       on minibatches drawn uniformly from all of D (each epoch visits a random subset of D the size of the new
       pairs), not passes over all of D. The bonus of a step is a random minibatch of the `bonus_samples` per prompt
       drawn from π_{t+1} (SADPO: π_ref) at temperature 1.
    4. `pairs_per_prompt` pairs per prompt and iteration (the paper: one); α defaults to the world's β (the games
       file's), so the run targets the regularization that the metrics measure; Adam at a constant learning rate,
       fresh each iteration.
    5. `--pairs exact` (tabular, TANPO only): D_t is replaced by its expectation, the mixture over s ≤ t of the
       tempered pair distributions π_s^{1/0.7} × μ_s^{1/0.5}, every ordered pair (a, b) weighted by P(a ≻ b); the
       bonus by Σ_a π_{t+1}(a) log μ(a); each loss is minimized with L-BFGS in float64. On a BT game the max-player
       is then π_r after one iteration (the DPO optimum on a D of full support). SADPO's exact pair distribution
       (the extremes of K draws) is not implemented: --single-agent is sampled only.
    6. Arena LM: π_ref is the SFT model's exact distribution including its invalid mass (common/arena.py).
    7. Which player the paper reports is not public. Here the min-player μ is the run's policy (eval/…, saved at
       the run dir root) and the max-player π is logged next to it (eval_max/…, max_player/ or policy_max.json);
       the README's table shows both. SADPO's sampling temperature is not known either: it uses the max-player's
       0.7 (`--temperature-max`).
    8. Tabular defaults (`--policy tabular`; `--help` lists each flag's default per world), TANPO and SADPO: more
       iterations and pairs per prompt, each player's step on as many random pairs of D as were added (batch 2²⁰).
       With them both players' KL(π_r‖·) to π_r ∝ π_ref e^{r/α} falls below a tenth of π_ref's on the BT games of
       tests/test_tabular_defaults.py (bench/results/tabular_testbed.md). The paper's one pair per prompt is
       `--pairs-per-prompt 1`.

Symbols: α is the KL coefficient of Eq. (3) and plays DPO's β. η weights the likelihood in the optimistic reward
(the bonus coefficient is c_t = (α/η)/t): it is neither inpo.py's and nash_dpo.py's η (an inverse step size) nor
nash_mp.py's (a ratio of two KL weights).
"""
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common.cli import BETA, cli, fail, flag
from common.policy import Samples, TabularPolicy, adam, backward_in_micro_batches, batched_logprobs
from common.run import RunDir
from common.world import WorldArgs, setup_world


@dataclass
class Args(WorldArgs):
    iterations: int | None = flag(lm=6, tabular=40, ge=1)
    """T: self-play iterations (sample, label, update the max-player, then the min-player)"""
    single_agent: bool = False
    """SADPO: one policy; pair = best/worst of K samples by length-normalised log π_ref; bonus under π_ref"""
    pairs: Literal["sampled", "exact"] = "sampled"
    """sampled (oracle-labelled pairs accumulate in D) or exact (tabular TANPO: D's expectation, L-BFGS)"""
    pairs_per_prompt: int | None = flag(lm=4, tabular=512, ge=1)
    """pairs added to D per prompt and iteration (SADPO: groups of K samples, one pair each; the paper: 1)"""
    alpha: float | None = flag(rule=BETA, gt=0)
    """α of Eq. (3), the KL coefficient to π_ref; named α as in the paper, it plays DPO's β"""
    eta: float = flag(10.0, gt=0)
    """η: weight of the likelihood in the optimistic reward; bonus coefficient c_t = (α/η)/t (paper's value unknown)"""
    temperature_max: float = flag(0.7, gt=0)
    """sampling temperature of the max-player π (and of SADPO's policy)"""
    temperature_min: float = flag(0.5, gt=0)
    """sampling temperature of the min-player μ"""
    sadpo_k: int = flag(4, ge=2)
    """SADPO: samples per group, of which the extremes of ℓ_ref/length form the pair"""
    bonus_samples: int = flag(4, ge=1)
    """samples per prompt estimating the bonus E[log μ(a|x)] (a ∼ π_{t+1}; SADPO: a ∼ π_ref), temperature 1"""
    lr: float | None = flag(arena=2e-4, real=1e-6, tabular=0.05, gt=0,
                             lora={"arena": 0.002, "real": 1e-4})
    """Adam learning rate"""
    epochs: int | None = flag(lm=2, tabular=8, ge=1)
    """per iteration and player: epochs × ⌈new pairs / batch_size⌉ steps on random minibatches of all of D"""
    batch_size: int | None = flag(lm=128, tabular=2 ** 20, ge=1)
    """pairs per optimizer step (tabular: one step per epoch on as many random pairs of D as were added)"""

    def check(self):
        super().check()
        if self.pairs == "exact" and (self.policy != "tabular" or self.single_agent):
            raise ValueError("--pairs exact needs --policy tabular and TANPO (no --single-agent): exact pair "
                             "distributions")


# ALGO LOGIC: the losses --------------------------------------------------------------------------------------

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, alpha, weights=None):
    """L_max of TANPO [review] = the DPO loss (Eq. 7 of arXiv 2305.18290v3) against π_ref with α for DPO's β:
    −log σ(margin), mean over pairs, with the implicit-reward margin = α[(ℓ_θ − ℓ_ref)(a_w) − (ℓ_θ − ℓ_ref)(a_l)].

    policy_*: (B,) ℓ_θ of the winner / loser (carry the gradient); ref_*: (B,) ℓ_ref (frozen).
    weights : (B,) optional pair weights (exact expectations); the loss is Σ w·(−log σ) / Σ w.
    Returns (loss, margin) with margin (B,) detached."""
    margin = alpha * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    losses = -F.logsigmoid(margin)
    loss = losses.mean() if weights is None else (weights * losses).sum() / weights.sum()
    return loss, margin.detach()


def exploration_bonus(policy_logps, c, weights=None):
    """The min-player's bonus c_t · mean_x E_{a∼π_{t+1}}[log μ(a|x)] (SADPO: a ∼ π_ref), added to dpo_loss:
    minimizing it lowers the likelihood of those samples [derived, module docstring].

    policy_logps: (M,) ℓ_θ(a) of samples a (equally many per prompt), carrying the gradient; c: c_t.
    weights     : (M,) optional (exact: π_{t+1}(a|x) over every action); the estimate is Σ w·ℓ / Σ w."""
    mean = policy_logps.mean() if weights is None else (weights * policy_logps).sum() / weights.sum()
    return c * mean


# ALGO LOGIC: pairs -------------------------------------------------------------------------------------------

def cat_samples(parts):
    """The rows of several Samples as one (D grows every iteration). LM rows are re-padded to common widths: prompts
    on the left, responses on the right (the layout of common/policy.py pack(); pads are masked out)."""
    lists = {k: [v for p in parts for v in getattr(p, k)] for k in ("prompts", "texts", "game_ids")}
    out = Samples(**lists, actions=torch.cat([p.actions for p in parts]))
    if parts[0].input_ids is None:  # tabular
        return out
    L = [int(p.response_mask.any(0).int().argmax()) for p in parts]     # prompt width = first response column
    R = [p.input_ids.shape[1] - l for p, l in zip(parts, L)]            # response width
    for name in ("input_ids", "attention_mask", "response_mask"):
        setattr(out, name, torch.cat([F.pad(getattr(p, name), (max(L) - l, max(R) - r))
                                      for p, l, r in zip(parts, L, R)]))
    return out


def extreme_pairs(ref_norm, K):
    """SADPO: rows gK … gK+K−1 form group g; its pair is (argmax, argmin) of ℓ_ref/length, ref_norm (G·K,).
    Returns two (G,) row indices (the same row twice when all K scores tie: a zero-gradient pair)."""
    base = torch.arange(0, len(ref_norm), K)
    scores = ref_norm.view(-1, K)                                       # (G, K)
    return base + scores.argmax(1), base + scores.argmin(1)


def tempered(policy, T):
    """Tabular: the distribution TabularPolicy.sample draws from at temperature T, (G, n_max), 0 on padding."""
    return torch.softmax(policy.log_probs() / T, dim=-1)


def exact_dpo(policy, ref, W, alpha):
    """Tabular: dpo_loss in exact expectation, every ordered pair (a, b) of every game weighted by W (G, n, n)."""
    lp, lr = (x.log_probs().masked_fill(~policy.valid, 0.0) for x in (policy, ref))   # (G, n), 0 on padding
    diff = lambda x: x[:, :, None] - x[:, None, :]                                     # (G, n, n): x_a − x_b
    loss, _ = dpo_loss(diff(lp), 0.0, diff(lr), 0.0, alpha, W)                          # all pairs at once
    return loss


# ALGO LOGIC: the update --------------------------------------------------------------------------------------

def update(player, D, D_ref, n_new, world, args, bonus=None, c=0.0):
    """Adam on dpo_loss (+ exploration_bonus when `bonus` samples are given): epochs × ⌈n_new / batch⌉ steps, each
    on a uniformly random minibatch of D's pairs (rows 2i, 2i+1 = winner, loser; D_ref their ℓ_ref) (deviation 3).
    Returns the mean loss (a 0-dim tensor)."""
    opt, gen = adam(player, args.lr), world.shuffle_generator
    stats = []
    for _ in range(args.epochs):
        order = torch.randperm(len(D) // 2, generator=gen)[:n_new]
        for s in range(0, n_new, args.batch_size):
            mb = order[s:s + args.batch_size]
            rows = torch.cat([2 * mb, 2 * mb + 1])                      # winners, then losers
            B = len(mb)
            ref_lp = D_ref[rows]

            def loss_of(lp, bonus_lp=None):   # lp (2B,) ℓ_θ of the pairs; bonus_lp (≤ batch,) ℓ_θ of bonus samples
                loss, _ = dpo_loss(lp[:B], lp[B:], ref_lp[:B].to(lp), ref_lp[B:].to(lp), args.alpha)
                return (loss if bonus_lp is None else loss + exploration_bonus(bonus_lp, c)), None
            batch = D.select(rows)
            if bonus is not None:
                batch = (batch, bonus.select(torch.randperm(len(bonus), generator=gen)[:args.batch_size]))
            opt.zero_grad(set_to_none=True)
            loss, _ = backward_in_micro_batches(player, batch, loss_of, args.micro_batch, autocast=world.autocast)
            opt.step()
            stats.append(loss)
    player.zero_grad(set_to_none=True)   # free the gradients: the other player trains next
    return torch.stack(stats).mean()


def exact_iteration(pi, mu, ref, world, W_sum, t, c, args):
    """--pairs exact (tabular TANPO, deviation 5): one iteration without samples. D_t is the mixture of the tempered
    pair distributions of π_s × μ_s, s ≤ t (W_sum their sum, (G, n, n), updated here), every ordered pair weighted by
    P(a ≻ b); the max-player minimizes the exact DPO loss on it, then the min-player the exact DPO loss plus the bonus
    under π_{t+1}, each by L-BFGS. Returns the iteration's train/ row and the new W_sum."""
    P = pi.matrices(world.prompts)   # (G, n, n), zero-padded; games outside the training split weigh 0
    train_rows = P.flatten(1).any(1)                                            # (G,) games of world.prompts
    W_sum = torch.zeros_like(P) if W_sum is None else W_sum.to(P)
    p, q = tempered(pi, args.temperature_max).detach(), tempered(mu, args.temperature_min).detach()
    W_sum = W_sum + P * (p[:, :, None] * q[:, None, :] + q[:, :, None] * p[:, None, :])
    l_ref = ref.log_probs().masked_fill(~ref.valid, 0.0)
    gap = (l_ref[:, :, None] - l_ref[:, None, :]).abs()                        # |ℓ_ref(a) − ℓ_ref(b)|
    diversity = (p[:, :, None] * q[:, None, :] * gap).sum((1, 2))[train_rows].mean()
    W = W_sum / t
    loss_max, _ = pi.minimize(lambda: exact_dpo(pi, ref, W, args.alpha), args.epochs)
    p_next = tempered(pi, 1.0).detach()                                         # π_{t+1}
    loss_min, grad = mu.minimize(lambda: exact_dpo(mu, ref, W, args.alpha) + exploration_bonus(
        mu.log_probs().masked_fill(~mu.valid, 0.0), c, p_next * train_rows[:, None]), args.epochs)
    if not grad <= 1e-6:  # no stationary point: L_min decreases without bound (deviation 2)
        fail(f"--pairs exact: iteration {t}: the min-player's loss has no minimizer (the bonus (α/η)/t·E_π[log μ] "
             f"outweighs D as μ → 0 on the max-player's actions); try a larger --eta")
    return {"train/loss_max": loss_max[-1], "train/loss_min": loss_min[-1], "train/pairs": 0, "train/bonus_coef": c,
            "train/diversity": diversity}, W_sum


def save_players(folder, head, pi):
    """The run's policy at the folder's root and, for TANPO (pi: the max-player), the max-player next to it:
    max_player/ (an LM, HF layout) or policy_max.json (a table)."""
    head.save(folder)
    if pi is not None:
        pi.save(os.path.join(folder, "max_player"))
        if isinstance(pi, TabularPolicy):
            os.replace(os.path.join(folder, "max_player", "policy.json"), os.path.join(folder, "policy_max.json"))
            os.rmdir(os.path.join(folder, "max_player"))


def main(args: Args):
    # setup ---------------------------------------------------------------------------------------------------------
    world = setup_world(args)   # the flags' defaults resolved for the world and checked; π_ref, judge, prompts loaded
    pi, ref, judge, gen = world.policy, world.ref, world.judge, world.generator  # π: max-player (SADPO: the policy)
    mu = None if args.single_agent else pi.frozen_copy().requires_grad_(True)    # min-player, μ₁ = π_ref too
    head = pi if mu is None else mu   # the run's policy: eval/…, saved at the run dir's root (deviation 7)
    players = {"policy": pi} if mu is None else {"max_player": pi, "min_player": mu}
    evaluated = None if mu is None else {"eval": (mu, "min-player μ (eval/…, the run's policy):"),
                                         "eval_max": (pi, "max-player π (eval_max/…, max_player/ or policy_max.json):")}
    run = RunDir(args, "sadpo" if mu is None else "tanpo", world, players, evaluated)  # --resume: D restored too
    D, D_ref, W_sum = run.restored.get("D"), run.restored.get("D_ref", torch.zeros(0)), run.restored.get("W_sum")
    for t in run.iterations():
        c = args.alpha / args.eta / t                               # c_t (deviation 2)
        if args.pairs == "exact":   # tabular: D's expectation, no samples
            with run.timed("train"):
                row, W_sum = exact_iteration(pi, mu, ref, world, W_sum, t, c, args)
            run.end_iteration(t, row, {"W_sum": W_sum})
            continue
        # sample + judge + pairs: π_t, μ_t are the players before this iteration's updates ---------------------------
        with run.timed("sample"), world.autocast():
            n, T_max, T_min = args.pairs_per_prompt, args.temperature_max, args.temperature_min
            if mu is None:  # SADPO: groups of K samples of π_t
                y = pi.sample(world.prompts, args.sadpo_k * n, generator=gen, temperature=T_max)
            else:           # TANPO: n samples of π_t, then n of μ_t, per prompt (same row order)
                y = cat_samples([pi.sample(world.prompts, n, generator=gen, temperature=T_max),
                                 mu.sample(world.prompts, n, generator=gen, temperature=T_min)])
            y_ref = batched_logprobs(ref, y, args.infer_batch)   # ℓ_ref: once, when the rows enter D
            y_norm = y_ref / y.token_mask.sum(1).cpu()          # length-normalised (EOS counted; tabular: 1)
            # the pairs (a¹, a²): a group's extremes of ℓ_ref/length (SADPO), or row i of each player (TANPO)
            a, b = extreme_pairs(y_norm, args.sadpo_k) if mu is None else torch.arange(len(y)).chunk(2)
            ya, yb = y.select(a), y.select(b)
            a_wins = judge.label(ya.prompts, ya.texts, yb.texts, gen).cpu()
            rows = torch.stack([torch.where(a_wins, a, b), torch.where(a_wins, b, a)], 1).flatten()
            D = y.select(rows) if D is None else cat_samples([D, y.select(rows)])
            D_ref = torch.cat([D_ref, y_ref[rows]])
        # loss + update: the max-player first, then the min-player's bonus under π_{t+1} ---------------------------
        with run.timed("train"):
            row = {} if mu is None else {"train/loss_max": update(pi, D, D_ref, len(a), world, args)}
            with world.autocast():  # bonus samples, temperature 1: a ∼ π_{t+1} (TANPO) or a ∼ π_ref (SADPO)
                bonus = (ref if mu is None else pi).sample(world.prompts, args.bonus_samples, generator=gen)
            key = "train/loss" if mu is None else "train/loss_min"
            row[key] = update(head, D, D_ref, len(a), world, args, bonus, c)
        run.end_iteration(t, {**row, "train/pairs": len(D) // 2, "train/bonus_coef": c,
                              "train/diversity": (y_norm[a] - y_norm[b]).abs().mean()}, {"D": D, "D_ref": D_ref})
    # save ----------------------------------------------------------------------------------------------------------
    return run.finish(lambda folder: save_players(folder, head, None if mu is None else pi))


if __name__ == "__main__":
    cli(main, Args)
