"""Regenerate the arena (data/arena/): games, BPE tokenizer, and the tiny SFT model.

    python data/make_arena.py [--out data/arena] [--seed 0] [--steps 800]

Deterministic for a seed: numpy and torch generators seeded here, deterministic algorithms, torch pinned to 1 CPU
thread (a fixed thread count fixes the reduction order; and on the shared 2-core machine 2 OpenMP threads ran
2-30x slower under load); 3-7 minutes wall on the 2-core box, depending on its load. The committed files were
written by this command at commit 1f442fe. Later changes to the rounding of the code it trains with
(common/model.py, common/losses.py) make it write a different SFT model today: max |Δweight| 0.57 at 2ea7656 and
0.59 at 690a3b1, tokenizer and configs unchanged. The README's arena section records this; every figure in the
README uses the committed files. Steps:

1. Games (contract 2 of DESIGN.md). 96 hand-written prompts with 3–10 short candidate answers each, 24 per
   family; the preference matrices are synthetic (drawn here, not elicited), P + Pᵀ = 1, diagonal ½:
     bt      Bradley–Terry, P[i,j] = σ(r_i − r_j), r_i ~ N(0, s²), s ~ U(1, 3) (transitive)
     cyclic  P[i,j] = ½ + (a/2)·sin(2π(c_i − c_j)/n)/max|sin| + small skew noise, c a random cyclic
             order of the candidates, a ~ U(0.6, 0.9) (rock-paper-scissors-like; mixed equilibrium)
     random  strict lower triangle ~ U(0, 1), upper = 1 − lower (the EGPO tabular test-bed)
     mixed   w·bt + (1 − w)·cyclic, w ~ U(0.3, 0.7)
   Entries are rounded to 4 decimals (lower triangle; the upper one is 1 − it). Each family is split 18/6
   into train/test by a seeded permutation. β = 0.1 for all games.
2. The SFT target. Per prompt a skewed reference q over its candidates: Dirichlet(1) with a floor of 0.03,
   renormalized to a total of 0.95; the other 0.05 goes to three invalid answers (a truncated candidate, two
   candidates joined with "and", another prompt's answer), weights Dirichlet(1).
3. Tokenizer: byte-level BPE trained with `tokenizers` on the arena text, vocabulary 768, special tokens
   <|endoftext|> (EOS) and <|pad|>. An LM sees encode(prompt) + encode(answer) + [EOS] (contract 2).
4. SFT: a Llama-architecture model (RoPE, RMSNorm, SwiGLU, GQA; ≈0.89M parameters, tied embeddings) built with
   common/model.py, trained by AdamW on the expected cross-entropy Σ_y q(y|x) · (−log π(y|x)) of the answer
   tokens + EOS (the loss of i.i.d. samples from q, without the sampling noise), 8 prompts per step, 800 steps,
   lr 5e-3 (warm-up, cosine). Training stops short of a perfect fit on purpose: the SFT's distribution is
   close to q but not equal, and its invalid mass exceeds the 5% it was shown.
5. The games' "ref" is the trained SFT's exact distribution over each prompt's candidates, renormalized
   (its invalid mass dropped): the tabular world then regularizes toward the same reference as the LM world,
   whose π_ref is the SFT's exact distribution over candidates + invalid mass (common/arena.py).
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.arena import games_from_dict, games_to_dict  # noqa: E402
from common.losses import sequence_logprobs  # noqa: E402
from common.model import ModelConfig, Transformer  # noqa: E402

BETA = 0.1
EOS, PAD = "<|endoftext|>", "<|pad|>"
INVALID_MASS = 0.05

# (prompt, candidates), 24 per family, in the order bt, cyclic, random, mixed.
PROMPTS = {
    "bt": [
        ("Which fruit is best for a smoothie?", ["banana", "mango", "strawberry", "blueberry", "pineapple", "kiwi"]),
        ("What is a good name for a black cat?", ["shadow", "midnight", "salem", "onyx", "luna"]),
        ("Which color should I paint a small bedroom?", ["soft white", "pale blue", "sage green", "light gray"]),
        ("What should I drink with breakfast?",
         ["coffee", "green tea", "orange juice", "water", "milk", "hot chocolate", "black tea"]),
        ("Which planet would you visit first?", ["mars", "venus", "jupiter", "saturn", "mercury", "neptune", "uranus"]),
        ("What is the best way to learn a new language?",
         ["daily practice", "talk with natives", "watch movies", "use flashcards", "take a class"]),
        ("Which instrument should a beginner learn?",
         ["piano", "guitar", "ukulele", "violin", "drums", "flute", "harmonica", "recorder", "cello"]),
        ("What is a good snack for a long hike?",
         ["trail mix", "an apple", "a granola bar", "beef jerky", "peanut butter crackers", "dried mango"]),
        ("Which season is best for a road trip?", ["spring", "summer", "autumn", "winter"]),
        ("What should I name my new goldfish?", ["bubbles", "goldie", "nemo", "finn", "sunny", "captain", "ziggy"]),
        ("Which pet is easiest to care for?", ["a cat", "a fish", "a hamster", "a dog", "a turtle"]),
        ("What is the best topping for pizza?", ["mushrooms", "pepperoni", "olives", "basil", "pineapple",
                                                 "extra cheese", "onions", "spinach", "ham", "peppers"]),
        ("Which city should I visit in Italy?", ["rome", "florence", "venice", "naples", "milan", "bologna"]),
        ("What is a good gift for a new neighbor?",
         ["fresh cookies", "a potted plant", "a bottle of wine", "a handwritten card"]),
        ("How should I start a morning run?",
         ["stretch first", "walk for five minutes", "jog slowly", "drink some water"]),
        ("Which board game is best for a family night?",
         ["monopoly", "scrabble", "catan", "uno", "chess", "clue", "ticket to ride"]),
        ("What is the best way to cook an egg?", ["scrambled", "boiled", "poached", "fried", "baked"]),
        ("Which flower should I plant in a sunny spot?",
         ["sunflower", "lavender", "marigold", "zinnia", "rose", "cosmos"]),
        ("What should I read on a rainy day?",
         ["a mystery novel", "a poetry book", "a comic", "a cookbook", "a travel guide"]),
        ("Which vegetable is best for a salad?",
         ["lettuce", "spinach", "cucumber", "tomato", "carrot", "radish", "kale", "arugula"]),
        ("What is a good time to go to bed?", ["nine pm", "ten pm", "eleven pm", "midnight"]),
        ("Which bird is the most beautiful?", ["peacock", "flamingo", "cardinal", "swan", "hummingbird", "blue jay"]),
        ("What is the best sport to watch on TV?",
         ["football", "tennis", "basketball", "baseball", "golf", "cycling", "cricket"]),
        ("Which spice makes soup better?", ["black pepper", "cumin", "paprika", "thyme", "ginger", "turmeric",
                                            "garlic powder", "bay leaf", "chili flakes"]),
    ],
    "cyclic": [
        ("Rock, paper or scissors: what should I throw?", ["rock", "paper", "scissors"]),
        ("Which move wins at rock paper scissors lizard spock?", ["rock", "paper", "scissors", "lizard", "spock"]),
        ("Which army unit should I build next?", ["cavalry", "archers", "spearmen"]),
        ("Which pokemon type should I pick?", ["fire", "water", "grass"]),
        ("Which opening should I play in chess?",
         ["sicilian", "italian", "french", "caro kann", "london", "queens gambit"]),
        ("Which penalty kick direction should I choose?", ["left", "right", "center"]),
        ("Which route should I take to work?",
         ["the highway", "the river road", "the back streets", "the bridge", "downtown"]),
        ("What should I bring to a potluck dinner?",
         ["pasta salad", "garlic bread", "lemon bars", "chili", "deviled eggs", "fruit tart", "rice pilaf"]),
        ("Which hero should I play in the next match?", ["tank", "healer", "sniper", "assassin"]),
        ("Which card should I lead with?", ["ace", "king", "queen", "jack", "ten"]),
        ("What strategy should I use in the election game?",
         ["attack ads", "town halls", "door knocking", "social media", "debates", "endorsements"]),
        ("Which slogan should our team use?",
         ["never give up", "all for one", "dream big", "stay hungry", "play fair"]),
        ("Which color should I pick in the card game?", ["red", "blue", "green", "yellow"]),
        ("Which dessert should win the bake off?", ["apple pie", "cheesecake", "tiramisu", "brownies",
                                                    "creme brulee", "carrot cake", "baklava", "lemon tart"]),
        ("Which style of haircut should I try?", ["buzz cut", "bob", "pixie", "layers", "bangs", "undercut"]),
        ("Which campsite should we choose?", ["by the lake", "in the forest", "on the hill"]),
        ("What should we do on Saturday afternoon?",
         ["go bowling", "see a movie", "visit the museum", "play mini golf", "go skating"]),
        ("Which ice cream flavor is the best?", ["vanilla", "chocolate", "strawberry", "mint chip", "cookie dough",
                                                 "pistachio", "rocky road", "butter pecan", "coffee"]),
        ("Which superpower would you choose?", ["flight", "invisibility", "super strength", "telepathy",
                                                "time travel", "teleportation", "healing"]),
        ("Which sandwich should I order?", ["turkey club", "grilled cheese", "blt", "tuna melt", "reuben",
                                            "caprese", "egg salad", "falafel wrap", "chicken pesto", "ham and swiss"]),
        ("Which way should the goalkeeper dive?", ["left", "right", "stay in the middle"]),
        ("Which costume should I wear to the party?",
         ["pirate", "astronaut", "vampire", "wizard", "robot", "ninja", "ghost", "clown"]),
        ("Which dance move should I learn first?", ["the moonwalk", "the robot", "the twist", "the floss", "the worm"]),
        ("What kind of movie should we watch tonight?", ["comedy", "horror", "romance", "action", "drama",
                                                          "documentary", "animation", "thriller", "western", "musical"]),
    ],
    "random": [
        ("What is a good first program to write?",
         ["hello world", "a calculator", "a to do list", "a guessing game", "a timer"]),
        ("Which font should I use for my resume?",
         ["arial", "helvetica", "garamond", "calibri", "georgia", "times new roman"]),
        ("How can I fall asleep faster?", ["read a book", "avoid screens", "breathe slowly", "keep the room cool",
                                           "listen to rain sounds", "drink chamomile tea"]),
        ("What is the best way to save money?", ["make a budget", "cook at home", "cancel subscriptions", "buy used",
                                                 "automate savings", "walk more", "avoid impulse buys",
                                                 "compare prices"]),
        ("Which language should I learn to code in?",
         ["python", "javascript", "rust", "go", "java", "c", "ruby", "haskell", "kotlin", "swift"]),
        ("What should I plant in a vegetable garden?",
         ["tomatoes", "zucchini", "beans", "peas", "lettuce", "peppers", "carrots"]),
        ("Which animal would make the best mascot?",
         ["lion", "eagle", "bear", "wolf", "owl", "shark", "fox", "tiger", "falcon"]),
        ("What should I pack for a beach day?", ["sunscreen", "a towel", "an umbrella", "snacks", "a book", "a frisbee"]),
        ("What is a good hobby to pick up?", ["knitting", "painting", "baking", "gardening", "birdwatching",
                                              "photography", "pottery", "chess", "running", "origami"]),
        ("How do I keep my houseplants alive?", ["water weekly", "more sunlight", "repot them", "use fertilizer"]),
        ("What should I eat for lunch?",
         ["soup", "salad", "a sandwich", "sushi", "leftovers", "tacos", "noodles", "a burrito"]),
        ("Which country has the best food?",
         ["italy", "japan", "mexico", "india", "france", "thailand", "greece", "spain", "china", "turkey"]),
        ("What is a good way to relax after work?",
         ["take a walk", "cook dinner", "call a friend", "take a bath", "meditate", "play a game"]),
        ("Which musical genre is best for studying?",
         ["classical", "jazz", "lo fi", "ambient", "piano covers", "film scores"]),
        ("What is the best breakfast cereal?", ["oatmeal", "corn flakes", "granola", "bran flakes", "puffed rice"]),
        ("What should I name my band?", ["the night owls", "electric toast", "paper moons", "static sky",
                                         "velvet thunder", "the lost keys", "neon garden"]),
        ("Which kitchen tool is most useful?", ["a sharp knife", "a cast iron pan", "a cutting board", "a blender",
                                                "tongs", "a whisk", "a peeler", "a scale"]),
        ("What is a good way to practice gratitude?",
         ["keep a journal", "write a thank you note", "say it out loud", "share a meal"]),
        ("Which tree would you plant in a yard?", ["oak", "maple", "birch", "cherry", "willow", "pine", "apple"]),
        ("Which winter sport should I try?",
         ["skiing", "snowboarding", "ice skating", "sledding", "curling", "snowshoeing", "hockey"]),
        ("What color should my new car be?",
         ["red", "black", "white", "silver", "blue", "green", "yellow", "orange", "gray"]),
        ("How should I spend a day off?", ["sleep in", "go hiking", "visit family", "clean the house", "see a show"]),
        ("Which shoes are best for walking?", ["sneakers", "sandals", "boots", "loafers", "running shoes",
                                               "slip ons", "hiking shoes", "clogs", "flats", "trail runners"]),
        ("What should I say to start a conversation?", ["how was your day", "nice weather today",
                                                        "what are you reading", "i like your shoes",
                                                        "have we met before", "what brings you here"]),
    ],
    "mixed": [
        ("Which cheese goes best with crackers?",
         ["cheddar", "brie", "gouda", "swiss", "blue cheese", "manchego", "havarti"]),
        ("Which museum should I visit first?", ["art museum", "science museum", "history museum",
                                                "natural history museum", "wax museum"]),
        ("What is the best way to get around a city?", ["walk", "bike", "bus", "subway", "taxi", "scooter"]),
        ("What toppings go on pancakes?", ["maple syrup", "blueberries", "butter", "whipped cream",
                                           "chocolate chips", "bananas", "honey", "powdered sugar"]),
        ("Which cookie should I bake?", ["chocolate chip", "oatmeal raisin", "sugar", "snickerdoodle",
                                         "peanut butter", "shortbread", "gingerbread", "macadamia"]),
        ("What should I write in a birthday card?", ["happy birthday", "have a great year", "cheers to you",
                                                     "best wishes", "enjoy your day", "many happy returns"]),
        ("Which ocean animal is the coolest?", ["octopus", "dolphin", "whale", "sea turtle", "jellyfish", "shark",
                                                "seahorse", "manta ray", "orca"]),
        ("Which tea is best in the evening?", ["chamomile", "peppermint", "rooibos", "lavender", "lemon balm"]),
        ("Which holiday is the most fun?",
         ["halloween", "new year", "thanksgiving", "independence day", "valentines day", "easter"]),
        ("What kind of soup is best on a cold day?", ["chicken noodle", "tomato", "minestrone", "lentil",
                                                      "french onion", "miso", "clam chowder", "pho", "split pea"]),
        ("Which dog breed is best for an apartment?", ["pug", "french bulldog", "beagle", "poodle", "shih tzu",
                                                       "dachshund", "chihuahua", "corgi"]),
        ("What is the best way to study for an exam?", ["practice tests", "flashcards", "study groups",
                                                        "rewrite notes", "teach someone", "short sessions"]),
        ("Which mountain would you like to climb?",
         ["everest", "kilimanjaro", "mont blanc", "fuji", "denali", "matterhorn", "aconcagua"]),
        ("What should I do when I feel stressed?", ["take deep breaths", "go for a walk", "talk to someone",
                                                    "write it down", "listen to music"]),
        ("Which nut is the healthiest?", ["almonds", "walnuts", "pistachios", "cashews", "pecans", "hazelnuts",
                                          "brazil nuts", "peanuts", "macadamias", "pine nuts"]),
        ("What is the best way to brew coffee?",
         ["french press", "pour over", "espresso", "cold brew", "drip machine", "moka pot", "aeropress"]),
        ("Which wild animal is the fastest?", ["cheetah", "pronghorn", "lion", "horse", "greyhound", "ostrich"]),
        ("Which bread is best for toast?", ["sourdough", "rye", "white", "whole wheat", "brioche", "multigrain"]),
        ("Which programming editor should I use?", ["vim", "emacs", "vs code", "nano", "sublime"]),
        ("What is a good name for a sailboat?", ["sea breeze", "wanderer", "blue horizon", "free spirit",
                                                 "salty dog", "serenity", "second wind", "odyssey"]),
        ("Which day of the week is the best?",
         ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]),
        ("What should I cook for a dinner party?", ["roast chicken", "lasagna", "paella", "curry", "risotto",
                                                    "tacos", "salmon", "stew", "ramen", "pot pie"]),
        ("Which room in a house is the coziest?",
         ["the living room", "the kitchen", "the bedroom", "the attic", "the library"]),
        ("What is a good weekend project?", ["build a bookshelf", "paint a room", "plant herbs", "fix the bike",
                                             "bake bread", "clean the garage"]),
    ],
}


# ---- 1. games ----------------------------------------------------------------------------------------

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bt_matrix(n, rng):
    r = rng.normal(0.0, rng.uniform(1.0, 3.0), size=n)
    return _sigmoid(r[:, None] - r[None, :])


def cyclic_matrix(n, rng):
    c = rng.permutation(n)  # position of each candidate on the cycle
    s = np.sin(2 * np.pi * (c[:, None] - c[None, :]) / n)  # skew-symmetric
    noise = rng.normal(0.0, 0.03, size=(n, n))
    return 0.5 + rng.uniform(0.6, 0.9) / 2 * s / np.abs(s).max() + np.tril(noise, -1) - np.tril(noise, -1).T


def random_matrix(n, rng):
    return np.tril(rng.uniform(size=(n, n)), -1)  # lower triangle only; completed by _finish


def mixed_matrix(n, rng):
    w = rng.uniform(0.3, 0.7)
    return w * bt_matrix(n, rng) + (1 - w) * cyclic_matrix(n, rng)


def _finish(P):
    """Round the strict lower triangle to 4 decimals and set the upper one to 1 − it, diagonal ½."""
    L = np.round(np.clip(np.tril(P, -1), 0.0, 1.0), 4)
    return np.tril(L, -1) + np.triu(1.0 - L.T, 1) + 0.5 * np.eye(len(P))


def make_games(rng):
    makers = {"bt": bt_matrix, "cyclic": cyclic_matrix, "random": random_matrix, "mixed": mixed_matrix}
    games = []
    for family, items in PROMPTS.items():
        test = set(rng.permutation(len(items))[:len(items) // 4].tolist())
        for k, (prompt, cands) in enumerate(items):
            P = np.round(_finish(makers[family](len(cands), rng)), 4)
            games.append({"id": f"{family}{k:02d}", "prompt": prompt, "candidates": cands, "P": P.tolist(),
                          "ref": None, "family": family, "split": "test" if k in test else "train"})
    return games


# ---- 2. SFT target distribution ----------------------------------------------------------------------

def make_targets(games, rng):
    """Per game: list of (answer text, probability) = q over candidates (mass 0.95) + 3 invalid answers."""
    all_answers = sorted({c for g in games for c in g["candidates"]})
    targets = []
    for g in games:
        cands = g["candidates"]
        q = np.maximum(rng.dirichlet(np.ones(len(cands))), 0.03)
        q = (1 - INVALID_MASS) * q / q.sum()
        a, b = rng.choice(len(cands), size=2, replace=False)
        longest = max(cands, key=len)
        invalid = [longest[: max(1, (len(longest) + 1) // 2)],                     # truncated
                   f"{cands[a]} and {cands[b]}"]                                   # two answers joined
        others = [c for c in all_answers if c not in cands]
        invalid.append(others[rng.integers(len(others))])                          # another prompt's answer
        assert not set(invalid) & set(cands) and len(set(invalid)) == 3, (g["id"], invalid)
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


def train_sft(model, batch, n_games, steps, lr, prompts_per_step, gen, log_every=50):
    ids, attn, rmask, weight, gidx = batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    def lr_factor(s):  # linear warm-up, then cosine to 0
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    order = torch.empty(0, dtype=torch.long)
    t0 = time.time()
    for step in range(steps):
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
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)


@torch.no_grad()
def exact_probs(model, batch):
    ids, attn, rmask, _, _ = batch
    out = []
    for s in range(0, len(ids), 256):
        _, lp = sequence_logprobs(model, ids[s:s + 256], attn[s:s + 256], rmask[s:s + 256])
        out.append(lp.double().exp())
    return torch.cat(out)


# ---- main ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "arena"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=800, help="SFT optimizer steps")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=768)
    args = ap.parse_args()
    t_start = time.time()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    games = make_games(rng)
    targets = make_targets(games, rng)
    print(f"games: {len(games)}, candidates: {sum(len(g['candidates']) for g in games)}")

    corpus = [g["prompt"] for g in games] + [t for tg in targets for t, _ in tg]
    tok = make_tokenizer(corpus, args.vocab_size)
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    print(f"tokenizer: vocab {tok.get_vocab_size()}")

    cfg = ModelConfig(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=384,
                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id)
    model = Transformer(cfg)
    print(f"model: {model.num_params():,} parameters; training {args.steps} steps")
    batch = encode_rows(tok, games, targets, eos_id, pad_id)
    train_sft(model, batch, len(games), args.steps, args.lr, args.prompts_per_step, gen)

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
    print(f"SFT: invalid mass mean {np.mean(invalid):.4f} (target {INVALID_MASS}); "
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
                       "model_max_length": cfg.max_position_embeddings}, f, indent=2)
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
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))} ({size / 2**20:.2f} MiB) "
          f"in {time.time() - t_start:.0f}s")


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
    main()
