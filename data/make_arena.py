"""Regenerate the arena (data/arena/, arena v2): games, BPE tokenizer, and the tiny SFT model.

    python data/make_arena.py [--out data/arena] [--seed 0] [--steps 800]
    python data/make_arena.py --check          # regenerate into a temporary folder; compare bitwise with data/arena

Deterministic for a seed: numpy and torch generators seeded here, deterministic algorithms, torch pinned to 1 CPU
thread (a fixed thread count fixes the reduction order); about 5 minutes on the 2-core box. The committed files are
this command's output at the commit that last changed this file, common/model.py or common/losses.py: a change to
the rounding of the code it trains with changes the SFT model, and tests/test_make_arena.py, which replays the
games, the tokenizer and the first 20 SFT steps against data/arena_sft_trace.json (written by the same command),
fails until the arena is regenerated. Steps:

1. Games (the games file format of docs/arena.md), arena v2: preferences share structure across the prompts of a family, so a
   policy can win held-out prompts by generalizing. 4 families x 24 hand-written prompts; each family has its own
   topic domain (bt: food and cooking, cyclic: games and competitions, random: home and daily life, mixed: travel
   and nature) and three styles, surface forms shared by all its prompts ("{c}", "i recommend {c}", "{c} is the
   tastiest", ...). A candidate is one of the prompt's 2-3 contents in one of the family's styles: 6 or 9
   candidates. No content appears under two prompts. P (synthetic, P + Pᵀ = 1, diagonal ½) is a family-level
   style game plus per-prompt content effects and a little noise (game_matrix):
     bt      Bradley–Terry on r = u_style + v_content + ε: style scores u shared by the family (transitive)
     cyclic  the styles form a rock-paper-scissors cycle (each beats the next with probability ½ + a/2,
             a ~ U(0.7, 0.9)); contents tie (noise only)
     random  a random 3 x 3 style matrix shared by the family (lower triangle U(0, 1)), plus content effects
     mixed   w·(a BT style matrix) + (1 − w)·(a cyclic one), w ~ U(0.3, 0.7), plus content effects
   Entries are rounded to 4 decimals (lower triangle; the upper one is 1 − it). Each family is split 18/6 into
   train/test by prompt (seeded permutation): a test prompt has new contents in the family's styles. β = 0.1.
2. The SFT target q(content, style | x) = q_c · q_s: q_s skewed towards a suboptimal mix of styles shared by the
   family (0.6 / 0.3 / 0.1, most on the style the family's style game favours least: sft_style_mix) with per-prompt
   Dirichlet jitter, q_c ~ Dirichlet(3); total 0.98. The other 0.02 goes to three invalid answers (a truncated
   candidate, two contents joined with "and", another prompt's content in a family style), weights Dirichlet(1).
3. Tokenizer: byte-level BPE trained with `tokenizers` on the arena text, vocabulary 768, special tokens
   <|endoftext|> (EOS) and <|pad|>. An LM sees encode(prompt) + encode(answer) + [EOS] (docs/arena.md).
4. SFT: a Llama-architecture model (RoPE, RMSNorm, SwiGLU, GQA; ≈0.89M parameters, tied embeddings) built with
   common/model.py, trained by AdamW on the expected cross-entropy Σ_y q(y|x) · (−log π(y|x)) of the answer
   tokens + EOS (the loss of i.i.d. samples from q, without the sampling noise), 8 prompts per step, 800 steps,
   lr 5e-3 (warm-up, cosine), on all 96 prompts (an SFT set covers held-out prompts; the algorithms train on the
   72 train prompts only). It stops short of a perfect fit: its invalid mass (≈0.05) exceeds the 0.02 it was shown.
5. The games' "ref" is the trained SFT's exact distribution over each prompt's candidates, renormalized
   (its invalid mass dropped): the tabular world then regularizes toward the same reference as the LM world,
   whose π_ref is the SFT's exact distribution over candidates + invalid mass (common/arena.py).
"""
import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.arena import games_from_dict  # noqa: E402
from common.losses import sequence_logprobs  # noqa: E402
from common.model import ModelConfig, Transformer  # noqa: E402

BETA = 0.1
EOS, PAD = "<|endoftext|>", "<|pad|>"
INVALID_MASS = 0.02      # shown to the SFT, over three invalid answers per prompt
STEPS, LR, PROMPTS_PER_STEP = 800, 5e-3, 8

