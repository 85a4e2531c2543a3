"""The real-checkpoint world end to end on a tiny random CHAT checkpoint, checked against transformers.

Built once per module (chat_world): a byte-level BPE trained here with <|endoftext|> (id 0), <|im_start|>, <|im_end|>
and single-token "A" / "B", whose post-processor writes a BOS (<|im_start|>) before a text encoded with special tokens,
so that a rendered chat prompt tokenized with them would show a second one; tokenizer_config.json with SmolLM2's ChatML
template (a default system prompt); a random transformers.LlamaForCausalLM whose config.json eos_token_id is
<|endoftext|>, not the end-of-turn token, so <|im_end|> can only come from the template. Its weights are edited so that
<|im_end|> is likely right after a set of "stop" tokens (a constant direction of their embeddings that the lm_head row
of <|im_end|> reads; measured: p ≈ 0.6 after a stop token, 0.003 elsewhere): sampled responses end at <|im_end|>
often, but not always, and its log-prob is not 0. Next to it a random LlamaForSequenceClassification reward model with
the same tokenizer and template, a prompts file (single-turn lines and one multi-turn line) and a held-out eval prompts
file.

Proven:
1. LMPolicy.load finds <|im_end|> from the template (eos_id) and keeps <|endoftext|> (eos_ids); prompt ids equal
   transformers' apply_chat_template(tokenize=True); a sampled response stops at its first EOS id and no later than
   max_new_tokens, some at <|im_end|>; logprobs() and token_logprobs() equal a naive full-logits computation with
   transformers' model on prompt + response ids, the <|im_end|> term included.
2. An inpo.py run saves a folder transformers loads (AutoTokenizer, AutoModelForCausalLM), whose
   generation_config.json lists <|im_end|>, whose chat template renders as ours, and whose greedy generation equals
   transformers' generate(do_sample=False); its metrics rows hold the sampled evaluation's keys in range, and rows 0
   and 1 are reproduced exactly from the input and the saved checkpoints (same seeds) and the judge function.
3. Every script runs one tiny iteration with each judge: rm:DIR, pair:DIR (the chat LM itself) and py:FILE:NAME.
4. Bad input on the command line: exit status 2, one stderr line "error: …" naming what was wrong, no run folder
   (a py: judge's bad value is written plainly, 2.0, not np.float64(2.0)).
5. --chat-template none keeps prompts raw: prompt ids = tokenizer.encode(text).ids, EOS = config.json's.
6. The rm: and pair: judges' probabilities equal those computed with transformers' models on apply_chat_template ids.

Speed: every torch computation of this module runs on one thread (one_thread): on a small shared machine two threads
made a tiny run ~20x slower. The command-line runs (2., 4.) are subprocesses two at a time; the twelve runs of 3. go
through the scripts' own entry point cli(main, Args) in this process.
"""
import concurrent.futures
import contextlib
import importlib
import importlib.util
import io
import json
import os
import shutil
import traceback

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from common.chat import ChatTemplate, conversation, read_prompts
from common.chat import encode_prompt
from common.cli import cli
from common.lm_policy import LMPolicy
from common.world import EVAL_SEED, REF_EVAL_SEED
from conftest import ROOT, read_metrics, run_script

transformers = pytest.importorskip("transformers")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SENTENCES = [SYSTEM_PROMPT, "What is the capital of France? Paris is the capital of France.",
             "Name a colour. Blue is a colour. Pick a fruit: an apple, a pear.", "A or B? B, then A.",
             "Which is better, response A or response B? Answer with one letter."]
PROMPTS = ["What is the capital of France?", "Name a colour.", "Pick a fruit."]
MULTI = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "And a fruit?"}]
EVAL_PROMPTS = ["What is a colour?", "Name a fruit, then a colour."]
LENGTH_RPS = os.path.join("data", "chat", "length_rps.py")
PY_JUDGE = f"py:{LENGTH_RPS}:prefer"
MAX_NEW = 8
EVAL_N = 4          # --eval-samples of the inpo.py run of 2.: 8 responses, some truncated, some ended by <|im_end|>


