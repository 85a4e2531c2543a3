"""Iterative Nash Policy Optimization (INPO).

Paper: Zhang, Yu, Peng, Song, Tian, Huo, Jiang, Mi, Yu — "Iterative Nash Policy Optimization: Aligning LLMs with
General Preferences via No-Regret Learning", ICLR 2025, arXiv 2407.00617 (equation numbers of the ICLR 2025
camera-ready) [paper]. Equations, provenance and derivations: docs/algorithms.md §1.

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
    Eq. (8) in exact expectation (tabular)                                  exact_loss(), exact_iteration()
    minimizing L_t from π_t (Adam, minibatches of pairs)                    update(), minibatches()
    Theorem 4 (last iterate, KL(π*‖π_{t+1}) ≤ (1 − τ/η) KL(π*‖π_t) + …)     the default schedule eta_at() [derived]

Deviations from the paper (numbered; each is one flag away from the paper's setting)
    1. Step size: by default η_t = τ(t+2)/2. [derived] Theorem 4 states its bound for a constant η; with this
       schedule its recursion becomes KL_{t+1} ≤ t/(t+2) KL_t + 32C²/(τ(t+2))², which gives KL(π*‖π_t) = O(1/t) in the
       last iterate (derivation: docs/algorithms.md §1). The paper's experiments use a constant η = 0.005 with
       τ = η/3; on the arena, where τ is the games' β = 0.1, only that ratio carries over: `--eta 0.3` (η = 3τ).
       Iterating the exact Eq. (5) at η = 3τ does not converge in the last iterate on cyclic games
       (tests/test_inpo.py; arena figures: docs/results.md, "Evidence behind the deviations").
    2. τ defaults to the world's β (the games file's), so the run targets exactly the β-regularized equilibrium that
       eval/dual_gap and eval/kl_ne measure (the paper sets τ = η/3 and never measures the gap).
    3. Pairs: by default all K(K−1)/2 pairs of K i.i.d. samples per prompt (deviations 7, 9), each ordered by λ_P;
       `--pairs iid` draws disjoint i.i.d. pairs with one Bernoulli label each (the literal Monte-Carlo form of
       Eq. 8). Both satisfy Prop. 6's i.i.d. condition; the paper's tournament (`--pairs tournament`) selects pairs
       and so breaks it.
    4. Optimization of L_t: Adam at a constant learning rate, restarted each iteration, for `epochs` passes over the
       iteration's pairs (full-batch steps with --pairs all; paper: AdamW, cosine schedule, warm-up 0.03, peak 5e-7,
       one epoch, batch 128, on an 8B model). `--pairs exact` (tabular only) minimizes the exact expectation of
       Eq. (8) — every ordered pair weighted by π_t(y) π_t(y') P(y ≻ y') — with L-BFGS in float64, so one iteration
       reproduces Eq. (5).
    5. Arena LM: π_ref is the SFT model's exact distribution including its invalid mass, played as one more
       action that loses to every candidate (common/arena.py).
    6. `--labels expected` (not the default) replaces the Bernoulli draw of λ_P by its expectation: each i.i.d.
       pair enters in both orders with weights P(y ≻ y') and P(y' ≻ y). Same expected loss, no label noise;
       it needs an oracle that returns probabilities (a preference or reward model does).
    7. `--pairs all` averages Eq. (8) over every pair of the K samples (a U-statistic: each pair is two i.i.d. draws
       from π_t, so the average is unbiased for L_t) instead of over K/2 disjoint pairs: K(K−1)/2 pairs from the
       same K samples, one oracle call per distinct pair. Identical responses are scored once with their count, and
       pairs of identical responses (h_t = 0 for every π: a constant of the loss) are left out. It is what lets the
       arena LM follow the mirror-descent steps (measured against disjoint pairs: docs/results.md).
    8. T = 6 iterations by default on the LM worlds (paper: T = 3, `--iterations 3`), so that the LM runs show where
       the iterates go.
    9. Tabular defaults (`--policy tabular`; `--help` lists each flag's default per world): more iterations and
       samples (a table scores each distinct action once, so K costs little) and a smaller learning rate, which put
       the sampled iterates' noise floor below a tenth of the starting gap (bench/results/tabular_testbed.md). The
       paper's pair selection, T and η/τ ratio: `--pairs tournament --iterations 3 --eta 0.3 --epochs 1`.
"""
from dataclasses import dataclass
from typing import Literal

