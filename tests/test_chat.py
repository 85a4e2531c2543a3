"""Chat prompts and chat templates (common/chat.py), each checked against transformers' apply_chat_template.

Every model folder is built here: a byte-level BPE trained on a few sentences with the templates' special tokens,
saved as tokenizer.json + tokenizer_config.json, loaded both by transformers.AutoTokenizer and by ChatTemplate.load +
tokenizers.Tokenizer. Proven:
1. render() equals apply_chat_template(tokenize=False) and encode() equals apply_chat_template(tokenize=True) for
   ChatML (Qwen-style, no default system prompt), ChatML with SmolLM2's default system prompt, Llama-3 and Mistral
   [INST] templates, on single-turn, multi-turn and system conversations, with and without the generation prompt;
   where Mistral's template raises (roles that do not alternate, a system message) transformers raises and we raise a
   one-line ChatError. The template is found where transformers finds it: chat_template.jinja before
   tokenizer_config.json, whose "chat_template" is a string or named templates ("default"); no template -> None. The
   special tokens come from tokenizer_config.json and special_tokens_map.json as transformers takes them.
2. encode() writes one BOS where the tokenizer's post-processor would add a second one, as transformers does.
3. end_of_turn() is <|im_end|>, <|eot_id|> and </s> for those templates, None for a template writing no special token.
4. Malformed prompts files and templates raise a one-line ChatError naming the file (and line).
5. read_prompts() parses a mixed file into the expected Conversations, which render as transformers renders them.
"""
import json
import os

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from common.chat import ChatError, ChatTemplate, read_prompts

transformers = pytest.importorskip("transformers")

# Laid out over lines, with indented block tags, so that trim_blocks and lstrip_blocks decide the whitespace.
CHATML = """\
{% for message in messages %}
    {% if message['role'] == 'system' and not loop.first %}
{{ raise_exception('The system message must come first.') }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
          "+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
PLAIN = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")


def added_token(content):
    """A special token as older tokenizer_config.json files write it."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


# name -> (template, tokenizer_config.json special tokens, the token that ends an assistant turn)
TEMPLATES = {
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>"),
    "smollm2": (SMOLLM2, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                          "pad_token": "<|im_end|>"}, "<|im_end|>"),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "<|eot_id|>"),
    "mistral": (MISTRAL, {"bos_token": added_token("<s>"), "eos_token": added_token("</s>"),
                          "unk_token": added_token("<unk>")}, "</s>"),
}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                  "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "You are a helpful assistant, answer briefly.",
             "What is the capital of France? Paris is the capital of France.", "And of Italy? Rome, of course!"]


def user(text):
    return {"role": "user", "content": text}


SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CONVERSATIONS = {
    "single": [user("What is the capital of France?")],
    "multi": [user("What is the capital of France?"), {"role": "assistant", "content": "  Paris. \n"},
              user("And of Italy? <b>é</b>\n")],
    "system": [SYSTEM, user("What is the capital of France?")],
}


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE knowing every template's special tokens (special added tokens, as in real checkpoints)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def model_folder(path, tokenizer, special, chat_template=None, jinja=None, special_tokens_map=None):
    """A model folder: tokenizer.json, tokenizer_config.json with `special` (and "chat_template" when given),
    chat_template.jinja and special_tokens_map.json when given."""
    os.makedirs(path)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    if chat_template is not None:
        config["chat_template"] = chat_template
    files = {"tokenizer_config.json": json.dumps(config), "chat_template.jinja": jinja,
             "special_tokens_map.json": None if special_tokens_map is None else json.dumps(special_tokens_map)}
    for name, text in files.items():
        if text is not None:
            with open(os.path.join(path, name), "w", encoding="utf-8") as f:
                f.write(text)
    return str(path)


def load(folder):
    """(transformers' tokenizer, our ChatTemplate, the tokenizers.Tokenizer) of a model folder."""
    return (transformers.AutoTokenizer.from_pretrained(folder), ChatTemplate.load(folder),
            Tokenizer.from_file(os.path.join(folder, "tokenizer.json")))


def hf_render(hf, messages, add_generation_prompt=True):
    return hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def hf_ids(hf, messages, add_generation_prompt=True):
    return hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                  return_dict=False)


