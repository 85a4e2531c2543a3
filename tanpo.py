"""TANPO (two-agent Nash policy optimization) and SADPO (its single-agent approximation).

Paper: "Provably Efficient and Practical Self-Play for Better LLM Alignment", ICLR 2025 submission (rejected),
OpenReview ed75tWzgt0. The paper's text was not available: only its abstract, the reviews and the authors' replies
are public. Provenance marks as in ALGORITHMS.md §2: [review] known only from that public discussion; [derived]
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
    exact expectations (tabular, deviation 5)                         exact_dpo(), update_exact(), --pairs exact

Deviations (numbered)
    1. The losses are reconstructed from the reviews and the authors' replies [review]; the bonus term and its sign
       are derived [derived]. The paper's η is unknown: default η = 10 (at η = 1 the arena LM's min-player loses
       most of its valid mass; deviation 2).
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
    4. `pairs_per_prompt` pairs per prompt and iteration (the paper: one); α defaults to the games file's β, so the
       run targets the regularization that the metrics measure; Adam at a constant learning rate, fresh each
       iteration.
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
    8. Tabular defaults (`--policy tabular`; the LM worlds keep theirs), TANPO and SADPO: 40 iterations of 512 pairs
       per prompt, each player taking 8 Adam steps per iteration at lr 0.05, each step on as many random pairs of D
       as were added (batch 2²⁰; previously the LM-sized `--iterations 6 --pairs-per-prompt 4 --epochs 2
       --batch-size 128 --lr 0.1`). With them both players' KL(π_r‖·) to π_r ∝ π_ref e^{r/α} falls below a tenth of
       π_ref's on the BT games of tests/test_tabular_defaults.py (figures: bench/results/tabular_testbed.md). The
       paper's one pair per prompt is `--pairs-per-prompt 1`.

Symbols: α is the KL coefficient of Eq. (3) and plays DPO's β. η weights the likelihood in the optimistic reward
(the bonus coefficient is c_t = (α/η)/t): it is neither inpo.py's and nash_dpo.py's η (an inverse step size) nor
nash_mp.py's (a ratio of two KL weights).
"""
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.policy import Samples, backward_in_micro_batches
from common.run import RunDir, WorldArgs, batched_logprobs, cli, comparison_table, fail, setup_world


@dataclass
class Args(WorldArgs):
    iterations: int | None = None
    """T: self-play iterations (sample, label, update the max-player, then the min-player; default 6 on the LM
    worlds, 40 for tabular)"""
    single_agent: bool = False
    """SADPO: one policy; pair = best/worst of K samples by length-normalised log π_ref; bonus under π_ref"""
    pairs: str = "sampled"
    """sampled (oracle-labelled pairs accumulate in D) or exact (tabular TANPO: D's expectation, L-BFGS)"""
    pairs_per_prompt: int | None = None
    """pairs added to D per prompt and iteration (SADPO: groups of K samples, one pair each; default 4 on the LM
    worlds, 512 for tabular; the paper: 1)"""
    alpha: float | None = None
    """α of Eq. (3), the KL coefficient to π_ref; named α as in the paper, it plays DPO's β (default: games' β)"""
    eta: float = 10.0
    """η: weight of the likelihood in the optimistic reward; bonus coefficient c_t = (α/η)/t (paper's value unknown)"""
    temperature_max: float = 0.7
    """sampling temperature of the max-player π (and of SADPO's policy)"""
    temperature_min: float = 0.5
    """sampling temperature of the min-player μ"""
    sadpo_k: int = 4
    """SADPO: samples per group, of which the extremes of ℓ_ref/length form the pair"""
    bonus_samples: int = 4
    """samples per prompt estimating the bonus E[log μ(a|x)] (a ∼ π_{t+1}; SADPO: a ∼ π_ref), temperature 1"""
    lr: float | None = None
    """Adam learning rate (default 2e-4 for the arena LM, 1e-6 for a real checkpoint
    (--prompts), 0.05 for tabular)"""
    epochs: int | None = None
    """per iteration and player: epochs × ⌈new pairs / batch_size⌉ steps on random minibatches of all of D (default 2
    on the LM worlds, 8 for tabular)"""
    batch_size: int | None = None
    """pairs per optimizer step (default 128 on the LM worlds; tabular 2²⁰: one step per epoch on as many random
    pairs of D as were added)"""


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

def update(player, D, D_ref, n_new, world, args, gen, bonus=None, c=0.0):
    """Adam on dpo_loss (+ exploration_bonus when `bonus` samples are given): epochs × ⌈n_new / batch⌉ steps, each
    on a uniformly random minibatch of D's pairs (rows 2i, 2i+1 = winner, loser; D_ref their ℓ_ref) (deviation 3).
    Returns the mean loss (a 0-dim tensor)."""
    opt = torch.optim.Adam(player.parameters(), lr=args.lr)
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
    player.zero_grad(set_to_none=True)   # free the gradients: the other player trains next, then sampling
    return torch.stack(stats).mean()


