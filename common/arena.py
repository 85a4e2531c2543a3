"""The preference arena: games files, the exact β-regularized Nash equilibrium, and exact metrics.

A game is one prompt with candidate answers y_1..y_n and a preference matrix P[i, j] = P(y_i ≻ y_j), P + Pᵀ = 1 (the
games file: docs/arena.md). Every algorithm chases the equilibrium of the β-regularized game (docs/algorithms.md §0):
    π*(y) ∝ π_ref(y) · exp(P(y ≻ π*) / β)                                (fixed point; solve_nash)
    DG(π) = 2β log Σ_y π_ref(y) e^{P(y≻π)/β} + 2β KL(π‖π_ref) − 1          (duality gap, closed form; dual_gap)
Policies are scored exactly: `policy.distribution(games)` gives each game's probabilities; a language model's has one
more entry, its invalid mass (any text that is not exactly a candidate), played as an action that loses to every
candidate (with_invalid, the one place that rule is written). evaluate() returns eval/dual_gap, eval/exploit,
eval/kl_ne, eval/win_vs_ref and eval/valid (docs/metrics.md), as means over all games, per split and per
split/family. A table of them: `python bench/arena_eval.py`.
"""
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ARENA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "arena")
GAMES_PATH = os.path.join(ARENA_DIR, "games.json")
METRICS = ("dual_gap", "exploit", "kl_ne", "win_vs_ref", "valid")
SOLVER_TOL = 1e-10  # max |π − BR(π)| accepted for the equilibrium π*
PROB_TOL = 1e-6     # tolerance of the games-file checks (P + Pᵀ = 1, diagonal ½, Σ ref = 1)


# ---- games files (format: docs/arena.md) ------------------------------------------------------------------------

class GamesError(ValueError):
    """A games file that breaks the format (docs/arena.md); the message names the file and the game."""


@dataclass(frozen=True, eq=False)
class Game:
    id: str
    prompt: str
    candidates: tuple        # n answer strings, unique after strip()
    P: np.ndarray            # (n, n) float64, P[i, j] = P(candidates[i] ≻ candidates[j])
    ref: np.ndarray          # (n,) float64, the tabular reference policy (uniform when the file has none)
    family: str              # "bt" | "cyclic" | "random" | "mixed" | …
    split: str               # "train" | "test" | …

    @property
    def n(self) -> int:
        return len(self.candidates)


@dataclass(eq=False)
class Games:
    beta: float
    games: list
    path: str = "<memory>"

    def __len__(self):
        return len(self.games)

    def __iter__(self):
        return iter(self.games)

    def __getitem__(self, i) -> Game:
        return self.games[i]

    def select(self, split=None, family=None) -> "Games":
        """The games of one split and/or family (None = all), same beta."""
        keep = [g for g in self.games if split in (None, "all", g.split) and family in (None, "all", g.family)]
        return Games(self.beta, keep, self.path)

    def by_id(self, game_id) -> Game:
        if not hasattr(self, "_ids"):
            self._ids = {g.id: g for g in self.games}
        if game_id not in self._ids:
            raise KeyError(f"{self.path}: no game with id {game_id!r}")
        return self._ids[game_id]


