"""Iterative Nash Policy Optimization (INPO).

Paper: Zhang, Yu, Yin, Ye, Zhang, Jiang, Gu — "Iterative Nash Policy Optimization: Aligning LLMs with General
Preferences via No-Regret Learning", ICLR 2025, arXiv 2407.00617 (camera-ready; equation numbers as there).

The game (Eq. 3):  J(π₁, π₂) = E_x[ E P(y ≻ y') − τ KL(π₁‖π_ref) + τ KL(π₂‖π_ref) ],  equilibrium π*.
Online mirror descent with step 1/η (Eq. 4) has the closed form (Eq. 5)
    π_{t+1}(y) ∝ π_t(y)^{1−τ/η} · π_ref(y)^{τ/η} · exp(P(y ≻ π_t)/η),
which INPO reaches without ever estimating P(y ≻ π_t): with
    h_t(π, y, y') = log π(y)/π(y') − (τ/η) log π_ref(y)/π_ref(y') − ((η−τ)/η) log π_t(y)/π_t(y')
it minimizes (Eq. 8)
    L_t(π) = E_{y, y' ∼ π_t i.i.d., (y_w, y_l) ∼ λ_P(y, y')} [ (h_t(π, y_w, y_l) − 1/(2η))² ],
whose minimizer satisfies h_t(π_{t+1}, y, y') = (P(y ≻ π_t) − P(y' ≻ π_t))/η (Eq. 6), i.e. Eq. (5) (Prop. 6).

Paper → code
    Algorithm 1 (π₁ = π_ref; for t: sample, query, minimize L_t from π_t)   main(), the iteration loop
    Eq. (3) τ, Eq. (4) η                                                    Args.tau, Args.eta, eta_at()
    Eq. (5) closed-form step (tabular)                                      mirror_descent_step()
    h_t and Eq. (8)                                                         inpo_loss()
    λ_P: the pair ordered with probability P(y ≻ y')                        all_pairs(), iid_pairs()
    §5 practical recipe: K = 8, knock-out tournament, 11 comparisons        tournament_pairs()
    Prop. 6 (Eq. 8 = Eq. 7 up to a constant; needs y, y' i.i.d. from π_t)  --pairs all (default), --pairs iid
    Theorem 4 (last iterate, KL(π*‖π_{t+1}) ≤ (1 − τ/η) KL(π*‖π_t) + …)     the default schedule eta_at() [derived]

Deviations from the paper (numbered; each is one flag away from the paper's setting)
    1. Step size: by default η_t = τ(t+2)/2. [derived] Theorem 4 states its bound for a constant η; with this
       schedule its recursion KL_{t+1} ≤ (1 − τ/η_t) KL_t + 8C²/η_t² becomes KL_{t+1} ≤ t/(t+2) KL_t + 32C²/(τ(t+2))²,
       which gives KL(π*‖π_t) = O(1/t) in the last iterate. The paper's experiments use a constant η with τ = η/3
       (`--eta 0.3` with τ = 0.1). Iterating the exact Eq. (5) at η = 3τ does not converge in the last iterate
       on cyclic games: on the 5-action cyclic game of tests/test_inpo.py the duality gap oscillates above its
       start; on the arena's 18 cyclic training games its mean falls 0.0896 → 0.0157 in 30 iterations and then
       stays at 0.012–0.018 (read every 50 iterations from 700 to 1000). The schedule reaches 0 on both.
    2. τ defaults to the games file's β, so the run targets exactly the β-regularized equilibrium that
       eval/dual_gap and eval/kl_ne measure (the paper sets τ = η/3 and never measures the gap).
    3. Pairs: by default all K(K−1)/2 pairs of K = 32 i.i.d. samples per prompt (tabular: 2048; deviations 7, 9),
       each ordered by λ_P; `--pairs iid` draws disjoint i.i.d. pairs with one Bernoulli label each (the literal
       Monte-Carlo form of Eq. 8). Both satisfy Prop. 6's i.i.d. condition; the paper's tournament (`--pairs
       tournament`) selects pairs and so breaks it.
    4. Optimization of L_t: Adam at a constant learning rate, restarted each iteration, for `epochs` passes over the
       iteration's pairs: 10 full-batch steps on the arena with --pairs all (tabular: 20), 2 epochs of 128 pairs
       with --pairs iid (paper: AdamW, cosine schedule, warm-up 0.03, peak 5e-7, one epoch, batch 128, on an 8B
       model). `--pairs exact` (tabular only) minimizes the exact expectation of Eq. (8) — every ordered pair
       weighted by π_t(y) π_t(y') P(y ≻ y') — with L-BFGS in float64, so one iteration reproduces Eq. (5).
    5. Arena LM: π_ref is the SFT model's exact distribution including its invalid mass, played as one more
       action that loses to every candidate (common/arena.py).
    6. `--labels expected` (not the default) replaces the Bernoulli draw of λ_P by its expectation: each i.i.d.
       pair enters in both orders with weights P(y ≻ y') and P(y' ≻ y). Same expected loss, no label noise;
       it needs an oracle that returns probabilities (a preference or reward model does).
    7. `--pairs all` averages Eq. (8) over every pair of the K samples (a U-statistic: each pair is two i.i.d. draws
       from π_t, so the average is unbiased for L_t) instead of over K/2 disjoint pairs: K(K−1)/2 pairs from the
       same K samples, one oracle call per distinct pair. Identical responses are scored once with their count, and
       pairs of identical responses (h_t = 0 for every π: a constant of the loss) are left out. On the arena LM
       this is what lets the LM follow the mirror-descent steps: after 6 iterations the train dual gap is 37% lower
       with 16 disjoint pairs per prompt (the previous default) and 61% lower with all pairs of 32 samples, and the
       cyclic games' kl_ne rises with the former and falls with the latter (3 seeds each, arena v1:
       docs/results_arena_v1.md; on arena v2, 3 seeds: train gap −60% and −72%, docs/results.md).
    8. T = 6 iterations by default on the LM worlds (paper: T = 3, `--iterations 3`), so that the LM runs show where
       the iterates go.
    9. Tabular defaults (`--policy tabular`; the LM worlds keep theirs): T = 60, K = 2048 samples per prompt and 20
       full-batch Adam steps per iteration (lr 0.03), --pairs all, the η_t schedule. A table scores each distinct
       action of a prompt once (deviation 7), so K costs little; the sampled iterates' gap levels off at a noise
       floor (Eq. 8's sampling noise, scaled by the steps 1/η_t) that falls as K and T grow, and these settings put
       it below a tenth of the start on the games of tests/test_tabular_defaults.py (figures:
       bench/results/tabular_testbed.md). The paper's setting:
       `--pairs tournament --iterations 3 --eta 0.3 --epochs 1`; the previous tabular defaults (the LM ones):
       `--iterations 6 --samples-per-prompt 32 --epochs 10`.
"""
import time
from dataclasses import dataclass