# Per family: its topic domain (a prompt's family can be told from its topic), its three styles (surface forms
# shared by every prompt of the family; "{c}" is the content) and 24 (prompt, contents) items. A candidate answer
# is one content in one style: 2-3 contents x 3 styles = 6 or 9 candidates per prompt. Contents are unique across
# the 96 prompts, so a held-out prompt shares its styles with the training prompts of its family and nothing else.
FAMILIES = {
    "bt": {
        "domain": "food and cooking",
        "styles": ["{c}", "i recommend {c}", "{c} is the tastiest"],
        "prompts": [
            ("Which fruit is best for a smoothie?", ["banana", "mango", "strawberry"]),
            ("What should I drink with breakfast?", ["coffee", "green tea", "orange juice"]),
            ("What is the best topping for pizza?", ["mushrooms", "pepperoni", "olives"]),
            ("What is a good snack for a long hike?", ["trail mix", "an apple", "a granola bar"]),
            ("What is the best way to cook an egg?", ["scrambled", "poached"]),
            ("Which vegetable is best for a salad?", ["lettuce", "cucumber", "tomato"]),
            ("Which spice makes soup better?", ["cumin", "paprika", "thyme"]),
            ("Which cheese goes best with crackers?", ["cheddar", "brie", "gouda"]),
            ("What toppings go on pancakes?", ["maple syrup", "blueberries"]),
            ("Which cookie should I bake?", ["chocolate chip", "oatmeal raisin", "shortbread"]),
            ("What kind of soup is best on a cold day?", ["chicken noodle", "minestrone", "lentil"]),
            ("Which bread is best for toast?", ["sourdough", "rye", "brioche"]),
            ("What should I cook for a dinner party?", ["roast chicken", "lasagna", "paella"]),
            ("Which tea is best in the evening?", ["chamomile", "peppermint"]),
            ("What is the best way to brew coffee?", ["french press", "pour over", "cold brew"]),
            ("Which nut is the healthiest snack?", ["almonds", "walnuts", "pistachios"]),
            ("What should I eat for lunch?", ["a sandwich", "sushi", "a burrito"]),
            ("Which dessert should I make for a party?", ["apple pie", "cheesecake", "brownies"]),
            ("What is a good side dish for grilled fish?", ["rice", "roasted potatoes", "green beans"]),
            ("Which pasta shape is best for pesto?", ["penne", "fusilli"]),
            ("What should I put in a fruit salad?", ["grapes", "melon", "kiwi"]),
            ("Which sauce goes best with fries?", ["ketchup", "mayo", "aioli"]),
            ("What is a good breakfast cereal?", ["oatmeal", "granola", "corn flakes"]),
            ("Which herb should I grow for cooking?", ["basil", "rosemary", "mint"]),
        ],
    },
    "cyclic": {
        "domain": "games and competitions",
        "styles": ["{c}", "go with {c}", "{c}, trust me"],
        "prompts": [
            ("Rock, paper or scissors: what should I throw?", ["rock", "paper", "scissors"]),
            ("Which army unit should I build next?", ["cavalry", "archers", "spearmen"]),
            ("Which pokemon type should I pick?", ["fire", "water", "grass"]),
            ("Which opening should I play in chess?", ["sicilian", "italian", "london"]),
            ("Which penalty kick direction should I choose?", ["left", "right"]),
            ("Which hero should I play in the next match?", ["tank", "healer", "sniper"]),
            ("Which card should I lead with?", ["ace", "king", "queen"]),
            ("Which color should I pick in the card game?", ["red", "blue", "green"]),
            ("Which way should the goalkeeper dive?", ["low", "high"]),
            ("Which character should I pick in the fighting game?", ["ninja", "knight", "robot"]),
            ("Which strategy should I use in the board game?", ["attack early", "build defenses", "trade"]),
            ("Which serve should I use in tennis?", ["flat serve", "slice serve", "kick serve"]),
            ("Which play should we call on third down?", ["a run", "a short pass", "a deep pass"]),
            ("Which piece should I move first in checkers?", ["the left piece", "the center piece"]),
            ("Which weapon should I choose in the video game?", ["sword", "bow", "staff"]),
            ("Which lane should I take in the racing game?", ["inside lane", "outside lane"]),
            ("Which team formation should we use?", ["four four two", "three five two", "four three three"]),
            ("Which pitch should I throw next?", ["fastball", "curveball", "changeup"]),
            ("Which deck should I bring to the tournament?", ["aggro deck", "control deck", "combo deck"]),
            ("Which spell should I open with in the duel?", ["fireball", "shield", "lightning"]),
            ("Which bid should I make in the auction game?", ["a low bid", "a high bid"]),
            ("Which side should I pick in the tug of war?", ["north side", "south side"]),
            ("Which race should I play in the strategy game?", ["elves", "dwarves", "orcs"]),
            ("Which door should I choose on the game show?", ["door one", "door two", "door three"]),
        ],
    },
    "random": {
        "domain": "home and daily life",
        "styles": ["{c}", "maybe {c}", "{c} works well"],
        "prompts": [
            ("How can I fall asleep faster?", ["read a book", "avoid screens", "breathe slowly"]),
            ("What is the best way to save money?", ["make a budget", "cook at home", "buy used"]),
            ("How do I keep my houseplants alive?", ["water weekly", "more sunlight"]),
            ("What is a good way to relax after work?", ["take a walk", "call a friend", "take a bath"]),
            ("Which kitchen tool is most useful at home?", ["a sharp knife", "a cast iron pan", "a blender"]),
            ("How should I spend a day off?", ["sleep in", "visit family", "clean the house"]),
            ("What should I say to start a conversation?", ["how was your day", "nice weather today"]),
            ("How can I keep my desk tidy?", ["use trays", "clear it daily", "label drawers"]),
            ("Which room should I clean first?", ["the kitchen", "the bathroom", "the bedroom"]),
            ("How can I wake up earlier?", ["set two alarms", "go to bed early"]),
            ("What should I do when I feel stressed?", ["take deep breaths", "write it down", "listen to music"]),
            ("How can I make my home cozier?", ["add candles", "use soft lights", "get a rug"]),
            ("What is a good hobby to pick up at home?", ["knitting", "painting", "pottery"]),
            ("How should I organize my closet?", ["by color", "by season", "by type"]),
            ("What is a good way to practice gratitude?", ["keep a journal", "write a thank you note"]),
            ("How do I remember to drink more water?", ["carry a bottle", "set reminders", "add lemon"]),
            ("What should I do on a rainy evening?", ["watch a film", "bake bread", "do a puzzle"]),
            ("How can I focus better at home?", ["close the door", "turn off alerts", "use a timer"]),
            ("Which chore should I do every day?", ["wash the dishes", "make the bed"]),
            ("How can I cut my energy bill?", ["seal the windows", "turn off lights", "lower the heat"]),
            ("What should I keep by the front door?", ["a shoe rack", "an umbrella", "a key hook"]),
            ("How can I start a morning routine?", ["stretch first", "drink water", "plan the day"]),
            ("How should I store fresh herbs?", ["in a glass of water", "in a damp towel"]),
            ("What is a good gift for a new neighbor?", ["fresh cookies", "a potted plant", "a handwritten card"]),
        ],
    },
    "mixed": {
        "domain": "travel and nature",
        "styles": ["{c}", "i would pick {c}", "{c} for sure"],
        "prompts": [
            ("Which planet would you visit first?", ["mars", "venus", "saturn"]),
            ("Which city should I visit in Italy?", ["rome", "florence", "venice"]),
            ("Which season is best for a road trip?", ["spring", "autumn"]),
            ("Which mountain would you like to climb?", ["everest", "kilimanjaro", "fuji"]),
            ("What is the best way to get around a city?", ["walk", "bike", "subway"]),
            ("Which ocean animal is the coolest?", ["octopus", "dolphin", "whale"]),
            ("Which campsite should we choose?", ["by the lake", "in the forest", "on the hill"]),
            ("Which wild animal is the fastest?", ["cheetah", "pronghorn"]),
            ("Which bird is the most beautiful?", ["peacock", "flamingo", "swan"]),
            ("Which beach should we visit this summer?", ["a sandy beach", "a rocky cove", "a quiet bay"]),
            ("Which national park should I see first?", ["yosemite", "yellowstone", "zion"]),
            ("What should I pack for a beach day?", ["sunscreen", "a towel", "a sun hat"]),
            ("Which tree would you plant in a yard?", ["oak", "maple", "cherry"]),
            ("Which flower should I plant in a sunny spot?", ["sunflower", "lavender", "marigold"]),
            ("Which country should I visit next?", ["japan", "peru", "norway"]),
            ("Which winter trip should we take?", ["a ski resort", "a cabin", "the northern lights"]),
            ("Which trail should we hike on Sunday?", ["the ridge trail", "the river trail"]),
            ("How should we travel across Europe?", ["by train", "by car", "by bus"]),
            ("Which island would you like to visit?", ["iceland", "bali", "crete"]),
            ("Which river should we canoe down?", ["the green river", "the snake river"]),
            ("What should I see on a night sky tour?", ["the moon", "a comet", "the milky way"]),
            ("Which desert would you like to explore?", ["the sahara", "the gobi", "the atacama"]),
            ("Which lake is best for a swim?", ["a mountain lake", "a forest lake"]),
            ("Which animal would you like to see on safari?", ["lions", "elephants", "giraffes"]),
        ],
    },
}


