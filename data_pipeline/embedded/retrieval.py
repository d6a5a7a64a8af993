"""Questions answered from given passages about invented places (mirrors WebGPT).

Facts are invented per example, so the only way to answer is to read the passages; the answer
cites the passage it used as `[i]`, like WebGPT's quotes.
"""

from __future__ import annotations

import random

SYLLABLES = ["ka", "lo", "mir", "ven", "do", "ra", "sel", "tor", "ni", "bel", "quo", "zan", "fen", "ta"]
KINDS = ["town", "river", "island", "mountain village", "harbour city"]
FAMOUS = [
    "glass bridges",
    "blue salt",
    "wooden clocks",
    "a spring festival",
    "paper lanterns",
    "copper bells",
    "apple cider",
    "stone towers",
    "wool blankets",
    "river boats",
]
# attribute -> (question template, passage sentence template)
ATTRIBUTES = {
    "founded": ("When was {n} founded?", "{n} was founded in {v}."),
    "population": ("How many people live in {n}?", "About {v} people live in {n}."),
    "famous": ("What is {n} known for?", "{n} is known for its {v}."),
    "mayor": ("Who leads {n}?", "{n} is led by {v}."),
}
FIRST = ["Ada", "Boris", "Clara", "Dmitri", "Elif", "Femi", "Greta", "Hugo", "Ines", "Jonas"]


def _name(rng: random.Random) -> str:
    return "".join(rng.sample(SYLLABLES, rng.randint(2, 3))).capitalize()


def _value(rng: random.Random, attribute: str) -> str:
    if attribute == "founded":
        return str(rng.randint(1100, 1950))
    if attribute == "population":
        return f"{rng.randint(2, 900) * 100:,}"
    if attribute == "famous":
        return rng.choice(FAMOUS)
    return f"{rng.choice(FIRST)} {_name(rng)}"


def generate(rng: random.Random) -> tuple[str, str, str]:
    names = []
    while len(names) < rng.randint(2, 4):
        name = _name(rng)
        if name not in names:
            names.append(name)
    passages, facts = [], {}
    for name in names:
        kind = rng.choice(KINDS)
        attrs = rng.sample(sorted(ATTRIBUTES), 3)
        sentences = [f"{name} is a {kind}."]
        for attribute in attrs:
            value = _value(rng, attribute)
            facts[(name, attribute)] = value
            sentences.append(ATTRIBUTES[attribute][1].format(n=name, v=value))
        passages.append((f"About {name}", " ".join(sentences)))
    target = rng.randrange(len(names))
    attribute = rng.choice([a for (n, a) in facts if n == names[target]])
    value = facts[(names[target], attribute)]
    question = ATTRIBUTES[attribute][0].format(n=names[target])
    quotes = "\n\n".join(f"[{i}] {title}\n{text}" for i, (title, text) in enumerate(passages, start=1))
    answer = ATTRIBUTES[attribute][1].format(n=names[target], v=value) + f" [{target + 1}]"
    return question, quotes, answer