import torch

from common.policy import backward_in_micro_batches, unique_responses
from common.run import RunDir, WorldArgs, batched_logprobs, cli, comparison_table, fail, setup_world


@dataclass
class Args(WorldArgs):
    iterations: int | None = None
    """T of Algorithm 1 (default 6 on the LM worlds, 60 for tabular; deviation 8; paper: 3)"""
    pairs: str = "all"
    """all (every pair of K i.i.d. samples), iid (disjoint i.i.d. pairs), tournament (the paper's K = 8 knock-out)
    or exact (tabular: exact expectation, L-BFGS)"""
    labels: str = "sampled"
    """sampled (one Bernoulli label orders each pair: λ_P of Eq. 8) or expected (both orders, weights P and 1 − P;
    --pairs all and iid only)"""
    samples_per_prompt: int | None = None
    """K i.i.d. samples per prompt and iteration (--pairs all: all K(K−1)/2 pairs of them are used; default 32 on the
    LM worlds, 2048 for tabular: a table scores each distinct action once, so K costs little there; deviation 9)"""
    pairs_per_prompt: int = 16
    """disjoint i.i.d. pairs drawn per prompt and iteration (--pairs iid); tournament draws K = 8 samples"""
    tau: float | None = None
    """τ of Eq. (3), the KL coefficient to π_ref (default: the games file's β)"""
    eta: float | None = None
    """η of Eq. (4), inverse step size; default: the schedule η_t = τ(t+2)/2 (deviation 1; paper: constant 3τ)"""
    lr: float | None = None
    """Adam learning rate (default 2e-4 for the arena LM, 1e-6 for a real checkpoint
    (--prompts), 0.03 for tabular)"""
    epochs: int | None = None
    """passes over an iteration's pairs (default 10 for --pairs all, 2 otherwise; tabular: 20 for --pairs all)"""
    batch_size: int = 128
    """per optimizer step: prompts, each with all its pairs (--pairs all), or pairs (iid, tournament)"""
    temperature: float = 1.0
    """sampling temperature of π_t (1 keeps the samples i.i.d. from π_t, as Prop. 6 requires)"""