# ---- 1. games ----------------------------------------------------------------------------------------

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _skew_noise(n, sd, rng):
    """An (n, n) skew-symmetric matrix with N(0, sd²) entries below the diagonal."""
    L = np.tril(rng.normal(0.0, sd, size=(n, n)), -1)
    return L - L.T


def cyclic_styles(rng):
    """3 x 3 rock-paper-scissors over the styles: each beats the next with probability ½ + a/2, a ~ U(0.7, 0.9)."""
    order = rng.permutation(3)
    a = rng.uniform(0.7, 0.9)
    S = np.full((3, 3), 0.5)
    for k in range(3):
        i, j = order[k], order[(k + 1) % 3]
        S[i, j], S[j, i] = 0.5 + a / 2, 0.5 - a / 2
    return S


def family_style_model(family, rng):
    """What the family's prompts share: bt style scores u (P = σ(u_s + v_c − …)), or a 3 x 3 style matrix S."""
    if family == "bt":
        return {"u": rng.permutation(np.array([-1.0, 0.0, 1.0]) * rng.uniform(1.0, 1.5))}
    if family == "cyclic":
        return {"S": cyclic_styles(rng)}
    if family == "random":
        L = np.tril(rng.uniform(size=(3, 3)), -1)
        return {"S": L + np.triu(1 - L.T, 1) + 0.5 * np.eye(3)}
    w = rng.uniform(0.3, 0.7)   # mixed
    u = rng.permutation(np.array([-1.0, 0.0, 1.0]) * rng.uniform(1.0, 1.5))
    return {"S": w * _sigmoid(u[:, None] - u[None, :]) + (1 - w) * cyclic_styles(rng)}


