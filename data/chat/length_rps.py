"""An intransitive preference judge with an exact Nash target: rock-paper-scissors over response-length buckets.

    --judge py:data/chat/length_rps.py:prefer

A response's bucket is its length in characters, surrounding whitespace stripped: empty (0), short (1–60), medium
(61–150), long (151+). (Characters, not words: a word count rewards text without spaces.)
    short ≻ medium, medium ≻ long, long ≻ short      each with probability STRENGTH (0.8), the reverse 1 − STRENGTH
    two responses of one bucket tie (½); an empty response loses to every other one
No response beats all others, so no reward function (Bradley–Terry) expresses these preferences, and the Nash
equilibrium is a mix. P depends on a response only through its bucket, so the β-regularized equilibrium of a prompt is
the equilibrium of this 4 x 4 game with π_ref's bucket frequencies as the reference (common.judges.CategoryGame): it
is exact given them. The sampled evaluation reports eval/bucket_kl_ne, KL(π*‖π̂) of the bucket frequencies.

The interface of a py: judge (common.judges.PyJudge): prefer(prompts, a, b) -> one P(a_i ≻ b_i) in [0, 1] per pair,
prompts being conversations (lists of {"role", "content"} dicts); the attributes matrix, categories and names declare
the finite game.
"""
BOUNDS = (60, 150)         # characters: short ≤ 60 < medium ≤ 150 < long
STRENGTH = 0.8
NAMES = ("empty", "short", "medium", "long")


def bucket(text: str) -> int:
    n = len(text.strip())
    return 0 if n == 0 else 1 if n <= BOUNDS[0] else 2 if n <= BOUNDS[1] else 3


def _matrix(s):
    """P[i][j] = P(bucket i ≻ bucket j); P + Pᵀ = 1."""
    P = [[0.5] * 4 for _ in range(4)]
    for i in (1, 2, 3):
        P[i][0], P[0][i] = 1.0, 0.0                     # anything beats an empty answer
    for winner, loser in ((1, 2), (2, 3), (3, 1)):      # short ≻ medium ≻ long ≻ short
        P[winner][loser], P[loser][winner] = s, 1 - s
    return P


MATRIX = _matrix(STRENGTH)


def categories(prompts, responses):
    return [bucket(r) for r in responses]


def prefer(prompts, a, b):
    return [MATRIX[bucket(x)][bucket(y)] for x, y in zip(a, b)]


prefer.matrix, prefer.categories, prefer.names = MATRIX, categories, NAMES
