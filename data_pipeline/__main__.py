"""`python -m data_pipeline build|verify ...`: thin CLI over `build_dataset` and `verify`."""

from __future__ import annotations

import argparse
import json
import sys

from .build import build_dataset
from .config import BuildConfig
from .examples import BuildError
from .shards import load_manifest, verify
from .template import TEMPLATES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build packed token shards from a recipe")
    b.add_argument("--recipe", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--data-root", default=None, help="directory the recipe's paths are relative to")
    tok = b.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer directory to use")
    tok.add_argument("--train-tokenizer", action="store_true", help="train a SentencePiece tokenizer here")
    b.add_argument("--vocab-size", type=int, default=None)
    b.add_argument("--seq-len", type=int, default=None)
    b.add_argument("--overlong", choices=("truncate", "drop"), default=None)
    b.add_argument(
        "--template",
        choices=TEMPLATES,
        default=None,
        help="prompt format: alpaca (the paper's) or chat (the tokenizer's chat template); default: the recipe's",
    )
    b.add_argument("--workers", type=int, default=1)
    b.add_argument("--strict", action="store_true", help="stop at the first bad row")
    b.add_argument("--no-progress", action="store_true")
    v = sub.add_parser("verify", help="re-check every checksum of a build")
    v.add_argument("dir")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "verify":
        try:
            problems = verify(args.dir)
        except ValueError as err:
            print(f"verify: {err}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"DAMAGED {problem}", file=sys.stderr)
        print(f"verify {args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    cfg = BuildConfig(
        recipe=args.recipe,
        out=args.out,
        data_root=args.data_root,
        tokenizer=args.tokenizer,
        train_tokenizer=args.train_tokenizer,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        workers=args.workers,
        strict=args.strict,
        overlong=args.overlong,
        template=args.template,
        progress=not args.no_progress,
    )
    try:
        out = build_dataset(cfg)
    except BuildError as err:
        print(f"build failed: {err}", file=sys.stderr)
        return 2
    manifest = load_manifest(out)
    summary = {
        s: {k: v[k] for k in ("sequences", "tokens", "packing_efficiency")} for s, v in manifest["splits"].items()
    }
    print(json.dumps({"out": out, "bad_rows": manifest["bad_rows"]["count"], "splits": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