import torch

from common.cli import BETA, cli, flag
from common.policy import adam, backward_in_micro_batches, batched_logprobs, unique_responses
from common.run import RunDir
from common.world import WorldArgs, setup_world


@dataclass
class Args(WorldArgs):
    iterations: int | None = flag(lm=6, tabular=60, ge=1)
    """T of Algorithm 1 (deviation 8; paper: 3)"""
    pairs: Literal["all", "iid", "tournament", "exact"] = "all"
    """all (every pair of K i.i.d. samples), iid (disjoint i.i.d. pairs), tournament (the paper's K = 8 knock-out)
    or exact (tabular: exact expectation, L-BFGS)"""
    labels: Literal["sampled", "expected"] = "sampled"
    """sampled (one Bernoulli label orders each pair: λ_P of Eq. 8) or expected (both orders, weights P and 1 − P;
    --pairs all and iid only)"""
    samples_per_prompt: int | None = flag(lm=32, tabular=2048, ge=1)
    """K i.i.d. samples per prompt and iteration (--pairs all: all K(K−1)/2 pairs of them are used)"""
    pairs_per_prompt: int = flag(16, ge=1)
    """disjoint i.i.d. pairs drawn per prompt and iteration (--pairs iid); tournament draws K = 8 samples"""
    tau: float | None = flag(rule=BETA, gt=0)
    """τ of Eq. (3), the KL coefficient to π_ref"""
    eta: float | None = flag(gt=0)
    """η of Eq. (4), inverse step size (default: the schedule η_t = τ(t+2)/2, deviation 1; paper: constant 3τ)"""
    lr: float | None = flag(arena=2e-4, real=1e-6, tabular=0.03, gt=0,
                             lora={"arena": 0.002, "real": 1e-4})
    """Adam learning rate"""
    epochs: int | None = flag(ge=1, rule=("10 with --pairs all (tabular: 20), else 2", lambda a, beta:
                                          (20 if a.policy == "tabular" else 10) if a.pairs == "all" else 2))
    """passes over an iteration's pairs"""
    batch_size: int = flag(128, ge=1)
    """per optimizer step: prompts, each with all its pairs (--pairs all), or pairs (iid, tournament)"""
    temperature: float = flag(1.0, gt=0)
    """sampling temperature of π_t (1 keeps the samples i.i.d. from π_t, as Prop. 6 requires)"""

    def check(self):
        super().check()
        if self.labels == "expected" and self.pairs not in ("all", "iid"):
            raise ValueError(f"--labels expected applies to --pairs all or iid, not {self.pairs} (the tournament draws "
                             "its labels; exact uses P itself)")
        if self.pairs == "exact" and self.policy != "tabular":
            raise ValueError("--pairs exact needs --policy tabular (exact expectations over a finite action set)")
        if self.pairs == "all" and self.samples_per_prompt < 2:
            raise ValueError("--samples-per-prompt must be ≥ 2 with --pairs all (a pair needs two samples)")
        if self.eta is not None and self.eta <= self.tau:
            raise ValueError(f"--eta {self.eta}: need 0 < tau < eta (tau = {self.tau}): 1 − τ/η is the weight of π_t "
                             "in Eq. (5)")


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


def exact_iteration(policy, ref, world, eta, args) -> dict:
    """--pairs exact (tabular): one iteration without samples, Eq. (8) in exact expectation over the training games
    minimized by L-BFGS (deviation 4); it reproduces Eq. (5). Returns the iteration's train/ row."""
    pi_t = policy.frozen_copy()     # read during the update (a table: a copy costs nothing)
    P = policy.matrices(world.prompts)   # (G, n, n), zero-padded; games outside the training split weigh 0
    losses, _ = policy.minimize(lambda: exact_loss(policy, pi_t, ref, P, eta, args.tau), args.epochs)
    return {"train/loss": torch.stack(losses).mean(), "train/pairs": 0, "train/unique": 0, "train/eta": eta,
            "train/tau": args.tau}


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