def update_exact(player, loss_fn, epochs):
    """L-BFGS in float64 on an exact (tabular) loss. Returns (loss, max |gradient|) at the point reached."""
    opt = torch.optim.LBFGS(player.parameters(), lr=1, max_iter=200, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    for _ in range(epochs):
        opt.step(closure)
    loss = closure().detach()  # the loss at the point reached (step() returns the starting one)
    return loss, player.theta.grad.abs().max()


def main(args: Args):
    # setup -------------------------------------------------------------------------------------------------
    if args.pairs not in ("sampled", "exact"):
        fail(f"--pairs {args.pairs!r}: expected sampled or exact")
    if args.pairs == "exact" and (args.policy != "tabular" or args.single_agent):
        fail("--pairs exact needs --policy tabular and TANPO (no --single-agent): exact pair distributions")
    for name, low in (("iterations", 1), ("pairs_per_prompt", 1), ("sadpo_k", 2), ("bonus_samples", 1),
                      ("epochs", 1), ("batch_size", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:  # None: the world's default, below
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be ≥ {low}")
    for name in ("alpha", "eta", "temperature_max", "temperature_min", "lr"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    world = setup_world(args)
    args.alpha = world.beta if args.alpha is None else args.alpha
    args.lr = args.lr if args.lr is not None else {"tabular": 0.05, "arena": 2e-4, "real": 1e-6}[world.kind]
    tabular = world.kind == "tabular"                       # world-specific defaults (deviation 8)
    for name, lm, table in (("iterations", 6, 40), ("pairs_per_prompt", 4, 512), ("epochs", 2, 8),
                            ("batch_size", 128, 2 ** 20)):
        if getattr(args, name) is None:
            setattr(args, name, table if tabular else lm)
    pi, ref, judge, gen = world.policy, world.ref, world.judge, world.generator  # π: max-player (SADPO: the policy)
    mu = None if args.single_agent else pi.frozen_copy().requires_grad_(True)    # min-player, μ₁ = π_ref too
    head = pi if mu is None else mu             # the run's policy: eval/…, saved at the run dir root (deviation 7)
    shuffle_gen = torch.Generator().manual_seed(args.seed)  # minibatch draws (CPU, whatever the device)
    if args.pairs == "exact":  # the training games' matrices, (G, n, n) zero-padded (other games: weight 0)
        exact_P = pi.matrices(world.prompts)
        train_rows = exact_P.flatten(1).any(1)                              # (G,) games of world.prompts
        W_sum = torch.zeros_like(exact_P)
    algo = "sadpo" if args.single_agent else "tanpo"
    run = RunDir(args, algo)  # --resume: the interrupted run's folder
    players = {"policy": pi} if mu is None else {"max_player": pi, "min_player": mu}
    gens = {"sample": gen, "shuffle": shuffle_gen}
    state = run.restore(players, gens)  # --resume: the state after the last complete iteration (D included)
    D, D_ref = state.get("D"), state.get("D_ref", torch.zeros(0))
    if args.pairs == "exact":
        W_sum = state.get("W_sum", W_sum).to(W_sum)
    as_max = lambda m: {k.replace("eval/", "eval_max/", 1): v for k, v in m.items()}  # the max-player's keys
    if not run.rows:
        ref_metrics = world.evaluate(head)
        run.log({"iteration": 0, **ref_metrics, **({} if mu is None else as_max(ref_metrics))})
    ref_metrics, metrics = run.rows[0], run.rows[-1]
    max_metrics = {k.replace("eval_max/", "eval/", 1): v for k, v in metrics.items() if k.startswith("eval_max/")}

    bar = run.iterations(args.iterations, algo)
    for t in bar:
        c = args.alpha / args.eta / t                               # c_t (deviation 2)
        # π_t, μ_t: sampled before the first update, so the players themselves (no copies kept)
        pi_t, mu_t = pi, mu
        t0 = time.perf_counter()
        # sample + judge + pairs -----------------------------------------------------------------------------
        with world.autocast():
            if args.pairs == "exact":  # no samples: D_t is the mixture of the tempered pair distributions
                p, q = tempered(pi_t, args.temperature_max).detach(), tempered(mu_t, args.temperature_min).detach()
                W_sum += exact_P * (p[:, :, None] * q[:, None, :] + q[:, :, None] * p[:, None, :])
                l_ref = ref.log_probs().masked_fill(~ref.valid, 0.0)
                gap = (l_ref[:, :, None] - l_ref[:, None, :]).abs()                        # |ℓ_ref(a) − ℓ_ref(b)|
                diversity = (p[:, :, None] * q[:, None, :] * gap).sum((1, 2))[train_rows].mean()
                n_new = 0
            else:
                n, T_max, T_min = args.pairs_per_prompt, args.temperature_max, args.temperature_min
                if mu is None:  # SADPO: groups of K samples of π_t
                    y = pi_t.sample(world.prompts, args.sadpo_k * n, generator=gen, temperature=T_max)
                else:           # TANPO: n samples of π_t, then n of μ_t, per prompt (same row order)
                    y = cat_samples([pi_t.sample(world.prompts, n, generator=gen, temperature=T_max),
                                     mu_t.sample(world.prompts, n, generator=gen, temperature=T_min)])
                y_ref = batched_logprobs(ref, y)                    # ℓ_ref: once, when the rows enter D
                y_norm = y_ref / y.token_mask.sum(1).cpu()          # length-normalised (EOS counted; tabular: 1)
                # the pairs (a¹, a²): a group's extremes of ℓ_ref/length (SADPO), or row i of each player (TANPO)
                a, b = extreme_pairs(y_norm, args.sadpo_k) if mu is None else torch.arange(len(y)).chunk(2)
                diversity = (y_norm[a] - y_norm[b]).abs().mean()    # Fig. 1's metric on the new pairs
                ya, yb = y.select(a), y.select(b)
                a_wins = judge.label(ya.prompts, ya.texts, yb.texts, gen).cpu()
                rows = torch.stack([torch.where(a_wins, a, b), torch.where(a_wins, b, a)], 1).flatten()
                D = y.select(rows) if D is None else cat_samples([D, y.select(rows)])
                D_ref = torch.cat([D_ref, y_ref[rows]])
                n_new = len(a)
        t_sample = time.perf_counter() - t0
        # loss + update: the max-player first, then the min-player's bonus under π_{t+1} ---------------------------
        t0 = time.perf_counter()
        row = {"iteration": t}
        if args.pairs == "exact":
            W = W_sum / t
            row["train/loss_max"], _ = update_exact(pi, lambda: exact_dpo(pi, ref, W, args.alpha), args.epochs)
            p_next = tempered(pi, 1.0).detach()                     # π_{t+1}
            min_loss = lambda: exact_dpo(mu, ref, W, args.alpha) + exploration_bonus(
                mu.log_probs().masked_fill(~mu.valid, 0.0), c, p_next * train_rows[:, None])
            row["train/loss_min"], grad = update_exact(mu, min_loss, args.epochs)
            if not grad <= 1e-6:  # no stationary point: L_min decreases without bound (deviation 2)
                fail(f"--pairs exact: iteration {t}: the min-player's loss has no minimizer (the bonus "
                     f"(α/η)/t·E_π[log μ] outweighs D as μ → 0 on the max-player's actions); try a larger --eta")
        else:
            trained = pi if mu is None else mu
            if mu is not None:
                row["train/loss_max"] = update(pi, D, D_ref, n_new, world, args, shuffle_gen)
            with world.autocast():  # bonus samples, temperature 1: a ∼ π_{t+1} (TANPO) or a ∼ π_ref (SADPO)
                bonus = (ref if mu is None else pi).sample(world.prompts, args.bonus_samples, generator=gen)
            key = "train/loss" if mu is None else "train/loss_min"
            row[key] = update(trained, D, D_ref, n_new, world, args, shuffle_gen, bonus, c)
        t_train = time.perf_counter() - t0
        run.check_finite(t, [v for k, v in row.items() if k.startswith("train/")], *players.values())  # NaN: stop
        # eval --------------------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        metrics = world.evaluate(head)
        row.update(metrics)
        if mu is not None:
            max_metrics = world.evaluate(pi)
            row.update(as_max(max_metrics))
        row = {k: float(v) if torch.is_tensor(v) else v for k, v in row.items()}
        row.update({"train/pairs": 0 if D is None else len(D) // 2, "train/bonus_coef": c,
                    "train/diversity": float(diversity), "perf/sample_s": t_sample, "perf/train_s": t_train,
                    "perf/eval_s": time.perf_counter() - t0})
        run.log(row)
        extra = {"W_sum": W_sum} if args.pairs == "exact" else {"D": D, "D_ref": D_ref}
        run.checkpoint(t, players, gens, extra)
        bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4f}" for k in ("eval/dual_gap", "eval/win_vs_ref")
                         if k in metrics})

    # save ------------------------------------------------------------------------------------------------------
    head.save(run.tmp)
    if mu is not None:  # the max-player next to it: max_player/ (LM, HF layout) or policy_max.json (tabular)
        pi.save(run.file("max_player"))
        if args.policy == "tabular":
            os.replace(run.file(os.path.join("max_player", "policy.json")), run.file("policy_max.json"))
            os.rmdir(run.file("max_player"))
    path = run.finish()
    if mu is not None:
        print("min-player μ (eval/…, the run's policy):")
    print(comparison_table(ref_metrics, metrics, world.games))
    if mu is not None:
        print("max-player π (eval_max/…, max_player/ or policy_max.json):")
        print(comparison_table(ref_metrics, max_metrics, world.games))
    print(f"run dir: {path}")
    return path


if __name__ == "__main__":
    cli(main, Args)
