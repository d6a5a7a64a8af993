"""Prompt(s) in, completions out: a quick look at what a trained model does.

    python launch/generate.py --run-dir runs/default "Add 17 and 25." "Write a function that reverses a string."
    python launch/generate.py --backbone PATH --adapter DIR --input "What is HyCAM?" --max-new-tokens 128
    echo "one prompt per line" | python launch/generate.py --run-dir runs/default -

Each prompt is an instruction (optionally `--input` context) formatted the way the run's data
was built: with --run-dir, the template its data manifest records (alpaca or the tokenizer's chat
template, with its system prompt); otherwise --template (default alpaca) and --system-prompt.
Generation stops at EOS or the chat template's end-of-turn token; it is greedy with the KV cache
and deterministic routing unless --sample. The model runs in --dtype on --device (auto: bf16 on
a GPU that supports it, else fp32 on CPU).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline import TEMPLATES, PromptFormat, load_manifest, manifest_template, prompt_format
from hycam_ds.engine.cli import Parser, UsageError, run_main
from hycam_ds.engine.run_dir import RunDir
from hycam_ds.eval.loading import load_model
from hycam_ds.eval.precision import add_placement_arguments, placement
from hycam_ds.eval.recipe import model_spec


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default=None,
        help="prompt format without --run-dir (default alpaca); a run's data decides its own",
    )
    parser.add_argument(
        "--system-prompt", default=None, help="system turn of --template chat (default: the template's)"
    )
    add_placement_arguments(parser, zero3=False)
    return parser.parse_args(argv)


@dataclass
class Prompting:
    """How prompts become token ids: the data's format and whether its documents start with an added BOS."""

    fmt: PromptFormat
    add_bos: bool = True

    def ids(self, tokenizer, text: str) -> list[int]:
        """Token ids of a rendered prompt, as the build put them in front of the response."""
        if self.fmt.name == "alpaca":
            return tokenizer.encode(text, add_special_tokens=True)
        # chat: the build adds BOS itself (unless the template wrote it into the text), never twice
        bos = self.fmt.document_bos(tokenizer, self.add_bos)
        return ([bos] if bos is not None else []) + tokenizer.encode(text, add_special_tokens=False)

    def stop_ids(self, tokenizer) -> list[int]:
        return sorted({i for i in (tokenizer.eos_token_id, self.fmt.end_of_turn_id) if i is not None})


def run_template(run_dir: Path) -> tuple[dict, bool]:
    """The run's data template entry and add_bos, from run_info.json and the data manifest (alpaca
    when neither records a template, or the data directory is gone)."""
    info = RunDir(run_dir).read_info()
    data_dir = Path(info.data_dir)
    manifest = load_manifest(data_dir) if info.data_dir and (data_dir / "manifest.json").is_file() else None
    template = info.template or (manifest_template(manifest) if manifest else {"name": "alpaca"})
    add_bos = manifest["recipe"]["tokenizer"].get("add_bos", True) if manifest else True
    return template, add_bos


def prompting(args, tokenizer) -> Prompting:
    """The format of --run-dir's data, or of --template / --system-prompt."""
    if not args.run_dir:
        return Prompting(prompt_format(args.template or "alpaca", tokenizer, args.system_prompt))
    template, add_bos = run_template(Path(args.run_dir))
    if args.template not in (None, template["name"]):
        raise UsageError(
            f"--template {args.template}, but the run {args.run_dir} trained on {template['name']} prompts"
        )
    return Prompting(prompt_format(template["name"], tokenizer, template.get("system_prompt")), add_bos)


def load(args):
    if not (args.run_dir or args.backbone or args.backbone_name):
        raise UsageError("give --run-dir, --backbone or --backbone-name (with --tokenizer)")
    if args.backbone_name and not (args.run_dir or args.backbone or args.tokenizer):
        raise UsageError(f"--backbone-name {args.backbone_name} is built in code: give its --tokenizer")
    device, dtype = placement(args.dtype, args.device, zero3=False)
    spec, _, tokenizer = model_spec(
        args.run_dir,
        backbone=args.backbone,
        backbone_name=args.backbone_name,
        backbone_seed=args.backbone_seed,
        adapter=args.adapter,
        tokenizer=args.tokenizer,
    )
    model, _ = load_model(spec, dtype, device=device)
    return model, tokenizer


def complete(model, tokenizer, ids: list[int], stops: list[int], args) -> str:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64, device=device),
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=0.8 if args.sample else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops,
        )
    return tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    return run_main("generate.py", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    if args.run_dir is not None and not Path(args.run_dir).is_dir():
        raise UsageError(f"--run-dir {args.run_dir}: no such directory")
    prompts = [line.strip() for p in args.prompts for line in (sys.stdin if p == "-" else [p]) if line.strip()]
    if not prompts:
        raise UsageError("give at least one prompt")
    model, tokenizer = load(args)
    how = prompting(args, tokenizer)  # BuildError: e.g. --template chat with a tokenizer without a chat template
    for prompt in prompts:
        text = prompt if args.raw else how.fmt.prompt(prompt, args.input)
        ids = tokenizer.encode(text, add_special_tokens=True) if args.raw else how.ids(tokenizer, text)
        print(f">>> {prompt}\n{complete(model, tokenizer, ids, how.stop_ids(tokenizer), args)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