def eta_at(args, t: int) -> float:
    """η_t for iteration t = 1, 2, …: the constant --eta, else the schedule τ(t+2)/2 (deviation 1, [derived])."""
    return args.eta if args.eta is not None else args.tau * (t + 2) / 2


# ALGO LOGIC: the loss and its closed form ------------------------------------------------------------------

def inpo_loss(policy_w, policy_l, ref_w, ref_l, prev_w, prev_l, eta, tau, weights=None):
    """Eq. (8) of arXiv 2407.00617: mean of (h_t(π, y_w, y_l) − 1/(2η))².

    policy_* : (B,) ℓ_θ(y) of the winner / loser (carry the gradient); ref_*: ℓ_ref; prev_*: ℓ_t (frozen π_t).
    weights  : (B,) optional pair weights (exact expectations); the loss is Σ w·(h − c)² / Σ w.
    Returns (loss, h) with h (B,) detached."""
    h = (policy_w - policy_l) - (tau / eta) * (ref_w - ref_l) - ((eta - tau) / eta) * (prev_w - prev_l)
    sq = (h - 1.0 / (2.0 * eta)) ** 2
    loss = sq.mean() if weights is None else (weights * sq).sum() / weights.sum()
    return loss, h.detach()


def mirror_descent_step(pi_t, pi_ref, P, eta, tau):
    """Eq. (5): π_{t+1} ∝ π_t^{1−τ/η} π_ref^{τ/η} exp(P(· ≻ π_t)/η); float64 tensors, one game."""
    logits = (1 - tau / eta) * pi_t.log() + (tau / eta) * pi_ref.log() + (P @ pi_t) / eta
    return torch.softmax(logits, dim=-1)


# ALGO LOGIC: pairs ----------------------------------------------------------------------------------------

def iid_pairs(y, judge, gen, expected=False):
    """Rows (2i, 2i+1) of y are i.i.d. from π_t for the same prompt; one Bernoulli label orders each pair (λ_P).
    Returns winner rows, loser rows (LongTensors) and weights (None: every pair counts once).
    expected=True: λ_P's expectation instead of a draw — each pair in both orders, weighted P(a ≻ b) and
    P(b ≻ a). Eq. (8)'s expected value is unchanged; the label noise is gone (Rao-Blackwellization)."""
    a = torch.arange(0, len(y), 2)
    b = a + 1
    ya, yb = y.select(a), y.select(b)
    if expected:
        p = judge.prob(ya.prompts, ya.texts, yb.texts).cpu()
        return torch.cat([a, b]), torch.cat([b, a]), torch.cat([p, 1 - p])
    a_wins = judge.label(ya.prompts, ya.texts, yb.texts, gen).cpu()
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a), None