def one_line(excinfo, *fragments):
    """The ChatError's message is one line and contains each fragment."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.fixture(scope="module")
def loaded(bpe, tmp_path_factory):
    """name -> load() of a folder holding TEMPLATES[name] as tokenizer_config.json "chat_template"."""
    root = tmp_path_factory.mktemp("models")
    return {name: load(model_folder(root / name, bpe, special, template))
            for name, (template, special, _) in TEMPLATES.items()}


RENDERED = [(name, conv) for name in TEMPLATES for conv in CONVERSATIONS if (name, conv) != ("mistral", "system")]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name, conv", RENDERED)
def test_render_and_encode_equal_transformers(loaded, name, conv, add_generation_prompt):
    hf, tmpl, tok = loaded[name]
    messages = CONVERSATIONS[conv]
    text = tmpl.render(messages, add_generation_prompt)
    assert text == hf_render(hf, messages, add_generation_prompt)
    assert messages[-1]["content"].strip() in text
    assert tmpl.encode(tok, messages, add_generation_prompt) == hf_ids(hf, messages, add_generation_prompt)


@pytest.mark.parametrize("messages", [[user("Hi"), user("Hello?")], [SYSTEM, user("Hi")]],
                         ids=["not-alternating", "system"])
def test_mistral_refusals_raise_a_one_line_chat_error(loaded, messages):
    hf, tmpl, _ = loaded["mistral"]
    with pytest.raises(jinja2.TemplateError) as theirs:
        hf_render(hf, messages)
    with pytest.raises(ChatError) as ours:
        tmpl.render(messages)
    one_line(ours, "tokenizer_config.json", str(theirs.value))


@pytest.mark.parametrize("place", ["jinja", "config", "named"])
def test_template_is_found_where_transformers_finds_it(bpe, tmp_path, place):
    """chat_template.jinja wins over tokenizer_config.json; a list of named templates gives the "default" one."""
    special = TEMPLATES["chatml"][1]
    config_template = {"jinja": LLAMA3, "config": CHATML,
                       "named": [{"name": "tool_use", "template": LLAMA3}, {"name": "default", "template": CHATML}]}
    folder = model_folder(tmp_path / "m", bpe, special, config_template[place],
                          jinja=CHATML if place == "jinja" else None)
    hf, tmpl, tok = load(folder)
    expected_file = "chat_template.jinja" if place == "jinja" else "tokenizer_config.json"
    assert tmpl.where == os.path.join(folder, expected_file)
    for messages in CONVERSATIONS.values():
        assert tmpl.render(messages) == hf_render(hf, messages)
        assert tmpl.encode(tok, messages) == hf_ids(hf, messages)


def test_folder_without_template_loads_as_none(bpe, tmp_path):
    folder = model_folder(tmp_path / "m", bpe, TEMPLATES["llama3"][1])
    assert ChatTemplate.load(folder) is None
    assert transformers.AutoTokenizer.from_pretrained(folder).chat_template is None


@pytest.mark.parametrize("config, special_tokens_map", [
    ({}, {"bos_token": "<|begin_of_text|>", "eos_token": added_token("<|end_of_text|>")}),
    # a tokenizer_config.json without "added_tokens_decoder" is a legacy one: special_tokens_map.json overrides it
    ({"bos_token": "<s>", "eos_token": "</s>"}, {"bos_token": "<|begin_of_text|>"}),
    # with "added_tokens_decoder", transformers does not read special_tokens_map.json at all
    ({"bos_token": "<s>", "added_tokens_decoder": {"1": {"content": "<s>", "special": True}}},
     {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
], ids=["map-only", "map-overrides-legacy-config", "map-ignored"])
def test_special_tokens_are_those_transformers_gives_the_template(bpe, tmp_path, config, special_tokens_map):
    template = "{{ bos_token }}|{{ eos_token }}|" + CHATML
    folder = model_folder(tmp_path / "m", bpe, config, template, special_tokens_map=special_tokens_map)
    hf, tmpl, tok = load(folder)
    messages = CONVERSATIONS["multi"]
    assert tmpl.render(messages) == hf_render(hf, messages)
    assert tmpl.encode(tok, messages) == hf_ids(hf, messages)


def test_encode_writes_one_bos_where_the_post_processor_adds_one(bpe, tmp_path):
    tok = Tokenizer.from_str(bpe.to_str())
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    template, special, _ = TEMPLATES["llama3"]
    hf, tmpl, tok = load(model_folder(tmp_path / "m", tok, special, template))
    messages = CONVERSATIONS["multi"]
    assert tok.encode(tmpl.render(messages)).ids.count(bos) == 2   # the post-processor is there and would double it
    ids = tmpl.encode(tok, messages)
    assert ids == hf_ids(hf, messages)
    assert ids.count(bos) == 1 and ids[0] == bos


@pytest.mark.parametrize("name", TEMPLATES)
def test_end_of_turn_is_the_templates_turn_end_token(loaded, name):
    hf, tmpl, tok = loaded[name]
    token = TEMPLATES[name][2]
    assert tmpl.end_of_turn(tok) == tok.token_to_id(token) == hf.convert_tokens_to_ids(token)


def test_end_of_turn_is_none_without_a_special_token_after_the_answer(bpe, tmp_path):
    hf, tmpl, tok = load(model_folder(tmp_path / "m", bpe, TEMPLATES["llama3"][1], PLAIN))
    messages = CONVERSATIONS["multi"]
    assert tmpl.render(messages) == hf_render(hf, messages)
    assert tmpl.end_of_turn(tok) is None


GOOD_LINE = json.dumps({"prompt": "Name a colour."})


@pytest.mark.parametrize("bad_line, fragment", [
    ('{"text": "hi"}', 'expected {"prompt"'),
    ('{"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}', 'expected {"prompt"'),
    ('{"prompt": "hi"', "not a JSON object"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
     "the last message must be the user's"),
], ids=["neither", "both", "invalid-json", "unknown-role", "last-not-user"])
def test_bad_prompts_line_names_file_and_line(tmp_path, bad_line, fragment):
    path = tmp_path / "prompts.jsonl"
    path.write_text(f"{GOOD_LINE}\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ChatError) as e:
        read_prompts(str(path))
    one_line(e, f"{path}:3", fragment)


@pytest.mark.parametrize("text, fragment", [(None, "file not found"), ("", "no prompts"), ("\n  \n", "no prompts")],
                         ids=["missing", "empty", "blank"])
def test_missing_or_empty_prompts_file(tmp_path, text, fragment):
    path = tmp_path / "prompts.jsonl"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ChatError) as e:
        read_prompts(str(path))
    one_line(e, str(path), fragment)


def test_template_syntax_error_names_the_template_file(bpe, tmp_path):
    broken = "{% for message in messages %}\n{{ message['content'] }}\n"   # no endfor
    folder = model_folder(tmp_path / "m", bpe, TEMPLATES["chatml"][1], jinja=broken)
    with pytest.raises(jinja2.TemplateSyntaxError):
        hf_render(transformers.AutoTokenizer.from_pretrained(folder), CONVERSATIONS["single"])
    with pytest.raises(ChatError) as e:
        ChatTemplate.load(folder)
    one_line(e, os.path.join(folder, "chat_template.jinja"), "does not compile")
    with pytest.raises(ChatError) as e:
        ChatTemplate(broken, where="broken.jinja")
    one_line(e, "broken.jinja", "does not compile")


def test_read_prompts_parses_a_mixed_file(loaded, tmp_path):
    multi_turn = [SYSTEM, *CONVERSATIONS["multi"]]
    path = tmp_path / "prompts.jsonl"
    path.write_text(f"{GOOD_LINE}\n\n{json.dumps({'messages': multi_turn})}\n   \n", encoding="utf-8")
    convs = read_prompts(str(path))
    assert [c.as_dicts() for c in convs] == [[user("Name a colour.")], multi_turn]
    assert [c.text for c in convs] == ["Name a colour.", multi_turn[-1]["content"]]
    hf, tmpl, tok = loaded["smollm2"]
    for c in convs:
        assert tmpl.render(c.as_dicts()) == hf_render(hf, c.as_dicts())


def test_shipped_chat_prompts_parse():
    """data/chat/ (the README's CPU recipe): the training prompts (one multi-turn line) and the held-out prompts parse,
    and no held-out prompt is a training prompt."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "chat")
    train = read_prompts(os.path.join(root, "prompts.jsonl"))
    held_out = read_prompts(os.path.join(root, "eval_prompts.jsonl"))
    assert any(len(c.messages) > 1 for c in train) and all(len(c.messages) == 1 for c in held_out)
    assert not set(train) & set(held_out)
