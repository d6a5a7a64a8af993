"""`python -m data_pipeline build|verify ...`: thin CLI over `build_dataset` and `verify`.

A mistake (a bad recipe or option, a missing or unreadable file, an `--out` the build must not
replace, a tokenizer without a vocabulary, data that builds nothing) is one line on stderr,
`data_pipeline: <message naming the file or field>`, and exit status 2; argparse's own errors
are one line too. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from .build import build_dataset
from .config import BuildConfig
from .examples import BuildError, one_line
from .pretrained import PretrainedRefError
from .shards import load_manifest, verify
from .template import TEMPLATES
from .typed_config import TypedConfigError

PROG = "data_pipeline"
USAGE_ERROR = 2
USER_ERRORS = (BuildError, TypedConfigError, PretrainedRefError, OSError)
"""The project's error types and the file system's: the user's mistake or the machine's state,
whose message is the whole story."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{PROG}: {message} (see {self.prog} --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog="python -m data_pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build packed token shards from a recipe")
    b.add_argument("--recipe", required=True)
    b.add_argument(
        "--out",
        required=True,
        help="output directory: new, empty, or a previous build (which it replaces); never one holding other files",
    )
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
    try:
        return run_verify(args.dir) if args.command == "verify" else run_build(args)
    except USER_ERRORS as err:
        print(f"{PROG}: {one_line(err)}", file=sys.stderr)
        return USAGE_ERROR


def run_verify(directory: str) -> int:
    try:
        problems = verify(directory)
    except ValueError as err:  # not a build, or its manifest was edited
        print(f"{PROG}: verify: {one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    for problem in problems:
        print(f"DAMAGED {problem}", file=sys.stderr)
    print(f"verify {directory}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def run_build(args: argparse.Namespace) -> int:
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
    out = build_dataset(cfg)
    manifest = load_manifest(out)
    summary = {
        s: {k: v[k] for k in ("sequences", "tokens", "packing_efficiency")} for s, v in manifest["splits"].items()
    }
    print(json.dumps({"out": out, "bad_rows": manifest["bad_rows"]["count"], "splits": summary}, indent=1))
    fractions = manifest["recipe"]["splits"]
    for split, info in manifest["splits"].items():
        if fractions.get(split, 0) > 0 and not info["sequences"]:
            warning = f"split {split} (fraction {fractions[split]}) is empty: too few examples"
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