def load_games(path=GAMES_PATH) -> Games:
    """Read and validate a games file; raise GamesError naming the file, the game and the problem."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise GamesError(f"{path}: games file not found") from None
    except json.JSONDecodeError as e:
        raise GamesError(f"{path}: not valid JSON ({e})") from None
    return games_from_dict(obj, str(path))


def games_from_dict(obj, source="<memory>") -> Games:
    def fail(msg, gid=None):
        raise GamesError(f"{source}: " + (f"game {gid!r}: " if gid is not None else "") + msg)

    if not isinstance(obj, dict) or not isinstance(obj.get("games"), list) or not obj["games"]:
        fail('expected {"beta": <float>, "games": [<game>, ...]} with at least one game')
    beta = obj.get("beta")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        fail(f"beta must be a finite number > 0, got {beta!r}")
    games, seen = [], set()
    for k, g in enumerate(obj["games"]):
        if not isinstance(g, dict):
            fail(f"games[{k}] is not an object")
        gid = g.get("id")
        if not isinstance(gid, str) or not gid:
            fail(f"games[{k}]: id must be a non-empty string, got {gid!r}")
        if gid in seen:
            fail("duplicate id", gid)
        seen.add(gid)
        missing = [key for key in ("prompt", "candidates", "P", "family", "split") if key not in g]
        if missing:
            fail(f"missing key(s) {', '.join(missing)}", gid)
        for key in ("prompt", "family", "split"):
            if not isinstance(g[key], str) or not g[key]:
                fail(f"{key} must be a non-empty string, got {g[key]!r}", gid)
        cands = g["candidates"]
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) and c.strip() for c in cands):
            fail("candidates must be a non-empty list of non-empty strings", gid)
        stripped = [c.strip() for c in cands]
        if len(set(stripped)) != len(stripped):
            dup = next(c for c in stripped if stripped.count(c) > 1)
            fail(f"candidates are not unique after strip(): {dup!r} repeats", gid)
        n = len(cands)
        try:
            P = np.asarray(g["P"], dtype=np.float64)
        except (TypeError, ValueError):
            fail("P is not a numeric matrix", gid)
        if P.shape != (n, n):
            fail(f"P has shape {P.shape}, expected ({n}, {n}) for {n} candidates", gid)
        if not np.all(np.isfinite(P)) or P.min() < 0 or P.max() > 1:
            fail("P entries must be in [0, 1]", gid)
        if np.abs(np.diag(P) - 0.5).max() > PROB_TOL:
            fail("P diagonal must be 1/2", gid)
        err = np.abs(P + P.T - 1).max()
        if err > PROB_TOL:
            i, j = np.unravel_index(np.abs(P + P.T - 1).argmax(), P.shape)
            fail(f"P + P^T != 1 (P[{i}][{j}] + P[{j}][{i}] = {P[i, j] + P[j, i]:.6g})", gid)
        if g.get("ref") is None:
            ref = np.full(n, 1.0 / n)
        else:
            try:
                ref = np.asarray(g["ref"], dtype=np.float64)
            except (TypeError, ValueError):
                fail("ref is not a numeric vector", gid)
            if ref.shape != (n,):
                fail(f"ref has shape {ref.shape}, expected ({n},)", gid)
            if not np.all(np.isfinite(ref)) or ref.min() <= 0 or abs(ref.sum() - 1) > PROB_TOL:
                fail("ref must be a probability vector with every entry > 0 (the regularized game needs "
                     "full support)", gid)
            ref = ref / ref.sum()
        P.setflags(write=False)
        ref.setflags(write=False)
        games.append(Game(gid, g["prompt"], tuple(cands), P, ref, g["family"], g["split"]))
    return Games(float(beta), games, source)


# ---- the regularized game (docs/algorithms.md §0), float64 ------------------------------------------------

def with_invalid(P: np.ndarray) -> np.ndarray:
    """(n+1, n+1) matrix of the LM game: the last action is 'invalid text', which loses to every candidate
    (P[inv, i] = 0, P[i, inv] = 1) and ties itself (½)."""
    n = P.shape[0]
    Q = np.ones((n + 1, n + 1))
    Q[:n, :n] = P
    Q[n, :] = 0.0
    Q[n, n] = 0.5
    return Q


def _logsumexp(z):
    m = z.max()
    return m + math.log(np.exp(z - m).sum())


def best_response(P, ref, pi, beta):
    """BR(π)(y) ∝ π_ref(y) · exp(P(y ≻ π)/β)   (docs/algorithms.md §0)."""
    z = np.log(ref) + (P @ pi) / beta
    z = np.exp(z - z.max())
    return z / z.sum()


def residual(P, ref, pi, beta) -> float:
    """Fixed-point residual max_y |π(y) − BR(π)(y)|; 0 exactly at the regularized equilibrium."""
    return float(np.abs(pi - best_response(P, ref, pi, beta)).max())


def solve_nash(P, ref, beta, tol=SOLVER_TOL) -> np.ndarray:
    """The unique regularized equilibrium π* = BR(π*) in float64; raises AssertionError if the fixed-point
    residual max|π − BR(π)| ends above `tol`.

    Phase 1, mirror-prox: the two closed-form proximal steps of docs/algorithms.md §3 with η = 2β (fixed point π*),
    until the residual is < 1e-3. Phase 2, damped Newton on G(π) = π − BR(π), b = BR(π):
        J = I − (diag(b) − b bᵀ) P / β = I − S A / β,   S = diag(b) − b bᵀ ⪰ 0, A = P − ½ skew-symmetric
    (S 1 = 0 removes the ½ 1 1ᵀ part of P). S A has purely imaginary eigenvalues, so J (eigenvalues 1 − iλ/β)
    is never singular, and 1ᵀJ = 1ᵀ keeps Σπ = 1. Steps are halved until π stays positive and the residual
    decreases. If Newton stalls, phase 1 resumes down to 1e-6, then 1e-9, before Newton again. Converges on all
    arena games and on random 10-action games for β in [0.01, 1] (tests/test_arena.py).
    """
    P = np.asarray(P, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    beta = float(beta)
    log_ref = np.log(ref)
    pi, eta, eye = ref.copy(), 2.0 * beta, np.eye(len(ref))
    r = residual(P, ref, pi, beta)
    for switch in (1e-3, 1e-6, 1e-9):  # Newton stalled (never seen on the tests' games): go closer first
        for _ in range(200_000):  # phase 1: η = 2β mirror-prox, two O(n²) steps per iteration
            if r < switch:
                break
            half = _normalize_log((np.log(pi) + eta * log_ref + (eta / beta) * (P @ pi)) / (1 + eta))
            pi = _normalize_log((np.log(pi) + eta * log_ref + (eta / beta) * (P @ half)) / (1 + eta))
            r = residual(P, ref, pi, beta)
        for _ in range(100):  # phase 2: damped Newton
            if r <= tol * 1e-2:
                break
            b = best_response(P, ref, pi, beta)
            J = eye - (np.diag(b) - np.outer(b, b)) @ P / beta
            step = np.linalg.solve(J, b - pi)
            t = 1.0
            while t > 1e-12:
                cand = pi + t * step
                if cand.min() > 0:
                    cand = cand / cand.sum()
                    rc = residual(P, ref, cand, beta)
                    if rc < r:
                        pi, r = cand, rc
                        break
                t *= 0.5
            else:
                break
        if r <= tol:
            break
    if not r <= tol:
        raise AssertionError(f"solve_nash: fixed-point residual {r:.3g} > {tol:g} (beta={beta})")
    return pi


def _normalize_log(z):
    z = np.exp(z - z.max())
    return z / z.sum()


@lru_cache(maxsize=4096)
def _solve_cached(P_bytes, ref_bytes, n, beta):
    P = np.frombuffer(P_bytes, dtype=np.float64).reshape(n, n)
    ref = np.frombuffer(ref_bytes, dtype=np.float64)
    pi = solve_nash(P, ref, beta)
    pi.setflags(write=False)
    return pi


def equilibrium(P, ref, beta) -> np.ndarray:
    """solve_nash, cached on (P, ref, β): an evaluation every iteration re-solves nothing."""
    P = np.ascontiguousarray(P, dtype=np.float64)
    ref = np.ascontiguousarray(ref, dtype=np.float64)
    return _solve_cached(P.tobytes(), ref.tobytes(), P.shape[0], float(beta))


def kl(p, q) -> float:
    """KL(p‖q) with 0 log 0 = 0 (inf where q = 0 < p)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    s = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[s] * (np.log(p[s]) - np.log(q[s]))))