def game_matrix(family, model, n_content, rng):
    """P over the n_content x 3 candidates (content-major: candidate 3c + s is content c in style s):
        bt      P[i,j] = σ(r_i − r_j), r = u_style + v_content + ε, v ~ N(0, 0.5²), ε ~ N(0, 0.1²) (transitive)
        cyclic  S[s_i, s_j] + skew noise N(0, 0.02²): contents tie
        random  S[s_i, s_j] + 0.5·(σ(v_ci − v_cj) − ½) + skew noise, S the family's random style matrix
        mixed   as random, S = w·σ(u_a − u_b) + (1 − w)·(a rock-paper-scissors matrix)
    clipped to [0.02, 0.98] (then P + Pᵀ = 1 still holds)."""
    s = np.tile(np.arange(3), n_content)
    c = np.repeat(np.arange(n_content), 3)
    n = len(s)
    v = rng.normal(0.0, 0.5, size=n_content)
    if family == "bt":
        r = model["u"][s] + v[c] + rng.normal(0.0, 0.1, size=n)
        return _sigmoid(r[:, None] - r[None, :])
    P = model["S"][s[:, None], s[None, :]] + _skew_noise(n, 0.02, rng)
    if family != "cyclic":
        P = P + 0.5 * (_sigmoid(v[c][:, None] - v[c][None, :]) - 0.5)
    return np.clip(P, 0.02, 0.98)


def _finish(P):
    """Round the strict lower triangle to 4 decimals and set the upper one to 1 − it, diagonal ½."""
    L = np.round(np.clip(np.tril(P, -1), 0.0, 1.0), 4)
    return np.tril(L, -1) + np.triu(1.0 - L.T, 1) + 0.5 * np.eye(len(P))


