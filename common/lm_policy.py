"""The language-model policy: a causal LM (common/model.py) with its tokenizer and chat template, behind the policy
interface of common/policy.py (sample, encode, logprobs, token_logprobs, distribution, frozen_copy, save)."""
import json
import os

import numpy as np
import torch
import torch.nn as nn

from common.arena import Game, Games
from common.chat import ChatError, ChatTemplate, conversation, encode_prompt, encode_response, load_tokenizer, \
    special_token_ids
from common.files import atomic_dir, read_json
from common.lora import LoRA
from common.losses import sequence_logprobs
from common.model import copy_model, from_pretrained, pad_rows
from common.policy import Samples
from common.sampler import generate


def pack(prompt_ids, response_ids, pad_id):
    """Left-pad prompts, right-pad responses: input_ids, attention_mask, response_mask, all (B, T) long.
    prompt_ids, response_ids: lists of B token-id lists (responses already end with EOS where they have one)."""
    p_ids, p_mask = pad_rows(prompt_ids, pad_id, left=True)
    r_ids, r_mask = pad_rows(response_ids, pad_id, left=False)
    resp = torch.cat([torch.zeros_like(p_mask), r_mask], 1)
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), resp


AUX_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


class LMPolicy(nn.Module):
    """A causal LM (common/model.py Transformer) + its tokenizer and chat template. ℓ(y|x) = Σ log π(token) over the
    answer tokens and EOS of prompt ids + encode(answer) + [EOS].

    Prompt ids: a Game (the arena) is encode(prompt), raw (the arena's layout, docs/arena.md). A chat prompt (a
    Conversation or a str, one user turn; common/chat.py) is rendered with the checkpoint's chat template and
    add_generation_prompt=True, then tokenized without special tokens; without a template it is its raw text.
    EOS: eos_ids holds every EOS id the checkpoint lists and the template's end-of-turn token; any of them ends a
    sampled response and is scored as part of it. eos_id, the one encode() appends, is the end-of-turn token when the
    template has one, else config.json's EOS.
    infer_batch: rows per generate() call (--infer-batch; None: all of a call's rows at once), which bounds the KV cache
    and the logits of sampling. lora: the policy's LoRA adapters (common/lora.py) on a frozen, shared `model`; then
    parameters() are the adapters alone, and None (adapters off) is the base model itself."""
    BUCKET_ROWS = 128  # rows per length bucket of logprobs() (see _scored)

    def __init__(self, model, tokenizer, eos_id, pad_id=None, max_new_tokens=32, eos_ids=None, chat_template=None,
                 files=None, generation_config=None, prompt_cache=None, infer_batch=None, lora=None):
        super().__init__()
        if eos_id is None:
            raise ValueError("LMPolicy needs an EOS id (config.json eos_token_id)")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.eos_ids = list(dict.fromkeys([eos_id] + list(eos_ids or [])))
        self.pad_id = eos_id if pad_id is None else pad_id
        self.max_new_tokens = max_new_tokens
        self.chat_template = chat_template          # common.chat.ChatTemplate or None (prompts stay raw)
        self.files = dict(files or {})              # name -> bytes, copied by save(): tokenizer_config.json, template…
        self.generation_config = dict(generation_config or {})   # the checkpoint's, rewritten by save()
        self.infer_batch = infer_batch
        self.lora = lora
        self._cand_cache = {}
        self._prompt_cache = {} if prompt_cache is None else prompt_cache

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32, max_new_tokens=None, chat_template="auto",
             infer_batch=None, lora_rank=0, lora_alpha=None, lora_targets=None) -> "LMPolicy":
        """From a HF-layout folder. chat_template: "auto" (the folder's own, None when it has none), "none" (raw
        prompts), or the path of a .jinja file (it is also what save() writes as chat_template.jinja). lora_rank > 0:
        the model is a frozen base in `dtype` with fresh LoRA adapters (fp32) as the trained parameters."""
        model = from_pretrained(path, device=device, dtype=dtype)
        lora = LoRA(model.requires_grad_(False), lora_rank, lora_alpha, lora_targets) if lora_rank else None
        tokenizer = load_tokenizer(path)
        ids = special_token_ids(path)
        files = {}
        for name in AUX_FILES:
            f = os.path.join(path, name)
            if os.path.isfile(f):
                with open(f, "rb") as fh:
                    files[name] = fh.read()
        if chat_template == "auto":
            template = ChatTemplate.load(path)
        elif chat_template == "none":
            template = None
        else:
            template = ChatTemplate.load(path, jinja_file=chat_template)
            files["chat_template.jinja"] = template.source.encode("utf-8")
        generation_config = read_json(os.path.join(path, "generation_config.json")) or {}
        if max_new_tokens is None:
            max_new_tokens = generation_config.get("max_new_tokens") or 32
        eos_id, eos_ids = ids["eos_id"], ids["eos_ids"]
        end_of_turn = template.end_of_turn(tokenizer) if template is not None else None
        if end_of_turn is not None:
            eos_id, eos_ids = end_of_turn, [end_of_turn] + eos_ids
        return cls(model, tokenizer, eos_id, ids["pad_id"], max_new_tokens, eos_ids, template, files,
                   generation_config, infer_batch=infer_batch, lora=lora)

    def parameters(self, recurse=True):
        """The trained parameters: the model's, or the LoRA adapters' alone (the base is frozen)."""
        return (self.model if self.lora is None else self.lora).parameters(recurse)

    @property
    def device(self):
        return self.model.lm_head_weight.device

    @staticmethod
    def _texts(prompts):
        """What a judge reads as the prompt: a Game's text; a chat prompt as it is (str or Conversation)."""
        return [p.prompt if isinstance(p, Game) else p for p in prompts]

    def prompt_ids(self, prompt) -> list:
        """Token ids of one prompt (class docstring), cached per distinct prompt."""
        key = ("game", prompt.id, prompt.prompt) if isinstance(prompt, Game) else conversation(prompt)
        ids = self._prompt_cache.get(key)
        if ids is None:
            if isinstance(prompt, Game):
                ids = encode_prompt(self.tokenizer, prompt.prompt)
            elif self.chat_template is not None:
                ids = self.chat_template.encode(self.tokenizer, key.as_dicts(), add_generation_prompt=True)
            elif len(key.messages) > 1:
                raise ChatError(f"a multi-turn prompt ({str(key)[:60]!r}) needs a chat template: the model has "
                                f"none, or --chat-template none was given")
            else:
                ids = encode_prompt(self.tokenizer, key.text)
            if len(ids) == 0:
                raise ValueError("LMPolicy: a prompt encodes to zero tokens (nothing to condition on)")
            self._prompt_cache[key] = ids
        return ids

    def _encode_prompts(self, prompts):
        return [self.prompt_ids(p) for p in prompts]

    def check_prompts(self, prompts):
        """Encode every prompt once (a template that fails to render raises here, before a run starts) and check
        that the longest one leaves room for max_new_tokens."""
        limit = self.model.config.max_position_embeddings
        longest = max(len(self.prompt_ids(p)) for p in prompts)
        if longest + self.max_new_tokens > limit:
            raise ValueError(f"a prompt of {longest} tokens + --max-new-tokens {self.max_new_tokens} exceeds the "
                             f"model's max_position_embeddings ({limit})")

    def _candidate_tokens(self, game) -> dict:
        """{tuple(encode(c_i) + [EOS]): i} for a game, cached."""
        key = (game.id, game.candidates)
        if key not in self._cand_cache:
            self._cand_cache[key] = {tuple(encode_response(self.tokenizer, c) + [self.eos_id]): i
                                     for i, c in enumerate(game.candidates)}
        return self._cand_cache[key]

    def _samples(self, prompts, prompt_ids, response_ids, texts):
        ids, attn, resp = pack(prompt_ids, response_ids, self.pad_id)
        game_ids, actions = [], []
        for p, r in zip(prompts, response_ids):  # a row is candidate i iff its tokens are encode(c_i) + [EOS]
            game_ids.append(p.id if isinstance(p, Game) else None)
            actions.append(self._candidate_tokens(p).get(tuple(r), -1) if isinstance(p, Game) else -1)
        dev = self.device
        return Samples(prompts=self._texts(prompts), texts=texts, game_ids=game_ids,
                       actions=torch.tensor(actions, dtype=torch.long), input_ids=ids.to(dev),
                       attention_mask=attn.to(dev), response_mask=resp.to(dev))

    @torch.no_grad()
    def sample(self, prompts, n, generator=None, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=None) -> Samples:
        """n responses per prompt with common/sampler.py (rows: prompt 0 n times, then prompt 1, …)."""
        prompts = [p for p in prompts for _ in range(n)]
        prompt_ids = self._encode_prompts(prompts)
        chunk = self.infer_batch or len(prompts)
        response_ids = []
        for s in range(0, len(prompts), chunk):     # infer_batch rows per call bounds the KV cache and the logits
            out, mask, _ = generate(self.model, prompt_ids[s:s + chunk], max_new_tokens or self.max_new_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k, eos_id=self.eos_ids,
                                    generator=generator, pad_id=self.pad_id, lora=self.lora)
            lengths = mask.sum(1).long().tolist()
            response_ids += [row[:k] for row, k in zip(out.tolist(), lengths)]  # EOS kept where generated
        eos = set(self.eos_ids)
        texts = [self.tokenizer.decode([t for t in r if t not in eos]) for r in response_ids]
        return self._samples(prompts, prompt_ids, response_ids, texts)   # generate() emits ≥ 1 token per row

    def encode(self, prompts, responses) -> Samples:
        """Samples for given texts: encode(prompt) + encode(response) + [EOS]."""
        prompt_ids = self._encode_prompts(prompts)
        response_ids = [encode_response(self.tokenizer, r) + [self.eos_id] for r in responses]
        return self._samples(list(prompts), prompt_ids, response_ids, list(responses))

    def _scored(self, samples: Samples):
        """(token log-probs (B, T), sums (B,)) of samples' response tokens, by common/losses.py, in length buckets.

        The rows are sorted by (prompt length, response length) and cut into chunks of BUCKET_ROWS; each chunk keeps
        only the columns some row of it attends to, so that the padding of a batch of ragged rows is mostly skipped.
        Results equal one padded pass up to float rounding, since padding is masked either way (tests/test_policy.py);
        they are bitwise reproducible."""
        dev = self.device
        ids, attn, resp = (x.to(dev) for x in (samples.input_ids, samples.attention_mask, samples.response_mask))
        B, T = ids.shape
        if B <= self.BUCKET_ROWS:
            return sequence_logprobs(self.model, ids, attn, resp, self.lora)
        on = attn.bool()
        pos = torch.arange(T, device=dev)
        first = torch.where(on, pos, T).min(1).values.cpu()                      # first attended column per row
        last = torch.where(on, pos, -1).max(1).values.cpu()                      # last attended column per row
        order = torch.argsort(((attn - resp).sum(1) * (T + 1) + resp.sum(1)).cpu(), stable=True)
        tok, tot = [], []
        for s in range(0, B, self.BUCKET_ROWS):
            r = order[s:s + self.BUCKET_ROWS]
            c0, c1 = int(first[r].min()), int(last[r].max()) + 1
            rd = r.to(dev)
            t_lp, s_lp = sequence_logprobs(self.model, ids[rd, c0:c1], attn[rd, c0:c1], resp[rd, c0:c1], self.lora)
            tok.append(torch.nn.functional.pad(t_lp, (c0, T - c1)))
            tot.append(s_lp)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(B)
        inverse = inverse.to(dev)
        return torch.cat(tok)[inverse], torch.cat(tot)[inverse]

    def logprobs(self, samples: Samples) -> torch.Tensor:
        """(B,) ℓ(y|x): summed log-probs of the response tokens (EOS included), common/losses.py."""
        return self._scored(samples)[1]

    def token_logprobs(self, samples: Samples) -> torch.Tensor:
        """(B, T) per-token log-probs of the response tokens (EOS included), 0 elsewhere (Samples.token_mask)."""
        return self._scored(samples)[0]

    @torch.no_grad()
    def distribution(self, games: Games, batch_size=256) -> list:
        """Exact π over each game's candidates + the invalid mass 1 − Σ (last entry), float64.

        π(y_i|x) = exp ℓ(encode(c_i) + [EOS] | x): every other token sequence — another tokenization of a
        candidate's text included — counts as invalid. Log-probs are float32 sums (losses.sequence_logprobs),
        so entries carry ~1e-7 relative error and the invalid mass ~1e-7 absolute; it is clipped at 0."""
        pairs = [(k, g, c) for k, g in enumerate(games) for c in g.candidates]
        logps = []
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            logps.append(self.logprobs(self.encode([g for _, g, _ in chunk], [c for _, _, c in chunk])).double().cpu())
        p = torch.cat(logps).exp().numpy()
        out, i = [], 0
        for g in games:
            q = p[i:i + g.n]
            i += g.n
            out.append(np.append(q, max(0.0, 1.0 - q.sum())))
        return out

    def response_stats(self, samples: Samples) -> dict:
        """Of sampled responses: mean length in tokens (EOS not counted), the fraction truncated (max_new_tokens reached
        without an EOS) and the fraction empty (no visible text)."""
        resp = samples.response_mask.bool().cpu()
        lengths = resp.sum(1)                                             # (B,) EOS included where generated
        start = int(resp.any(0).int().argmax())                           # responses start at one column (pack)
        last = samples.input_ids.cpu()[torch.arange(len(samples)), start + lengths - 1]
        ended = torch.isin(last, torch.tensor(self.eos_ids))
        return {"len": float((lengths - ended.long()).double().mean()),
                "truncated": float((~ended).double().mean()),
                "empty": sum(not t.strip() for t in samples.texts) / len(samples)}

    def frozen_copy(self, dtype=None, adapters=True) -> "LMPolicy":
        """A frozen copy (no grad) sharing the tokenizer and template: π_ref, an anchor, a second player. Full
        fine-tuning: a copy of the model, its Linear weights in `dtype` (common.model.copy_model: bf16 under
        --precision bf16, where it computes under autocast exactly what the fp32 policy does). LoRA: the same frozen
        base with a copy of the adapters, or with none (adapters=False: the base model, π_ref)."""
        if self.lora is not None:
            model, lora = self.model, self.lora.frozen_copy() if adapters else None
        else:
            model, lora = copy_model(self.model, dtype).requires_grad_(False).eval(), None
        return LMPolicy(model, self.tokenizer, self.eos_id, self.pad_id, self.max_new_tokens, self.eos_ids,
                        self.chat_template, self.files, self.generation_config, self._prompt_cache, self.infer_batch,
                        lora)

    def save_checkpoint(self, path):
        """A run's checkpoint of the policy: save(path), the complete HF folder (fp32 weights: exact); with LoRA the
        adapters alone (PEFT layout, fp32)."""
        if self.lora is None:
            return self.save(path)
        os.makedirs(path, exist_ok=True)
        self.lora.save(path)

    def load_checkpoint(self, path):
        """The weights of a save_checkpoint() folder into this policy (same architecture, device, dtype)."""
        if self.lora is not None:
            return self.lora.load(path)
        p = self.model.lm_head_weight
        with torch.no_grad():
            self.model.load_state_dict(from_pretrained(path, device=p.device, dtype=p.dtype).state_dict())

    def save(self, path):
        """A complete HF-layout checkpoint, written to a temporary folder and renamed into place: config.json +
        model.safetensors (common/model.py), tokenizer.json, the input folder's tokenizer_config.json and chat
        template files (a minimal tokenizer_config.json when it had none), and its generation_config.json with
        eos_token_id = every EOS id (end-of-turn included). transformers' AutoTokenizer / AutoModelForCausalLM load
        it and apply_chat_template works on it. With LoRA: the merged weights W + (α/r) B A, and the adapters in PEFT's
        layout in adapter/ (peft.PeftModel.from_pretrained(base, f"{path}/adapter") loads them; beside the merged
        weights, transformers would apply them a second time on load)."""
        def write(tmp):
            self.model.save_pretrained(tmp, None if self.lora is None else self.lora.merged_state_dict(self.model))
            if self.lora is not None:
                os.makedirs(os.path.join(tmp, "adapter"))
                self.lora.save(os.path.join(tmp, "adapter"))
            self.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            files = dict(self.files)
            if "tokenizer_config.json" not in files:
                tok = {"tokenizer_class": "PreTrainedTokenizerFast",
                       "eos_token": self.tokenizer.id_to_token(self.eos_id),
                       "pad_token": self.tokenizer.id_to_token(self.pad_id)}
                files["tokenizer_config.json"] = json.dumps(tok, indent=2).encode()
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            gc = dict(self.generation_config)
            gc.update(eos_token_id=self.eos_ids if len(self.eos_ids) > 1 else self.eos_id, pad_token_id=self.pad_id)
            if not self.generation_config:
                gc["max_new_tokens"] = self.max_new_tokens
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(gc, f, indent=2)
        atomic_dir(path, write)
