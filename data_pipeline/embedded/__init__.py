"""The embedded default corpus: five procedurally generated tasks mirroring the paper's five.

Nothing here is copied from a dataset: every example is built from small hand-written word
lists and templates, deterministically from a seed, so the demo and the tests run anywhere.
Each generator returns a list of `(instruction, input, output)` tuples.
"""

from __future__ import annotations

import hashlib
import random

from . import arithmetic, code, general, medical, retrieval

GENERATORS = {
    "arithmetic": arithmetic.generate,  # word problems with step-by-step reasoning (Auto-CoT)
    "code": code.generate,  # tiny Python functions from a description (CodeAlpaca)
    "medical": medical.generate,  # symptom description -> advice (iCliniq)
    "general": general.generate,  # general instruction QA (Dolly)
    "retrieval": retrieval.generate,  # answer read from given passages (WebGPT)
}


def generate(name: str, count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """`count` examples of generator `name`; the same (name, count, seed) gives the same list."""
    if name not in GENERATORS:
        raise ValueError(f"unknown embedded generator {name!r} (known: {sorted(GENERATORS)})")
    # Python's hash() is salted per process: derive the stream from a stable digest instead.
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    return [GENERATORS[name](rng) for _ in range(count)]