def make_games(rng):
    """The 96 games (docs/arena.md's format) and, per family, the style model they share (returned for the SFT target)."""
    games, models = [], {}
    for family, spec in FAMILIES.items():
        items = spec["prompts"]
        models[family] = family_style_model(family, rng)
        test = set(rng.permutation(len(items))[:len(items) // 4].tolist())
        for k, (prompt, contents) in enumerate(items):
            cands = [style.format(c=content) for content in contents for style in spec["styles"]]
            P = np.round(_finish(game_matrix(family, models[family], len(contents), rng)), 4)
            games.append({"id": f"{family}{k:02d}", "prompt": prompt, "candidates": cands, "P": P.tolist(),
                          "ref": None, "family": family, "split": "test" if k in test else "train"})
    return games, models


# ---- 2. SFT target distribution ----------------------------------------------------------------------

def style_matrix(model):
    return model["S"] if "S" in model else _sigmoid(model["u"][:, None] - model["u"][None, :])


def sft_style_mix(model, rng):
    """The family's skewed SFT mix over its 3 styles: 0.6 on the style the family's style game (uniform ref, β) gives
    the least mass at its regularized equilibrium, 0.3 on the next, 0.1 on its favourite; so the SFT starts far from
    π* on every prompt of the family, in the same direction."""
    from common.arena import solve_nash
    eq = solve_nash(style_matrix(model), np.full(3, 1 / 3), BETA)
    mix = np.empty(3)
    mix[np.argsort(eq, kind="stable")] = [0.6, 0.3, 0.1]
    return mix


def make_targets(games, models, rng):
    """Per game: list of (answer text, probability) = q over candidates (mass 1 − INVALID_MASS) + 3 invalid answers.
    q(content, style | x) = q_c(content | x) · q_s(style | x): q_s ~ Dirichlet(30 · the family's skewed mix), q_c ~
    Dirichlet(3), each floored (0.03, 0.1) and renormalized."""
    mixes = {family: sft_style_mix(models[family], rng) for family in FAMILIES}
    targets = []
    for g in games:
        spec = FAMILIES[g["family"]]
        contents = spec["prompts"][int(g["id"][-2:])][1]
        cands = g["candidates"]
        qs = np.maximum(rng.dirichlet(30 * mixes[g["family"]]), 0.03)
        qc = np.maximum(rng.dirichlet(3 * np.ones(len(contents))), 0.1)
        q = np.outer(qc / qc.sum(), qs / qs.sum()).ravel()          # content-major, as the candidates
        q = (1 - INVALID_MASS) * q / q.sum()
        a, b = rng.choice(len(contents), size=2, replace=False)
        longest, cut = max(cands, key=len), None
        for cut in range(max(1, (len(max(cands, key=len)) + 1) // 2), len(longest)):   # half of it, or a bit more
            if longest[:cut].strip() not in cands:
                break
        same_family = [c for item in spec["prompts"] for c in item[1] if c not in contents]
        invalid = [longest[:cut],                                                               # truncated
                   spec["styles"][int(rng.integers(3))].format(c=f"{contents[a]} and {contents[b]}"),  # two joined
                   spec["styles"][int(rng.integers(3))].format(c=same_family[rng.integers(len(same_family))])]
        assert not set(invalid) & set(cands) and len(set(invalid)) == 3, (g["id"], invalid)   # ^ another prompt's
        w = INVALID_MASS * rng.dirichlet(np.ones(3))
        targets.append(list(zip(cands, q.tolist())) + list(zip(invalid, w.tolist())))
    return targets


# ---- 3. tokenizer ------------------------------------------------------------------------------------

def make_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


# ---- 4. SFT ------------------------------------------------------------------------------------------

def encode_rows(tok, games, targets, eos_id, pad_id):
    """Right-padded (R, T) batch of prompt + answer + EOS for every (game, answer), with the answer mask,
    the target probability of each row and the game index of each row."""
    rows, resp, weight, gidx = [], [], [], []
    for k, (g, tg) in enumerate(zip(games, targets)):
        p = tok.encode(g["prompt"]).ids
        for text, prob in tg:
            a = tok.encode(text, add_special_tokens=False).ids + [eos_id]
            rows.append(p + a)
            resp.append([0] * len(p) + [1] * len(a))
            weight.append(prob)
            gidx.append(k)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    rmask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, resp)):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
        rmask[i, :len(r)] = torch.tensor(m)
    return ids, attn, rmask, torch.tensor(weight, dtype=torch.float32), torch.tensor(gidx)


def train_sft(model, batch, n_games, steps, lr, prompts_per_step, gen, log_every=50, stop_after=None):
    """AdamW on the expected cross-entropy; returns the loss of every step taken (stop_after: only the first ones,
    with the schedule of the full run, for the reproducibility check of tests/test_make_arena.py)."""
    ids, attn, rmask, weight, gidx = batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    def lr_factor(s):  # linear warm-up, then cosine to 0
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    order = torch.empty(0, dtype=torch.long)
    t0 = time.time()
    losses = []
    for step in range(steps if stop_after is None else stop_after):
        if len(order) < prompts_per_step:  # epochs over prompts, reshuffled with the seeded generator
            order = torch.cat([order, torch.randperm(n_games, generator=gen)])
        chosen, order = order[:prompts_per_step], order[prompts_per_step:]
        rows = torch.isin(gidx, chosen).nonzero().squeeze(1)
        T = int(attn[rows].sum(1).max())
        _, logps = sequence_logprobs(model, ids[rows, :T], attn[rows, :T], rmask[rows, :T])  # (R,)
        loss = -(weight[rows] * logps).sum() / prompts_per_step   # E_x Σ_y q(y|x) (−log π(y|x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step:4d}  loss {losses[-1]:.4f}  {time.time() - t0:6.1f}s", flush=True)
    return losses


@torch.no_grad()
def exact_probs(model, batch):
    ids, attn, rmask, _, _ = batch
    out = []
    for s in range(0, len(ids), 256):
        _, lp = sequence_logprobs(model, ids[s:s + 256], attn[s:s + 256], rmask[s:s + 256])
        out.append(lp.double().exp())
    return torch.cat(out)


# ---- main ----------------------------------------------------------------------------------------------

TRACE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arena_sft_trace.json")
TRACE_STEPS = 20


def prepare(seed=0, vocab_size=768):
    """Steps 1-3 and the untrained model, deterministic for a seed (main and tests/test_make_arena.py share it).
    Returns games (dicts, ref None), targets, tokenizer, model and the SFT batch; the caller has set threads."""
    rng = np.random.default_rng(seed)
    games, models = make_games(rng)
    targets = make_targets(games, models, rng)
    corpus = [g["prompt"] for g in games] + [t for tg in targets for t, _ in tg]
    tok = make_tokenizer(corpus, vocab_size)
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=384,
                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    return games, targets, tok, model, encode_rows(tok, games, targets, eos_id, pad_id)


def machine():
    """What float rounding depends on: the torch build and the CPU kernels it picks."""
    model = ""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": model or platform.processor()}


def weights_sha256(model):
    import hashlib
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "arena"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=STEPS, help="SFT optimizer steps")
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--prompts-per-step", type=int, default=PROMPTS_PER_STEP)
    ap.add_argument("--vocab-size", type=int, default=768)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and compare it bitwise with --out (exit 1 if it differs)")
    args = ap.parse_args()
    if args.check:
        return check(args)
    t_start = time.time()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    games, targets, tok, model, batch = prepare(args.seed, args.vocab_size)
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    print(f"games: {len(games)}, candidates: {sum(len(g['candidates']) for g in games)}; "
          f"tokenizer: vocab {tok.get_vocab_size()}")
    print(f"model: {model.num_params():,} parameters; training {args.steps} steps")
    losses = train_sft(model, batch, len(games), args.steps, args.lr, args.prompts_per_step, gen)

    # 5. the games' ref: the SFT's exact distribution over candidates, renormalized
    model.eval()
    probs = exact_probs(model, batch).numpy()
    gidx = batch[4].numpy()
    ncand = [len(g["candidates"]) for g in games]
    tv, invalid = [], []
    for k, g in enumerate(games):
        rows = np.nonzero(gidx == k)[0]
        p, q = probs[rows[:ncand[k]]], np.array([w for _, w in targets[k]])[:ncand[k]]
        invalid.append(1 - p.sum())
        tv.append(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())
        g["ref"] = [max(round(float(x), 8), 1e-8) for x in p / p.sum()]  # the loader renormalizes
    print(f"SFT: invalid mass mean {np.mean(invalid):.4f}, max {np.max(invalid):.4f} (shown {INVALID_MASS}); "
          f"TV(SFT, q) over candidates mean {np.mean(tv):.4f}, max {np.max(tv):.4f}")

    games_obj = games_from_dict({"beta": BETA, "games": games}, "generated games")  # validates
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_arena_", dir=os.path.dirname(out))
    try:
        model.save_pretrained(tmp)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": eos_id, "pad_token_id": pad_id, "max_new_tokens": 32}, f, indent=2)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD,
                       "model_max_length": model.config.max_position_embeddings}, f, indent=2)
        with open(os.path.join(tmp, "games.json"), "w") as f:
            _dump_games(games_to_dict(games_obj), f)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out == os.path.join(os.path.dirname(os.path.abspath(__file__)), "arena") and args.seed == 0 and (
            args.steps, args.lr, args.prompts_per_step, args.vocab_size) == (STEPS, LR, PROMPTS_PER_STEP, 768):
        write_trace(args, losses)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))} ({size / 2**20:.2f} MiB) "
          f"in {time.time() - t_start:.0f}s")


