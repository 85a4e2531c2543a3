"""Text in, token ids out: the tokenizer and its special tokens, chat templates, prompt files.

    convs = read_prompts("prompts.jsonl")         # one {"prompt": "user text"} or {"messages": [...]} per line
    tmpl = ChatTemplate.load("model_dir")         # the folder's own template, or None when it has none
    ids = tmpl.encode(load_tokenizer("model_dir"), convs[0].as_dicts(), add_generation_prompt=True)

A template renders a conversation exactly as transformers' apply_chat_template(..., tokenize=False) does, and the
text is tokenized without special tokens (the template wrote them); its end-of-turn token ends a response
(end_of_turn()). Details: docs/internals.md, "Chat templates and special tokens"; parity: tests/test_chat.py.
"""
import json
import os
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from common.files import read_json

ROLES = ("system", "user", "assistant", "tool")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatError(ValueError):
    """A malformed prompt or a template that does not render: one line naming what was wrong."""


def one_line(msg: str) -> str:
    """A message on one line (an error from user code may span several)."""
    return " ".join(msg.split("\n"))


@dataclass(frozen=True)
class Conversation:
    """A prompt as a conversation: ((role, content), …), ending with a user turn. Hashable, so judges can key on it."""
    messages: tuple

    def as_dicts(self) -> list:
        """The messages as transformers takes them: [{"role": …, "content": …}, …] (a fresh list)."""
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def text(self) -> str:
        """The last user turn: what a policy without a chat template reads for a single-turn prompt."""
        return self.messages[-1][1]

    def __str__(self):
        return self.text if len(self.messages) == 1 else " | ".join(f"{r}: {c}" for r, c in self.messages)


