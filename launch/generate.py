"""Prompt(s) in, completions out: a quick look at what a trained model does.

    python launch/generate.py --run-dir runs/default "Add 17 and 25." "Write a function that reverses a string."
    python launch/generate.py --backbone PATH --adapter DIR --input "What is HyCAM?" --max-new-tokens 128
    echo "one prompt per line" | python launch/generate.py --run-dir runs/default -

Each prompt is an instruction (optionally `--input` context) formatted with the training
template; generation is greedy with the KV cache and deterministic routing unless --sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hycam_ds.inference import ModelSpec, load_model


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="instructions; '-' reads one per line from stdin")
    parser.add_argument("--run-dir", help="a launch/train.py run directory")
    parser.add_argument("--backbone", help="Hugging Face backbone directory or hub id")
    parser.add_argument("--backbone-name", help="or a backbone built in code, with --tokenizer")
    parser.add_argument("--backbone-seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the backbone's)")
    parser.add_argument("--adapter", help="HyCAM or PEFT LoRA adapter directory")
    parser.add_argument("--input", default="", help="context given to every instruction")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.8) instead of greedy decoding")
    parser.add_argument("--raw", action="store_true", help="use the prompts as they are, without the template")
    return parser.parse_args(argv)


def load(args):
    from data_pipeline import load_tokenizer

    if args.run_dir:
        import json

        info = json.loads((Path(args.run_dir) / "run_info.json").read_text())
        tokenizer = load_tokenizer(info["tokenizer"])
        spec = ModelSpec.from_run_dir(Path(args.run_dir), len(tokenizer))
    else:
        tokenizer = load_tokenizer(args.tokenizer or args.backbone)
        spec = ModelSpec(backbone_path=args.backbone, backbone_name=args.backbone_name, backbone_seed=args.backbone_seed,
                         vocab_size=len(tokenizer), adapter=args.adapter)
    model, _ = load_model(spec)
    return model, tokenizer


def complete(model, tokenizer, prompt_text: str, args) -> str:
    ids = tokenizer.encode(prompt_text, add_special_tokens=True)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                             max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=0.8 if args.sample else None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    from data_pipeline import format_prompt

    args = parse_args(sys.argv[1:] if argv is None else argv)
    prompts = [line.strip() for p in args.prompts for line in (sys.stdin if p == "-" else [p]) if line.strip()]
    if not prompts:
        sys.exit("generate.py: give at least one prompt")
    model, tokenizer = load(args)
    for prompt in prompts:
        text = prompt if args.raw else format_prompt(prompt, args.input)
        print(f">>> {prompt}\n{complete(model, tokenizer, text, args)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