def write_trace(args, losses):
    """data/arena_sft_trace.json: the first TRACE_STEPS SFT losses and the weights' sha256 after them, from a fresh
    run of the same steps (tests/test_make_arena.py replays them in CI)."""
    games, _, _, model, batch = prepare(args.seed, args.vocab_size)   # prepare() seeds torch itself
    first = train_sft(model, batch, len(games), args.steps, args.lr, args.prompts_per_step,
                      torch.Generator().manual_seed(args.seed), log_every=0, stop_after=TRACE_STEPS)
    assert first == losses[:TRACE_STEPS], "the SFT's first steps are not reproducible within one process"
    trace = {"seed": args.seed, "steps": TRACE_STEPS, "losses": first, "sha256": weights_sha256(model),
             "machine": machine(), "written_by": "python data/make_arena.py"}
    tmp = TRACE_PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump(trace, f, indent=1)
    os.replace(tmp, TRACE_PATH)


def check(args):
    """--check: regenerate into a temporary folder and compare every file bitwise with --out."""
    import filecmp
    out = os.path.abspath(args.out)
    with tempfile.TemporaryDirectory(prefix=".check_arena_", dir=os.path.dirname(out)) as tmp:
        cmd = [sys.executable, os.path.abspath(__file__), "--out", os.path.join(tmp, "arena"),
               "--seed", str(args.seed), "--steps", str(args.steps), "--lr", str(args.lr),
               "--prompts-per-step", str(args.prompts_per_step), "--vocab-size", str(args.vocab_size)]
        import subprocess
        subprocess.run(cmd, check=True)
        names = sorted(set(os.listdir(out)) | set(os.listdir(os.path.join(tmp, "arena"))))
        differ = [n for n in names if not (os.path.isfile(os.path.join(out, n)) and os.path.isfile(
            os.path.join(tmp, "arena", n)) and filecmp.cmp(os.path.join(out, n), os.path.join(tmp, "arena", n),
                                                            shallow=False))]
    if differ:
        print(f"{out}: regenerated files differ: {', '.join(differ)}")
        return 1
    print(f"{out}: every file regenerated bitwise identical ({', '.join(names)})")
    return 0


def games_to_dict(games) -> dict:
    """A common.arena.Games as the games file's JSON object."""
    return {"beta": games.beta, "games": [
        {"id": g.id, "prompt": g.prompt, "candidates": list(g.candidates), "P": g.P.tolist(),
         "ref": g.ref.tolist(), "family": g.family, "split": g.split} for g in games]}


def _dump_games(obj, f):
    """games.json with one game per line block and one matrix row per line (diffable, small)."""
    f.write('{"beta": %s, "games": [\n' % json.dumps(obj["beta"]))
    for k, g in enumerate(obj["games"]):
        rows = ",\n    ".join(json.dumps(r) for r in g["P"])
        f.write('  {"id": %s, "family": %s, "split": %s,\n   "prompt": %s,\n   "candidates": %s,\n'
                '   "ref": %s,\n   "P": [\n    %s]}%s\n' % (
                    json.dumps(g["id"]), json.dumps(g["family"]), json.dumps(g["split"]), json.dumps(g["prompt"]),
                    json.dumps(g["candidates"]), json.dumps(g["ref"]), rows, "," if k < len(obj["games"]) - 1 else ""))
    f.write("]}\n")


if __name__ == "__main__":
    sys.exit(main())