def conversation(obj, where="prompt") -> Conversation:
    """A Conversation from a plain string (one user turn), a Conversation, or a list of {"role", "content"} dicts.
    Roles must be in ROLES, contents strings, the last turn a user's (the policy writes the next, assistant turn)."""
    if isinstance(obj, Conversation):
        return obj
    if isinstance(obj, str):
        if not obj:
            raise ChatError(f"{where}: empty prompt")
        return Conversation((("user", obj),))
    if not isinstance(obj, (list, tuple)) or not obj:
        raise ChatError(f"{where}: expected a non-empty list of messages")
    msgs = []
    for k, m in enumerate(obj):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatError(f'{where}: message {k}: expected {{"role": "...", "content": "..."}}')
        if m["role"] not in ROLES:
            raise ChatError(f"{where}: message {k}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        msgs.append((m["role"], m["content"]))
    if msgs[-1][0] != "user":
        raise ChatError(f"{where}: the last message must be the user's (the policy answers it), got {msgs[-1][0]!r}")
    if not msgs[-1][1]:
        raise ChatError(f"{where}: the last user message is empty")
    return Conversation(tuple(msgs))


def read_prompts(path, flag="--prompts") -> list:
    """A .jsonl file, one {"prompt": "user text"} or {"messages": [{"role", "content"}, …]} per line (blank lines
    skipped) -> list of Conversation. Any malformed line raises ChatError naming the file and line."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except FileNotFoundError:
        raise ChatError(f"{flag} {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"{flag} {path}: cannot be read ({e})") from None
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{k}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ChatError(f"{where}: not a JSON object") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
            raise ChatError(f'{where}: expected {{"prompt": "user text"}} or {{"messages": [...]}}')
        if "prompt" in obj and not (isinstance(obj["prompt"], str) and obj["prompt"]):
            raise ChatError(f'{where}: "prompt" must be a non-empty string')
        out.append(conversation(obj.get("prompt", obj.get("messages")), where))
    if not out:
        raise ChatError(f"{flag} {path}: no prompts")
    return out


def _token_str(v):
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict {"content": …}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


# ---- the tokenizer and its special tokens -------------------------------------------------------------------

def load_tokenizer(path):
    """tokenizers.Tokenizer from `path`/tokenizer.json (no transformers needed)."""
    f = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f}: not found")
    return Tokenizer.from_file(f)


def special_tokens(path) -> dict:
    """The special tokens of model folder `path` as strings ({"bos_token": "<s>", "eos_token": …, …}), as
    transformers hands them to a chat template: tokenizer_config.json's, which special_tokens_map.json overrides where
    the config has no "added_tokens_decoder" (a legacy config), plus transformers 5's "extra_special_tokens"."""
    tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
    special = {k: _token_str(v) for k, v in tok_cfg.items() if k in SPECIAL_KEYS or k.endswith("_token")}
    if "added_tokens_decoder" not in tok_cfg:
        for k, v in (read_json(os.path.join(path, "special_tokens_map.json")) or {}).items():
            if k in SPECIAL_KEYS:
                special[k] = _token_str(v)
    extra = tok_cfg.get("extra_special_tokens")
    if isinstance(extra, dict):
        special.update({k: _token_str(v) for k, v in extra.items() if k not in special})
    return {k: v for k, v in special.items() if v is not None}


def special_token_ids(path) -> dict:
    """eos_id / pad_id / bos_id from config.json, then generation_config.json, then the special token strings
    (special_tokens(), resolved through tokenizer.json). eos_id is config.json's (the first when it gives a list);
    eos_ids is every EOS id that config.json and generation_config.json list (instruct checkpoints often list their
    end-of-turn token in one of them only), eos_id first. pad_id falls back to eos_id."""
    ids = {"eos_id": None, "pad_id": None, "bos_id": None, "eos_ids": []}
    for src in (read_json(os.path.join(path, "config.json")) or {},
                read_json(os.path.join(path, "generation_config.json")) or {}):
        for key, name in (("eos_token_id", "eos_id"), ("pad_token_id", "pad_id"), ("bos_token_id", "bos_id")):
            v = src.get(key)
            if v is None:
                continue
            if key == "eos_token_id":
                listed = list(v) if isinstance(v, list) else [v]
                ids["eos_ids"] += [e for e in listed if e not in ids["eos_ids"]]
                v = listed[0] if listed else None
            if ids[name] is None:
                ids[name] = v
    tok = load_tokenizer(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    strings = special_tokens(path)
    for key, name in (("eos_token", "eos_id"), ("pad_token", "pad_id"), ("bos_token", "bos_id")):
        if ids[name] is None and tok is not None and key in strings:
            ids[name] = tok.token_to_id(strings[key])
    if not ids["eos_ids"] and ids["eos_id"] is not None:
        ids["eos_ids"] = [ids["eos_id"]]
    if ids["pad_id"] is None:
        ids["pad_id"] = ids["eos_id"]
    return ids


def encode_prompt(tokenizer, prompt: str) -> list:
    """A raw prompt (the arena's layout): tokenized with the tokenizer's own special tokens (e.g. a BOS from its
    post-processor)."""
    return tokenizer.encode(prompt).ids


def encode_response(tokenizer, response: str) -> list:
    """An answer tokenized on its own, no special tokens (EOS is appended by the caller)."""
    return tokenizer.encode(response, add_special_tokens=False).ids


class ChatTemplate:
    """A checkpoint's chat template, compiled once: render() returns what apply_chat_template(tokenize=False) does."""

    def __init__(self, source: str, special_tokens: dict = None, where: str = "chat template"):
        self.source, self.where = source, where
        self.special_tokens = dict(special_tokens or {})

        class Generation(jinja2.ext.Extension):
            """{% generation %}…{% endgeneration %} (transformers' assistant-mask marker): renders its body."""
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(one_line(f"{where}: the chat template does not compile (line {e.lineno}: {e})")) \
                from None

    @classmethod
    def load(cls, path, jinja_file=None) -> "ChatTemplate | None":
        """The template of model folder `path` (module docstring for where it is looked up), or None. jinja_file: a
        template file to use instead of the folder's own (the folder still gives the special tokens)."""
        tok_cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        special = special_tokens(path)
        if jinja_file is None:
            jinja_file = os.path.join(path, "chat_template.jinja")
        elif not os.path.isfile(jinja_file):
            raise ChatError(f"--chat-template {jinja_file}: file not found (expected auto, none or a .jinja file)")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                return cls(f.read(), special, jinja_file)
        where = os.path.join(path, "tokenizer_config.json")
        source = tok_cfg.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": …}, …]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            if "default" not in named:
                raise ChatError(f"{where}: several chat templates and none named 'default' ({sorted(named)})")
            source = named["default"]
        if source is None:
            return None
        if not isinstance(source, str):
            raise ChatError(f"{where}: chat_template must be a string")
        return cls(source, special, where)

    def render(self, messages: list, add_generation_prompt: bool = True) -> str:
        """The conversation as text, exactly as apply_chat_template(messages, add_generation_prompt, tokenize=False)."""
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(one_line(f"{self.where}: the chat template failed to render a conversation of roles "
                                      f"{[m['role'] for m in messages]} ({e})")) from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
            raise ChatError(one_line(f"{self.where}: the chat template failed to render "
                                      f"({type(e).__name__}: {e})")) from None

    def encode(self, tokenizer, messages: list, add_generation_prompt: bool = True) -> list:
        """Token ids of render(): tokenized without the tokenizer's own special tokens (the template wrote them)."""
        return tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False).ids

    def end_of_turn(self, tokenizer) -> int | None:
        """Id of the token that ends an assistant turn: the first special (added) token that the template writes after
        an assistant message's content; None when it writes none (then the checkpoint's EOS alone ends a response)."""
        marker = "\x00nanonash-turn-end\x00"
        try:
            text = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                               add_generation_prompt=False)
        except ChatError:
            return None
        tail = text.split(marker, 1)[1] if marker in text else ""
        specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        ids = tokenizer.encode(tail, add_special_tokens=False).ids
        for i in ids:
            if tokenizer.id_to_token(i) in specials:
                return i
        return None
