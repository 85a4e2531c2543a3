"""Direct Nash Optimization (DNO-Prct), with online DPO and iterative DPO as flags of the same loop.

Paper: Rosset, Cheng, Mitra, Santacroce, Awadallah, Xie — "Direct Nash Optimization: Teaching Language Models to
Self-Improve with General Preferences", arXiv 2404.03715v1 (full text read; equation numbers as there) [paper].
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
The same loss with another anchor and other pairs gives the baselines (ALGORITHMS.md §4):
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
    exact expectation of the chosen objective (tabular)                           exact_loss()  (--pairs exact)

Deviations from the paper (numbered)
    1. Sampling at temperature 1 without top-p (paper: 5 samples at temperature 0.7, top-p 0.95), so the samples
       are draws from π_t itself and their win rates against each other estimate Alg. 1's r_t(y) = P(y ≻ π_t);
       `--temperature 0.7` restores the paper's temperature.
    2. No gold (teacher) response among the K candidates: the oracle is the only source of preference.
    3. Win rates from one Bernoulli oracle label per pair of the K samples (the paper's annotator scores each
       pair with GPT-4); "large margin" is r̂(y⁺) − r̂(y⁻) ≥ `--margin` (default ½; our threshold).
    4. η defaults to the games file's β (the regularization the arena metrics measure) for every mode.
    5. Optimization: Adam at a constant learning rate for `epochs` passes over the iteration's pairs (paper:
       AdamW, one epoch or less per iteration, on a 7B model). Each prompt gets `groups_per_prompt` independent
       groups of K samples (one pair per group) so that 72 arena prompts give enough pairs per iteration.
    6. `--pairs exact` (tabular only) minimizes the exact expectation with L-BFGS in float64: with --ref prev the
       soft-label regression of Eq. (8) over all ordered pairs of i.i.d. draws from π_t (one iteration = Eq. 9);
       with --ref sft online DPO's expected loss, every ordered pair weighted π_t(y)π_t(y')P(y ≻ y'). (Hard
       best-vs-worst pairs alone have no finite minimizer, so the exact check uses Eq. 8, as ALGORITHMS.md says.)
    7. Arena LM: π_ref is the SFT model's exact distribution including its invalid mass (common/arena.py).
    8. The baselines' settings (not DNO's paper). Iterative DPO: run_loop2.sh samples K = 4 at temperature 1 and
       trains 2 epochs with label smoothing 0.1; here K = `samples_per_prompt` (default 5, as for DNO), no label
       smoothing. Online DPO is "online" per iteration: all of an iteration's pairs are drawn from the frozen π_t,
       then trained on for `epochs` passes, where OAIF (Guo et al. 2024, arXiv 2402.04792) samples fresh pairs
       from the current policy at every optimizer step.
    9. Tabular defaults (`--policy tabular`; the LM worlds keep theirs), for every mode: 10 iterations of 2048 groups
       per prompt, each iteration's pairs trained on for 30 full-batch Adam steps (batch 2²⁰) at lr 0.03 (previously
       the LM-sized `--iterations 6 --groups-per-prompt 8 --epochs 2 --batch-size 64 --lr 0.05`). Full batches make
       the number of steps independent of how many games a file holds; with them, online DPO's last iterate gets
       within a tenth of the starting KL(π_r‖π_ref) of π_r on the BT games of tests/test_tabular_defaults.py
       (figures: bench/results/tabular_testbed.md). The paper's DNO-Prct sampling (K = 5, the default, at temperature
       0.7) is `--temperature 0.7`.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.policy import backward_in_micro_batches
from common.run import RunDir, WorldArgs, batched_logprobs, cli, comparison_table, fail, setup_world


@dataclass
class Args(WorldArgs):
    iterations: int | None = None
    """T: number of iterations (π_{t+1} is trained from π_t; default 6 on the LM worlds, 10 for tabular)"""
    ref: str = "prev"
    """anchor of the loss: prev (π_t: DNO Eq. 13, iterative DPO) or sft (the fixed π_ref: online DPO)"""
    pairs: str = "dno"
    """dno (win rates, large margin), best-worst (RLHFlow), random (online DPO) or exact (tabular, L-BFGS)"""
    samples_per_prompt: int = 5
    """K, samples in each group (DNO: 5); --pairs random uses 2"""
    groups_per_prompt: int | None = None
    """independent groups of K samples per prompt and iteration; each group gives at most one pair (default 8 on the
    LM worlds, 2048 for tabular)"""
    margin: float = 0.5
    """--pairs dno keeps a pair only when r̂(y⁺) − r̂(y⁻) ≥ margin (win rates among the K samples)"""
    eta: float | None = None
    """η of Eqs. (8), (9), (13), the DPO β of the baselines (default: the games file's β)"""
    lr: float | None = None
    """Adam learning rate (default 2e-4 for the arena LM, 1e-6 for a real checkpoint
    (--prompts), 0.03 for tabular)"""
    epochs: int | None = None
    """passes over an iteration's pairs (default 2 on the LM worlds, 30 for tabular)"""
    batch_size: int | None = None
    """pairs per optimizer step (default 64 on the LM worlds; tabular 2²⁰, i.e. all of an iteration's pairs)"""
    temperature: float = 1.0
    """sampling temperature of π_t (paper 0.7; 1 samples from π_t itself)"""


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


def main(args: Args):
    # setup -------------------------------------------------------------------------------------------------
    if args.ref not in ("prev", "sft"):
        fail(f"--ref {args.ref!r}: expected prev or sft")
    if args.pairs not in ("dno", "best-worst", "random", "exact"):
        fail(f"--pairs {args.pairs!r}: expected dno, best-worst, random or exact")
    if args.pairs == "exact" and args.policy != "tabular":
        fail("--pairs exact needs --policy tabular (exact expectations over a finite action set)")
    for name in ("iterations", "groups_per_prompt", "epochs", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # None: the world's default, below
            fail(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.samples_per_prompt < 2:
        fail(f"--samples-per-prompt {args.samples_per_prompt}: a group needs K ≥ 2 samples")
    if not 0 < args.margin <= 1:
        fail(f"--margin {args.margin}: a win-rate difference in (0, 1]")
    world = setup_world(args)
    args.eta = world.beta if args.eta is None else args.eta
    args.lr = args.lr if args.lr is not None else {"tabular": 0.03, "arena": 2e-4, "real": 1e-6}[world.kind]
    tabular = world.kind == "tabular"                       # world-specific defaults (deviation 9)
    for name, lm, table in (("iterations", 6, 10), ("groups_per_prompt", 8, 2048), ("epochs", 2, 30),
                            ("batch_size", 64, 2 ** 20)):
        if getattr(args, name) is None:
            setattr(args, name, table if tabular else lm)
    if args.lr <= 0 or args.temperature <= 0 or args.eta <= 0:
        fail(f"--lr, --temperature and --eta must be > 0 (got {args.lr}, {args.temperature}, {args.eta})")
    policy, ref, judge, gen = world.policy, world.ref, world.judge, world.generator
    shuffle_gen = torch.Generator().manual_seed(args.seed)  # minibatch order (CPU, whatever the device)
    if args.pairs == "exact":  # the training games' matrices, (G, n, n) zero-padded (other games: weight 0)
        exact_P = policy.matrices(world.prompts)
    run = RunDir(args, "nash_dpo")  # --resume: the interrupted run's folder
    players, gens = {"policy": policy}, {"sample": gen, "shuffle": shuffle_gen}
    run.restore(players, gens)        # --resume: the state after the last complete iteration
    if not run.rows:
        run.log({"iteration": 0, **world.evaluate(policy)})
    ref_metrics, metrics = run.rows[0], run.rows[-1]

    bar = run.iterations(args.iterations, "nash_dpo")
    for t in bar:
        # π_t: sampled and scored before the first update, so the policy itself (no copy); the exact loss reads π_t
        # during the updates (a table: a copy costs nothing)
        pi_t = policy.frozen_copy() if args.pairs == "exact" else policy
        anchor = pi_t if args.ref == "prev" else ref
        t0 = time.perf_counter()
        # sample + judge + pairs -----------------------------------------------------------------------------
        extra = {}
        with world.autocast():
            if args.pairs == "exact":  # no samples: the loss below is the exact expectation
                y = chosen = rejected = None
            else:
                K = 2 if args.pairs == "random" else args.samples_per_prompt
                y = pi_t.sample(world.prompts, K * args.groups_per_prompt, generator=gen,
                                temperature=args.temperature)
                if args.pairs == "dno":
                    chosen, rejected, rate = dno_pairs(y, K, judge, gen, args.margin)
                    extra["train/winrate_gap"] = float((rate.max(1).values - rate.min(1).values).mean())
                elif args.pairs == "best-worst":
                    chosen, rejected = best_worst_pairs(y, K, judge)
                else:
                    chosen, rejected = random_pairs(y, judge, gen)
                anchor_lp = batched_logprobs(anchor, y)  # frozen ℓ_a: once per iteration
        t_sample = time.perf_counter() - t0
        # loss + update ---------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        stats, margins = [], []
        if args.pairs == "exact":
            n_pairs = 0
            opt = torch.optim.LBFGS(policy.parameters(), lr=1, max_iter=200, tolerance_grad=1e-13,
                                    tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = exact_loss(policy, pi_t, anchor, exact_P, args.eta, soft=args.ref == "prev")
                loss.backward()
                return loss
            for _ in range(args.epochs):
                opt.step(closure)
                stats.append(closure().detach())  # the loss at the minimizer (step() returns the starting one)
        else:
            n_pairs = len(chosen)
            opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
            for _ in range(args.epochs if n_pairs else 0):
                order = torch.randperm(n_pairs, generator=shuffle_gen)
                for s in range(0, n_pairs, args.batch_size):
                    mb = order[s:s + args.batch_size]
                    w, l = chosen[mb], rejected[mb]
                    B = len(mb)

                    def loss_of(lp):                         # ℓ_θ of chosen, then rejected -> Eq. (13)
                        dev = lp.device
                        return dpo_loss(lp[:B], lp[B:], anchor_lp[w].to(dev), anchor_lp[l].to(dev), args.eta)
                    opt.zero_grad(set_to_none=True)
                    loss, margin = backward_in_micro_batches(policy, y.select(torch.cat([w, l])), loss_of,
                                                             args.micro_batch, autocast=world.autocast)
                    opt.step()
                    stats.append(loss)
                    margins.append(margin.mean())
        policy.zero_grad(set_to_none=True)   # the gradients' memory is free for sampling and evaluation
        t_train = time.perf_counter() - t0
        run.check_finite(t, stats, policy)   # NaN / inf: stop here, keep the last good checkpoint
        # eval --------------------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        metrics = world.evaluate(policy)
        row = {"iteration": t, **metrics,
               "train/loss": float(torch.stack(stats).mean()) if stats else float("nan"),
               "train/margin": float(torch.stack(margins).mean()) if margins else float("nan"),
               "train/pairs": n_pairs, "train/eta": args.eta, **extra,
               "perf/sample_s": t_sample, "perf/train_s": t_train, "perf/eval_s": time.perf_counter() - t0}
        run.log(row)
        run.checkpoint(t, players, gens)
        bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4f}" for k in ("eval/dual_gap", "eval/win_vs_ref")
                         if k in metrics})

    # save ------------------------------------------------------------------------------------------------------
    policy.save(run.tmp)
    path = run.finish()
    print(comparison_table(ref_metrics, metrics, world.games))
    print(f"run dir: {path}")
    return path


if __name__ == "__main__":
    cli(main, Args)