def byte_bpe(sentences, alphabet=True):
    """A byte-level BPE with SPECIAL as special added tokens (ids 0, 1, 2) and a post-processor that writes the BOS
    <|im_start|> before a text encoded with special tokens: a raw prompt gets it, a rendered chat prompt must not get a
    second one. alphabet=False: only the bytes seen in `sentences`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    kw = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if alphabet else {}
    tok.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                                           show_progress=False, **kw))
    tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    return tok


def write_tokenizer(path, tok):
    """tokenizer.json + a SmolLM2-style tokenizer_config.json (bos/eos/pad tokens, the ChatML template)."""
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "chat_template": SMOLLM2}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def llama_config(vocab, **kw):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                    bos_token_id=1, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, **kw)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chat_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_world")
    tok = byte_bpe(SENTENCES)
    assert [tok.token_to_id(t) for t in SPECIAL] == [0, 1, 2]
    assert all(len(tok.encode(t, add_special_tokens=False).ids) == 1 for t in ("A", "B"))
    V = tok.get_vocab_size()
    im_end = tok.token_to_id("<|im_end|>")

    lm = root / "chat_lm"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(V))
    rng = np.random.default_rng(0)
    newline = tok.encode("\n", add_special_tokens=False).ids
    candidates = [i for i in range(3, V) if i not in newline]
    stop = sorted(rng.choice(candidates, size=V // 5, replace=False).tolist())
    with torch.no_grad():       # <|im_end|> likely right after a stop token, rare elsewhere (module docstring)
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[stop, 0] = 1.0
        model.lm_head.weight[im_end] = 0.0
        model.lm_head.weight[im_end, 0] = 1.1
    model.save_pretrained(lm)
    write_tokenizer(lm, tok)
    if os.path.exists(lm / "generation_config.json"):   # none: every EOS id comes from config.json + the template
        os.remove(lm / "generation_config.json")

    rm = root / "rm"
    torch.manual_seed(1)
    transformers.LlamaForSequenceClassification(llama_config(V, num_labels=1)).save_pretrained(rm)
    write_tokenizer(rm, tok)

    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS] + [{"messages": MULTI}])
    eval_prompts = write_jsonl(root / "eval_prompts.jsonl", [{"prompt": p} for p in EVAL_PROMPTS])
    return {"root": root, "lm": str(lm), "rm": str(rm), "prompts": prompts, "eval_prompts": eval_prompts,
            "tok": tok, "im_end": im_end}


def response_ids(samples):
    """Each row's response tokens (EOS included where generated)."""
    ids, mask = samples.input_ids.cpu(), samples.response_mask.bool().cpu()
    return [ids[i][mask[i]].tolist() for i in range(len(samples))]


def hf_chat_ids(hf_tok, messages):
    return hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


# ---- 1. end of turn ------------------------------------------------------------------------------------------