def dual_gap(P, ref, pi, beta) -> float:
    """DG(π) = max_π₁ J(π₁, π) − min_π₂ J(π, π₂) = 2β log Σ_y π_ref(y) e^{P(y≻π)/β} + 2β KL(π‖π_ref) − 1
    (docs/algorithms.md §0). max_π₁ J(π₁, π) = β log Σ π_ref e^{Pπ/β} + β KL(π‖π_ref) (Gibbs variational
    principle), and min_π₂ J(π, π₂) = 1 − that, because πᵀ P π₂ = 1 − π₂ᵀ P π."""
    return 2 * beta * _logsumexp(np.log(ref) + (P @ pi) / beta) + 2 * beta * kl(pi, ref) - 1


def game_metrics(P, ref, pi, beta, valid=1.0) -> dict:
    """All metrics of one game; P, ref, pi over the same actions (the LM game: see with_invalid)."""
    P, ref, pi = (np.asarray(a, dtype=np.float64) for a in (P, ref, pi))
    pi_star = equilibrium(P, ref, beta)
    return {"dual_gap": dual_gap(P, ref, pi, beta),
            "exploit": float((P @ pi).max()) - 0.5,
            "kl_ne": kl(pi_star, pi),
            "win_vs_ref": float(pi @ P @ ref),
            "valid": float(valid)}