def all_pairs(y, K, judge, gen, expected=False):
    """--pairs all: every one of the K(K−1)/2 pairs of a prompt's K i.i.d. samples from π_t (rows k·K … k·K+K−1 of y
    belong to prompt k), each ordered by λ_P. Every such pair is a pair of i.i.d. draws from π_t, so the average of
    Eq. (8) over them (a U-statistic) is unbiased for L_t like one pair is, from the same K samples (deviation 7).

    Identical responses are scored once (common.policy.unique_responses): the c_u c_v sample pairs between two
    distinct responses u, v of a prompt become one ordered pair u ≻ v with weight = how many of them λ_P orders that
    way, a Binomial(c_u c_v, P(u ≻ v)) draw (expected=True: c_u c_v·P(u ≻ v), and v ≻ u gets the rest). A pair of
    identical responses has h_t = 0 whatever π is: a constant of the loss, left out.
    Returns the distinct responses (Samples, U rows), the prompt index of each (U,), winner and loser indices into
    them and the weights (float64)."""
    rows, counts = unique_responses(y, K)
    u = y.select(rows)
    group = rows // K
    a, b = [], []
    for k in range(len(y) // K):                              # distinct pairs u < v of each prompt
        idx = (group == k).nonzero().flatten()
        i, j = torch.triu_indices(len(idx), len(idx), offset=1)
        a.append(idx[i])
        b.append(idx[j])
    a, b = torch.cat(a), torch.cat(b)
    ua, ub = u.select(a), u.select(b)
    n = (counts[a] * counts[b]).double()                     # sample pairs behind each distinct pair
    p = judge.prob(ua.prompts, ua.texts, ub.texts).cpu()
    a_wins = n * p if expected else torch.binomial(n.to(gen.device), p.to(gen.device), generator=gen).cpu()
    win, lose, weights = torch.cat([a, b]), torch.cat([b, a]), torch.cat([a_wins, n - a_wins])
    keep = weights > 0
    return u, group, win[keep], lose[keep], weights[keep]


def tournament_pairs(y, K, judge, gen):
    """§5 of the paper, K = 8 per prompt: a first round of 4 matches, a winners' and a losers' bracket (3 + 3
    matches), then the champion meets the last-placed (1 match): 11 comparisons. The pair (champion, last) is
    kept only when the champion wins that final check. Returns winner rows, loser rows."""
    if K != 8:
        raise ValueError("tournament pairs need K = 8 samples per prompt")
    base = torch.arange(0, len(y), K)                       # first row of each prompt

    def play(i, j):                                          # rows i, j (same prompt) -> (winner, loser)
        won = judge.label(y.select(i).prompts, y.select(i).texts, y.select(j).texts, gen).cpu()
        return torch.where(won, i, j), torch.where(won, j, i)

    first = [play(base + 2 * m, base + 2 * m + 1) for m in range(4)]
    w1, w2 = play(first[0][0], first[1][0]), play(first[2][0], first[3][0])
    champ, _ = play(w1[0], w2[0])
    l1, l2 = play(first[0][1], first[1][1]), play(first[2][1], first[3][1])
    _, last = play(l1[1], l2[1])
    keep_w, keep_l = play(champ, last)
    ok = keep_w == champ
    return keep_w[ok], keep_l[ok], None


def exact_loss(policy, pi_t, ref, P, eta, tau):
    """Tabular only: the exact expectation of Eq. (8) over the training games. For every game, every ordered pair
    (y, y') is weighted by π_t(y) π_t(y') P(y ≻ y') (draw y, y' i.i.d. from π_t, order them by λ_P).
    policy, pi_t, ref: TabularPolicy over the training games (pi_t, ref frozen); P: (G, n, n) float64, 0-padded."""
    lp, lt, lr = policy.log_probs(), pi_t.log_probs(), ref.log_probs()                 # (G, n), −inf on padding
    valid = policy.valid
    lp, lt, lr = (x.masked_fill(~valid, 0.0) for x in (lp, lt, lr))
    diff = lambda x: x[:, :, None] - x[:, None, :]                                     # (G, n, n): x_y − x_y'
    pt = lt.exp() * valid
    weights = pt[:, :, None] * pt[:, None, :] * P
    weights = weights * (1 - torch.eye(P.shape[-1], dtype=P.dtype, device=P.device))  # y ≠ y' (h = 0 there anyway)
    loss, _ = inpo_loss(diff(lp), 0.0, diff(lr), 0.0, diff(lt), 0.0, eta, tau, weights)  # all pairs at once
    return loss


def minibatches(args, n_pairs, prompt_of_pair, gen):
    """Index tensors of the pairs of each optimizer step, in a random order: batch_size pairs (iid, tournament), or
    all the pairs of batch_size prompts (--pairs all: a response's log-prob is then computed once per step)."""
    if prompt_of_pair is None:
        order = torch.randperm(n_pairs, generator=gen)
        return [order[s:s + args.batch_size] for s in range(0, n_pairs, args.batch_size)]
    prompts = torch.unique(prompt_of_pair)
    prompts = prompts[torch.randperm(len(prompts), generator=gen)]
    return [torch.isin(prompt_of_pair, prompts[s:s + args.batch_size]).nonzero().flatten()
            for s in range(0, len(prompts), args.batch_size)]


def main(args: Args):
    # setup -------------------------------------------------------------------------------------------------
    if args.labels not in ("sampled", "expected"):
        fail(f"--labels {args.labels!r}: expected sampled or expected")
    if args.pairs not in ("all", "iid", "tournament", "exact"):
        fail(f"--pairs {args.pairs!r}: expected all, iid, tournament or exact")
    if args.labels == "expected" and args.pairs not in ("all", "iid"):
        fail(f"--labels expected applies to --pairs all or iid, not {args.pairs} (the tournament draws its labels; "
             "exact uses P itself)")
    if args.pairs == "exact" and args.policy != "tabular":
        fail("--pairs exact needs --policy tabular (exact expectations over a finite action set)")
    if args.pairs == "all" and args.samples_per_prompt is not None and args.samples_per_prompt < 2:
        fail("--samples-per-prompt must be ≥ 2 with --pairs all (a pair needs two samples)")
    for name in ("iterations", "samples_per_prompt", "pairs_per_prompt", "epochs", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # None: the world's default, below
            fail(f"--{name.replace('_', '-')} must be ≥ 1")
    world = setup_world(args)
    args.tau = world.beta if args.tau is None else args.tau
    args.lr = args.lr if args.lr is not None else {"tabular": 0.03, "arena": 2e-4, "real": 1e-6}[world.kind]
    tabular = world.kind == "tabular"                       # world-specific defaults (deviations 8, 9)
    args.iterations = args.iterations if args.iterations is not None else (60 if tabular else 6)
    args.samples_per_prompt = args.samples_per_prompt if args.samples_per_prompt is not None else \
        (2048 if tabular else 32)
    args.epochs = args.epochs if args.epochs is not None else \
        ((20 if tabular else 10) if args.pairs == "all" else 2)
    if args.lr <= 0 or args.temperature <= 0:
        fail(f"--lr and --temperature must be > 0 (got {args.lr}, {args.temperature})")
    if args.tau <= 0 or (args.eta is not None and args.eta <= args.tau):
        fail(f"need 0 < tau < eta (got tau={args.tau}, eta={args.eta}): 1 − τ/η is the weight of π_t in Eq. (5)")
    policy, ref, judge, gen = world.policy, world.ref, world.judge, world.generator
    shuffle_gen = torch.Generator().manual_seed(args.seed)  # minibatch order (CPU, whatever the device)
    if args.pairs == "exact":  # the training games' matrices, (G, n, n) zero-padded (other games: weight 0)
        exact_P = policy.matrices(world.prompts)
    run = RunDir(args, "inpo")  # --resume: the interrupted run's folder
    players, gens = {"policy": policy}, {"sample": gen, "shuffle": shuffle_gen}
    run.restore(players, gens)        # --resume: the state after the last complete iteration
    if not run.rows:
        run.log({"iteration": 0, **world.evaluate(policy)})
    ref_metrics, metrics = run.rows[0], run.rows[-1]

    bar = run.iterations(args.iterations, "inpo")
    for t in bar:
        eta = eta_at(args, t)
        # π_t: sampled and scored before the first update, so the policy itself (no copy); the exact loss reads π_t
        # during the updates (a table: a copy costs nothing)
        pi_t = policy.frozen_copy() if args.pairs == "exact" else policy
        t0 = time.perf_counter()
        # sample + judge + pairs -----------------------------------------------------------------------------
        with world.autocast():
            if args.pairs == "exact":  # no samples: the loss below is the exact expectation
                y = win = lose = None
            else:
                K = {"all": args.samples_per_prompt, "iid": 2 * args.pairs_per_prompt, "tournament": 8}[args.pairs]
                y = pi_t.sample(world.prompts, K, generator=gen, temperature=args.temperature)
                if args.pairs == "all":  # y becomes the distinct responses; group = their prompt
                    y, group, win, lose, weights = all_pairs(y, K, judge, gen, expected=args.labels == "expected")
                    n_unique = len(y)
                else:
                    n_unique = len(unique_responses(y, K)[0])
                    if args.pairs == "tournament":
                        win, lose, weights = tournament_pairs(y, K, judge, gen)
                    else:
                        win, lose, weights = iid_pairs(y, judge, gen, expected=args.labels == "expected")
                # π_t and π_ref log-probs: once per iteration, frozen constants of h_t
                prev = batched_logprobs(pi_t, y)
                ref_lp = batched_logprobs(ref, y)
        t_sample = time.perf_counter() - t0
        # loss + update ---------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        stats = []
        if args.pairs == "exact":
            n_pairs = n_unique = 0
            opt = torch.optim.LBFGS(policy.parameters(), lr=1, max_iter=200, tolerance_grad=1e-13,
                                    tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = exact_loss(policy, pi_t, ref, exact_P, eta, args.tau)
                loss.backward()
                return loss
            for _ in range(args.epochs):
                opt.step(closure)
                stats.append(closure().detach())  # the loss at the minimizer (step() returns the starting one)
        else:
            n_pairs = len(win)
            opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
            for _ in range(args.epochs):
                for mb in minibatches(args, n_pairs, group[win] if args.pairs == "all" else None, shuffle_gen):
                    w, l = win[mb], lose[mb]
                    rows, pos = torch.unique(torch.cat([w, l]), return_inverse=True)  # each response scored once
                    B = len(mb)

                    def loss_of(lp_rows):                   # ℓ_θ of the distinct responses -> Eq. (8) on the pairs
                        lp, dev = lp_rows[pos.to(lp_rows.device)], lp_rows.device
                        return inpo_loss(lp[:B], lp[B:], ref_lp[w].to(dev), ref_lp[l].to(dev),
                                         prev[w].to(dev), prev[l].to(dev), eta, args.tau,
                                         None if weights is None else weights[mb].to(dev, lp.dtype))
                    opt.zero_grad(set_to_none=True)
                    loss, _ = backward_in_micro_batches(policy, y.select(rows), loss_of, args.micro_batch,
                                                        autocast=world.autocast)
                    opt.step()
                    stats.append(loss)
        policy.zero_grad(set_to_none=True)   # the gradients' memory is free for sampling and evaluation
        t_train = time.perf_counter() - t0
        run.check_finite(t, stats, policy)   # NaN / inf: stop here, keep the last good checkpoint
        # eval --------------------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        metrics = world.evaluate(policy)
        row = {"iteration": t, **metrics,
               "train/loss": float(torch.stack(stats).mean()) if stats else float("nan"),
               "train/pairs": n_pairs, "train/unique": n_unique, "train/eta": eta, "train/tau": args.tau,
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