# ALGO LOGIC: the update ------------------------------------------------------------------------------------

def update(policy, y, win, lose, weights, group, prev, ref_lp, eta, world, args) -> list:
    """Minimize L_t (Eq. 8) from π_t with Adam (deviation 4): `epochs` passes over the pairs (win[i] ≻ lose[i], rows of
    the samples y, with their weights; group: each row's prompt, --pairs all), ℓ_t = prev and ℓ_ref = ref_lp frozen.
    Returns the loss of each step."""
    opt, losses = adam(policy, args.lr), []
    for _ in range(args.epochs):
        for mb in minibatches(args, len(win), None if group is None else group[win], world.shuffle_generator):
            w, l = win[mb], lose[mb]
            rows, pos = torch.unique(torch.cat([w, l]), return_inverse=True)  # each response scored once
            B = len(mb)

            def loss_of(lp_rows):   # ℓ_θ of the distinct responses -> Eq. (8) on the pairs
                lp, dev = lp_rows[pos.to(lp_rows.device)], lp_rows.device
                wts = None if weights is None else weights[mb].to(dev, lp.dtype)
                return inpo_loss(lp[:B], lp[B:], ref_lp[w].to(dev), ref_lp[l].to(dev), prev[w].to(dev),
                                 prev[l].to(dev), eta, args.tau, wts)
            opt.zero_grad(set_to_none=True)
            loss, _ = backward_in_micro_batches(policy, y.select(rows), loss_of, args.micro_batch,
                                                autocast=world.autocast)
            opt.step()
            losses.append(loss)
    return losses


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
    # setup ---------------------------------------------------------------------------------------------------------
    world = setup_world(args)   # the flags' defaults resolved for the world and checked; π_ref, judge, prompts loaded
    policy, ref, judge, gen = world.policy, world.ref, world.judge, world.generator
    run = RunDir(args, "inpo", world, {"policy": policy})   # --resume: from the last complete iteration
    for t in run.iterations():
        eta = eta_at(args, t)
        if args.pairs == "exact":   # tabular: Eq. (8) in exact expectation, no samples
            with run.timed("train"):
                row = exact_iteration(policy, ref, world, eta, args)
            run.end_iteration(t, row)
            continue
        # sample + judge + pairs: π_t is the policy before this iteration's update, sampled and scored first ---------
        with run.timed("sample"), world.autocast():
            K = {"all": args.samples_per_prompt, "iid": 2 * args.pairs_per_prompt, "tournament": 8}[args.pairs]
            y = policy.sample(world.prompts, K, generator=gen, temperature=args.temperature)
            if args.pairs == "all":     # y becomes the distinct responses; group = their prompt
                y, group, win, lose, weights = all_pairs(y, K, judge, gen, expected=args.labels == "expected")
                n_unique = len(y)
            else:
                n_unique, group = len(unique_responses(y, K)[0]), None
                win, lose, weights = tournament_pairs(y, K, judge, gen) if args.pairs == "tournament" else \
                    iid_pairs(y, judge, gen, expected=args.labels == "expected")
            prev = batched_logprobs(policy, y, args.infer_batch)   # ℓ_t and ℓ_ref: frozen constants of h_t, once
            ref_lp = batched_logprobs(ref, y, args.infer_batch)
        # loss + update: L_t of Eq. (8) minimized from π_t (deviation 4) ---------------------------------------------
        with run.timed("train"):
            losses = update(policy, y, win, lose, weights, group, prev, ref_lp, eta, world, args)
        run.end_iteration(t, {"train/loss": torch.stack(losses).mean() if losses else None, "train/pairs": len(win),
                              "train/unique": n_unique, "train/eta": eta, "train/tau": args.tau})
    # save ----------------------------------------------------------------------------------------------------------
    return run.finish(policy.save)


if __name__ == "__main__":
    cli(main, Args)