# ---- evaluation of a policy --------------------------------------------------------------------------

def _as_game(game: Game, pi, ref):
    """(P, ref, π, valid) of the game a distribution is played in: n entries = tabular, n+1 = LM."""
    pi = np.asarray(pi, dtype=np.float64)
    if ref is None:
        ref = game.ref
    ref = np.asarray(ref, dtype=np.float64)
    n = game.n
    if pi.shape == (n,) and ref.shape == (n,):
        return game.P, ref, pi, 1.0
    if pi.shape == (n + 1,) and ref.shape == (n + 1,):
        return with_invalid(game.P), ref, pi, 1.0 - pi[n]
    raise ValueError(f"game {game.id!r}: policy distribution has {pi.shape[0]} entries and reference "
                     f"{ref.shape[0]}, expected both {n} (tabular) or both {n + 1} (LM, last = invalid mass); "
                     f"an LM policy needs ref=<the SFT policy>")


def per_game_metrics(pis, games: Games, refs=None) -> list:
    """One metrics dict per game. pis / refs: lists of distributions (refs None = the games' ref)."""
    if len(pis) != len(games) or (refs is not None and len(refs) != len(games)):
        raise ValueError(f"{len(pis)} distributions for {len(games)} games")
    out = []
    for k, g in enumerate(games):
        P, ref, pi, valid = _as_game(g, pis[k], None if refs is None else refs[k])
        out.append(game_metrics(P, ref, pi, games.beta, valid))
    return out


def split_keys(games) -> list:
    """The split and split/family groups of `games` ("train", "train/bt", …), train first, each split before its
    families: the rows of every metrics table."""
    keys = []
    for g in games:
        for key in (g.split, f"{g.split}/{g.family}"):
            if key not in keys:
                keys.append(key)
    return sorted(keys, key=lambda k: (k.split("/")[0] != "train", k.split("/")[0], "/" in k, k))


def aggregate(rows: list, games: Games) -> dict:
    """Means of per-game metrics: eval/<m>, eval/<m>/<split>, eval/<m>/<split>/<family>."""
    groups = {"": list(range(len(games)))}
    for k, g in enumerate(games):
        groups.setdefault(f"/{g.split}", []).append(k)
        groups.setdefault(f"/{g.split}/{g.family}", []).append(k)
    return {f"eval/{m}{key}": float(np.mean([rows[k][m] for k in idx]))
            for key, idx in groups.items() for m in METRICS}


def evaluate(policy, games: Games, ref=None) -> dict:
    """Exact metrics of `policy` on `games` (means, per split, per split/family; names: docs/metrics.md).

    policy: anything with .distribution(games) (TabularPolicy, LMPolicy) or a list of distributions.
    ref: π_ref — None for the games' ref (tabular), a policy (its distribution is used; for an LM pass
    the frozen SFT policy), or a list of distributions.
    """
    def dists(p):
        return p.distribution(games) if hasattr(p, "distribution") else list(p)
    pis = dists(policy)
    refs = None if ref is None else (pis if ref is policy else dists(ref))
    return aggregate(per_game_metrics(pis, games, refs), games)
