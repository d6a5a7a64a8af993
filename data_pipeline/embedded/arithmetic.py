"""Arithmetic word problems answered step by step (mirrors Auto-CoT)."""

from __future__ import annotations

import random

NAMES = [
    "Ana",
    "Bilal",
    "Chen",
    "Dara",
    "Emeka",
    "Farah",
    "Goran",
    "Hana",
    "Ivo",
    "Jun",
    "Kemal",
    "Lena",
    "Mateo",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tomas",
    "Uma",
    "Viktor",
]
ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "pencils",
    "cookies",
    "shells",
    "coins",
    "stamps",
    "cards",
    "oranges",
    "balloons",
    "bricks",
    "seeds",
    "buttons",
    "ribbons",
]
PLACES = ["the market", "school", "the fair", "the library", "a garage sale", "the park"]


def _add(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 400), rng.randint(2, 400)
    q = (
        f"{name} has {a} {item}. At {rng.choice(PLACES)}, {name} gets {b} more {item}. "
        f"How many {item} does {name} have now?"
    )
    steps = [f"{name} starts with {a} {item}.", f"{name} gets {b} more, so we add: {a} + {b} = {a + b}."]
    return q, _answer(steps, a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    name, other, item = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    total = rng.randint(20, 900)
    given = rng.randint(1, total - 1)
    q = f"{name} had {total} {item} and gave {given} of them to {other}. How many {item} does {name} have left?"
    steps = [
        f"{name} had {total} {item}.",
        f"Giving away {given} means we subtract: {total} - {given} = {total - given}.",
    ]
    return q, _answer(steps, total - given)


def _multiply(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per = rng.randint(2, 30), rng.randint(2, 25)
    q = f"{name} buys {boxes} boxes of {item}. Each box holds {per} {item}. How many {item} does {name} buy in total?"
    steps = [
        f"There are {boxes} boxes.",
        f"Each box has {per} {item}, so we multiply: {boxes} x {per} = {boxes * per}.",
    ]
    return q, _answer(steps, boxes * per)


def _divide(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 12), rng.randint(2, 40)
    total = friends * each
    q = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    steps = [
        f"There are {total} {item} and {friends} friends.",
        f"Sharing equally means we divide: {total} / {friends} = {each}.",
    ]
    return q, _answer(steps, each)


def _two_step(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    packs, per, eaten = rng.randint(2, 15), rng.randint(3, 20), rng.randint(1, 20)
    total = packs * per
    eaten = min(eaten, total - 1)
    q = (
        f"{name} has {packs} packs of {item} with {per} {item} in each pack. "
        f"{name} then loses {eaten} {item}. How many {item} are left?"
    )
    steps = [
        f"First find the total: {packs} x {per} = {total}.",
        f"Then take away the lost ones: {total} - {eaten} = {total - eaten}.",
    ]
    return q, _answer(steps, total - eaten)


def _answer(steps: list[str], result: int) -> str:
    return "Let's think step by step.\n" + "\n".join(steps) + f"\nThe answer is {result}."


KINDS = [_add, _subtract, _multiply, _divide, _two_step]


def generate(rng: random.Random) -> tuple[str, str, str]:
    question, answer = rng.choice(KINDS)(rng)
    return question, "", answer