def test_end_of_turn_prompt_ids_sampling_and_logprobs(chat_world):
    w = chat_world
    im_end, eot = w["im_end"], 0
    policy = LMPolicy.load(w["lm"], max_new_tokens=MAX_NEW)
    assert policy.eos_id == im_end
    assert im_end in policy.eos_ids and eot in policy.eos_ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(w["lm"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(w["lm"]).eval()

    convs = read_prompts(w["prompts"])
    assert len(convs[-1].messages) == 3
    for c in convs:
        assert policy.prompt_ids(c) == hf_chat_ids(hf_tok, c.as_dicts())
    assert policy.prompt_ids(PROMPTS[0]) == hf_chat_ids(hf_tok, [{"role": "user", "content": PROMPTS[0]}])
    assert hf_tok.decode(policy.prompt_ids(convs[0])).startswith("<|im_start|>system\n" + SYSTEM_PROMPT)  # one BOS

    n = 12
    samples = policy.sample(convs, n, generator=torch.Generator().manual_seed(0))
    rows = response_ids(samples)
    eos = set(policy.eos_ids)
    for r in rows:
        assert 1 <= len(r) <= MAX_NEW
        assert not eos & set(r[:-1])                      # nothing after the first EOS
        assert r[-1] in eos or len(r) == MAX_NEW
    ended = [r for r in rows if r[-1] == im_end]
    assert 0 < len(ended) < len(rows)                    # some stop at <|im_end|>, some run to max_new_tokens
    assert policy.response_stats(samples)["truncated"] == pytest.approx(
        sum(r[-1] not in eos for r in rows) / len(rows))

    # log-probs: a naive full-logits pass of transformers' model over each prompt + response, EOS term included
    lp, tok_lp = policy.logprobs(samples).detach(), policy.token_logprobs(samples).detach()
    prompts = [c for c in convs for _ in range(n)]
    mask = samples.response_mask.bool()
    for i, (c, r) in enumerate(zip(prompts, rows)):
        p = policy.prompt_ids(c)
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
        terms = torch.stack([logp[len(p) + k - 1, t] for k, t in enumerate(r)])
        assert lp[i].item() == pytest.approx(terms.sum().item(), abs=1e-4)
        assert torch.allclose(tok_lp[i][mask[i]].double(), terms, atol=1e-4)
        if r[-1] == im_end:
            assert terms[-1].item() < -1e-2                  # <|im_end|> is scored, and it is not a point mass
            assert lp[i].item() != pytest.approx(terms[:-1].sum().item(), abs=1e-3)


# ---- the runs ----------------------------------------------------------------------------------------------------

SCRIPTS = {
    "inpo.py": ["--samples-per-prompt", "2", "--epochs", "1"],
    "nash_mp.py": ["--samples-per-prompt", "2", "--opponent-samples", "2", "--inner-steps", "1"],
    "nash_dpo.py": ["--samples-per-prompt", "2", "--groups-per-prompt", "1", "--epochs", "1"],
    "tanpo.py": ["--pairs-per-prompt", "1", "--bonus-samples", "1", "--epochs", "1"],
}
JUDGES = ("rm", "pair", "py")
RUN_FILES = ("args.json", "metrics.jsonl", "config.json", "model.safetensors", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json")


def world_flags(w, judge=PY_JUDGE):
    return ["--model", w["lm"], "--prompts", w["prompts"], "--eval-prompts", w["eval_prompts"], "--judge", judge,
            "--iterations", "1"]


def run_all(jobs: dict) -> dict:
    """{key: argv} -> {key: CompletedProcess} of run_script, two at a time with one torch thread each: a run is
    mostly start-up (imports, loading), and two of them share the two cores of a small machine."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(run_script, *argv, "--threads", "1") for k, argv in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def run_in_process(script, argv):
    """(exit status, stderr) of `python script argv…` run in this process: the scripts' __main__ is exactly
    cli(main, Args), so this is the command line's code path without a fresh interpreter's ~4 s of start-up."""
    module = importlib.import_module(script[:-3])
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            cli(module.main, module.Args, list(argv))
        except SystemExit as e:
            code = e.code
        except Exception:       # what the interpreter would do: the traceback on stderr, exit status 1
            traceback.print_exc()
            code = 1
    return code, err.getvalue()


BAD_JUDGE = "def prefer(prompts, a, b):\n    return [2.0] * len(a)\n"
RAISING_TEMPLATE = "{{ raise_exception('this template refuses every conversation') }}"
BAD = ("no_key", "unknown_role", "template_raises", "multi_turn_raw", "pair_without_A", "truncated_weights",
       "py_judge_out_of_range", "eval_prompts_alone")


@pytest.fixture(scope="module")
def cli_runs(chat_world):
    """The command-line runs, as subprocesses: the inpo.py run that 2. inspects ("main") and the bad inputs of 4.
    Returns {key: (run dir, CompletedProcess, fragments the error line must contain)}."""
    w = chat_world
    root = w["root"] / "cli"
    os.makedirs(root)
    jobs, dirs = {}, {}

    def job(key, script, argv):
        os.makedirs(root / key)
        dirs[key] = str(root / key / "run")
        jobs[key] = [script, *argv, "--run-dir", dirs[key]]

    job("main", "inpo.py", [*world_flags(w), "--samples-per-prompt", "2", "--max-new-tokens", str(MAX_NEW),
                            "--eval-samples", str(EVAL_N), "--epochs", "1"])
    no_key = write_jsonl(root / "no_key.jsonl", [{"prompt": "Name a colour."}, {"text": "Pick a fruit."}])
    bad_role = write_jsonl(root / "bad_role.jsonl", [{"messages": [{"role": "wizard", "content": "Hi."}]}])
    template = root / "refuses.jinja"
    template.write_text(RAISING_TEMPLATE)
    bad_judge = root / "bad_judge.py"
    bad_judge.write_text(BAD_JUDGE)
    no_a = root / "no_single_a"                            # the chat LM with a tokenizer that has no byte "A"
    shutil.copytree(w["lm"], no_a)
    lower = byte_bpe([s.lower() for s in SENTENCES], alphabet=False)
    assert len(lower.encode("A", add_special_tokens=False).ids) != 1
    write_tokenizer(no_a, lower)
    truncated = root / "truncated"
    shutil.copytree(w["lm"], truncated)
    weights = truncated / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    bad = {  # name -> (flags, fragments of the error line)
        "no_key": ([*world_flags(w), "--prompts", no_key], [f"{no_key}:2:", '"prompt"', '"messages"']),
        "unknown_role": ([*world_flags(w), "--prompts", bad_role], [f"{bad_role}:1:", "unknown role 'wizard'"]),
        "template_raises": ([*world_flags(w), "--chat-template", str(template)],
                            [str(template), "this template refuses every conversation"]),
        "multi_turn_raw": ([*world_flags(w), "--chat-template", "none"], ["multi-turn", "--chat-template none"]),
        "pair_without_A": (world_flags(w, f"pair:{no_a}"), [f"pair:{no_a}", "'A'", "single tokens A and B"]),
        "truncated_weights": ([*world_flags(w), "--model", str(truncated)],
                              [str(weights), "not a readable safetensors file"]),
        "py_judge_out_of_range": (world_flags(w, f"py:{bad_judge}:prefer"),
                                  [f"py:{bad_judge}:prefer", "2.0", "expected probabilities in [0, 1]"]),
        "eval_prompts_alone": (["--model", w["lm"], "--judge", PY_JUDGE, "--eval-prompts", w["eval_prompts"]],
                               ["--eval-prompts", "--prompts"]),
    }
    assert tuple(bad) == BAD
    fragments = {}
    for k, (name, (argv, frags)) in enumerate(bad.items()):    # on the four scripts in turn (setup_world is shared)
        script = list(SCRIPTS)[k % len(SCRIPTS)]
        job(name, script, [*argv, *SCRIPTS[script], "--max-new-tokens", "4", "--eval-samples", "1"])
        fragments[name] = frags
    results = run_all(jobs)
    return {k: (dirs[k], r, fragments.get(k)) for k, r in results.items()}


@pytest.fixture(scope="module")
def script_runs(chat_world):
    """3.: every script x judge, one tiny iteration each, in this process (run_in_process). {key: (run dir, exit
    status, stderr)}."""
    w = chat_world
    out = {}
    for script, flags in SCRIPTS.items():
        for kind in JUDGES:
            judge = {"rm": f"rm:{w['rm']}", "pair": f"pair:{w['lm']}", "py": PY_JUDGE}[kind]
            d = str(w["root"] / "runs" / f"{script[:-3]}_{kind}")
            code, err = run_in_process(script, [*world_flags(w, judge), *flags, "--max-new-tokens", "6",
                                                "--eval-samples", "1", "--threads", "1", "--run-dir", d])
            out[script, kind] = (d, code, err)
    return out


# ---- 2. the saved checkpoint and the sampled evaluation ------------------------------------------------------------

def length_rps():
    spec = importlib.util.spec_from_file_location("length_rps_reference", os.path.join(ROOT, LENGTH_RPS))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_eval(model_dir, ref_dir, eval_prompts, n):
    """World.sampled_metrics recomputed from its definition: n draws per eval prompt from the policy at model_dir
    (seed EVAL_SEED) and from π_ref at ref_dir (REF_EVAL_SEED), judged by length_rps.prefer."""
    rps = length_rps()
    pol = LMPolicy.load(model_dir, max_new_tokens=MAX_NEW)
    ref = LMPolicy.load(ref_dir, max_new_tokens=MAX_NEW)
    convs = read_prompts(eval_prompts)
    a = pol.sample(convs, n, generator=torch.Generator().manual_seed(EVAL_SEED))
    b = ref.sample(convs, n, generator=torch.Generator().manual_seed(REF_EVAL_SEED))
    eos = set(pol.eos_ids)
    rows = response_ids(a)
    texts = [pol.tokenizer.decode([t for t in r if t not in eos]) for r in rows]
    assert texts == a.texts
    p = np.array(rps.prefer([c.as_dicts() for c in convs for _ in range(n)], a.texts, b.texts)).reshape(len(convs), n)
    per_prompt = p.mean(1)
    buckets = np.bincount([rps.bucket(t) for t in texts], minlength=len(rps.NAMES)) / len(texts)
    out = {"eval/win_vs_ref": per_prompt.mean(), "eval/win_vs_ref_se": per_prompt.std(ddof=1) / np.sqrt(len(convs)),
           "eval/len": np.mean([len(r) - (r[-1] in eos) for r in rows]),
           "eval/truncated": np.mean([r[-1] not in eos for r in rows]),
           "eval/empty": np.mean([not t.strip() for t in texts])}
    out.update({f"eval/bucket/{name}": f for name, f in zip(rps.NAMES, buckets)})
    return out


def test_inpo_run_saves_a_transformers_checkpoint_and_logs_the_sampled_evaluation(chat_world, cli_runs):
    w = chat_world
    run_dir, r, _ = cli_runs["main"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(run_dir + ".incomplete")
    for f in RUN_FILES:
        assert os.path.isfile(os.path.join(run_dir, f)), f
    with open(os.path.join(run_dir, "generation_config.json")) as f:
        gc = json.load(f)
    assert isinstance(gc["eos_token_id"], list) and w["im_end"] in gc["eos_token_id"] and 0 in gc["eos_token_id"]
    with open(os.path.join(run_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == SMOLLM2
    with open(os.path.join(run_dir, "model.safetensors"), "rb") as f, \
            open(os.path.join(w["lm"], "model.safetensors"), "rb") as g:
        assert f.read() != g.read()                       # it trained

    # transformers loads it, renders the template as we do, and decodes greedily as we do
    hf_tok = transformers.AutoTokenizer.from_pretrained(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    policy = LMPolicy.load(run_dir)
    assert policy.max_new_tokens == MAX_NEW and policy.eos_id == w["im_end"]
    template = ChatTemplate.load(run_dir)
    convs = [conversation(PROMPTS[0]), conversation(MULTI),
             conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}])]
    for c in convs:
        assert template.render(c.as_dicts()) == hf_tok.apply_chat_template(c.as_dicts(), add_generation_prompt=True,
                                                                           tokenize=False)
        assert policy.prompt_ids(c) == hf_chat_ids(hf_tok, c.as_dicts())
    assert sorted(hf.generation_config.eos_token_id) == sorted(gc["eos_token_id"])   # what generate() stops at
    greedy = response_ids(policy.sample(convs, 1, temperature=0))          # a left-padded batch of 3 prompts
    for c, ours in zip(convs, greedy):
        ids = torch.tensor([policy.prompt_ids(c)])
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_NEW)[0, ids.shape[1]:]
        assert ours == theirs.tolist()
        assert response_ids(policy.sample([c], 1, temperature=0)) == [ours]      # alone = in the padded batch
    assert any(g[-1] == w["im_end"] for g in greedy)        # both stopped at <|im_end|> somewhere

    # metrics.jsonl: the sampled evaluation's keys, in range, and rows 0 / 1 recomputed from π_ref / the saved policy
    rows = read_metrics(run_dir)
    assert [row["iteration"] for row in rows] == [0, 1]
    names = length_rps().NAMES
    for row in rows:
        for k in ("eval/win_vs_ref", "eval/truncated", "eval/empty", *(f"eval/bucket/{n}" for n in names)):
            assert 0 <= row[k] <= 1, k
        assert 0 <= row["eval/len"] <= MAX_NEW
        for k in ("eval/win_vs_ref_se", "eval/bucket_kl_ne", "eval/bucket_kl_ne_se"):
            assert np.isfinite(row[k]) and row[k] >= 0, k
        assert sum(row[f"eval/bucket/{n}"] for n in names) == pytest.approx(1, abs=1e-12)
    assert 0 < rows[0]["eval/truncated"] < 1          # so eval/len's EOS rule matters below
    for row, model_dir in zip(rows, (w["lm"], run_dir)):
        for k, v in expected_eval(model_dir, w["lm"], w["eval_prompts"], EVAL_N).items():
            assert row[k] == pytest.approx(v, abs=1e-9), k


# ---- 3. every script with every judge ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", JUDGES)
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_script_runs_with_every_judge(chat_world, script_runs, script, kind):
    run_dir, code, err = script_runs[script, kind]
    assert code == 0, err[-3000:]
    assert os.path.isdir(run_dir) and not os.path.exists(run_dir + ".incomplete")
    for f in RUN_FILES:
        assert os.path.isfile(os.path.join(run_dir, f)), f
    rows = read_metrics(run_dir)
    assert [row["iteration"] for row in rows] == [0, 1]
    for row in rows:
        assert 0 <= row["eval/win_vs_ref"] <= 1 and 0 <= row["eval/len"] <= 6
        assert ("eval/bucket_kl_ne" in row) == (kind == "py")   # only the py judge plays a finite game
    with open(os.path.join(run_dir, "generation_config.json")) as f:
        assert chat_world["im_end"] in json.load(f)["eos_token_id"]
    if script == "tanpo.py":                                   # the max-player is saved next to the min-player
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert os.path.isfile(os.path.join(run_dir, "max_player", f)), f


@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_script_runs_under_bf16_on_a_chat_checkpoint(chat_world, tmp_path, script, lora):
    """The mixed-precision path (bf16 autocast, bf16 judge and π_ref or LoRA base) runs on CPU, as CI runs it."""
    d = str(tmp_path / "run")
    code, err = run_in_process(script, [*world_flags(chat_world), *SCRIPTS[script], "--max-new-tokens", "6",
                                        "--eval-samples", "1", "--threads", "1", "--precision", "bf16",
                                        "--lora-rank", str(lora), "--run-dir", d])
    assert code == 0, err[-3000:]
    rows = read_metrics(d)
    assert [row["iteration"] for row in rows] == [0, 1] and all(np.isfinite(row["eval/bucket_kl_ne"]) for row in rows)
    assert os.path.isfile(os.path.join(d, "adapter", "adapter_config.json")) == bool(lora)


# ---- 4. bad input on the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_error_line_and_no_run_folder(cli_runs, name):
    run_dir, r, fragments = cli_runs[name]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, (fragment, r.stderr)
    assert os.listdir(os.path.dirname(run_dir)) == []        # neither the run dir nor its .incomplete, nor anything


# ---- the model judges score as transformers does ----------------------------------------------------------------

def test_model_judges_equal_transformers(chat_world):
    """rm:DIR is σ(r(x, a) − r(x, b)) with r the transformers reward model's score of the conversation + answer
    rendered by apply_chat_template; pair:DIR is ½ [p(a, b) + 1 − p(b, a)] with p the transformers LM's softmax over
    the "A" / "B" logits after the judge's message rendered by apply_chat_template."""
    from common.judges import PAIR_MESSAGE, PLAIN_CONTEXT_TEMPLATE, make_judge
    w = chat_world
    hf_tok = transformers.AutoTokenizer.from_pretrained(w["lm"])
    convs = [conversation(PROMPTS[0]), conversation(MULTI)]
    a, b = ["Paris.", "Red, then an apple."], ["Lyon", ""]

    rm = make_judge(f"rm:{w['rm']}")
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(w["rm"]).eval()

    def reward(c, y):
        ids = hf_tok.apply_chat_template(c.as_dicts() + [{"role": "assistant", "content": y}],
                                         add_generation_prompt=False, tokenize=True, return_dict=False)
        with torch.no_grad():
            return hf_rm(torch.tensor([ids])).logits[0, 0].double()
    expected = torch.stack([torch.sigmoid(reward(c, x) - reward(c, y)) for c, x, y in zip(convs, a, b)])
    assert torch.allclose(rm.prob(convs, a, b), expected, atol=1e-5)

    pair = make_judge(f"pair:{w['lm']}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(w["lm"]).eval()
    A, B = (hf_tok.convert_tokens_to_ids(t) for t in ("A", "B"))

    plain = transformers.AutoTokenizer.from_pretrained(w["lm"])   # RLHFlow's model card: a "plain" tokenizer
    plain.chat_template = PLAIN_CONTEXT_TEMPLATE                    # renders the context

    def p_first(c, x, y):
        context = plain.apply_chat_template(c.as_dicts(), tokenize=False)
        message = PAIR_MESSAGE.format(context=context, a=x, b=y)
        ids = hf_tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        assert ids == pair.encode(c, x, y)
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0, -1, [A, B]].double().softmax(-1)[0]
    expected = torch.stack([0.5 + 0.5 * (p_first(c, x, y) - p_first(c, y, x)) for c, x, y in zip(convs, a, b)])
    got = pair.prob(convs, a, b)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got + pair.prob(convs, b, a), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_py_judge_error_writes_the_value_plainly(cli_runs):
    _, r, _ = cli_runs["py_judge_out_of_range"]
    assert ": returned 2.0, expected" in r.stderr, r.stderr


# ---- 5. raw prompts --------------------------------------------------------------------------------------------

def test_chat_template_none_keeps_prompts_raw(chat_world):
    w = chat_world
    raw = LMPolicy.load(w["lm"], chat_template="none")
    chat = LMPolicy.load(w["lm"])
    assert raw.chat_template is None and raw.eos_id == 0 and 0 in raw.eos_ids   # config.json's EOS
    for text in PROMPTS:
        ids = w["tok"].encode(text).ids
        assert ids[0] == 1 and ids[1:] == w["tok"].encode(text, add_special_tokens=False).ids   # BOS, then the text
        assert raw.prompt_ids(text) == raw.prompt_ids(conversation(text)) == ids == encode_prompt(raw.tokenizer, text)
        assert w["tok"].decode(ids) == text                  # the BOS is a special token: not in the text
        assert chat.prompt_ids(text) != ids
    s = raw.sample([PROMPTS[0]], 2, generator=torch.Generator().manual_seed(0))
    n = len(w["tok"].encode(PROMPTS[0]).ids)
    assert (s.attention_mask - s.response_mask).sum(1).tolist() == [n, n]       # the prompt part of each row
