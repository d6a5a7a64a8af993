"""General instructions answered from common knowledge (mirrors Dolly)."""

from __future__ import annotations

import random

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "early": "late",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "full": "empty",
    "strong": "weak",
    "high": "low",
    "old": "new",
    "wet": "dry",
}
ANIMALS = {
    "cat": "mammal",
    "eagle": "bird",
    "salmon": "fish",
    "frog": "amphibian",
    "snake": "reptile",
    "whale": "mammal",
    "sparrow": "bird",
    "shark": "fish",
    "lizard": "reptile",
    "dog": "mammal",
    "owl": "bird",
    "toad": "amphibian",
    "tuna": "fish",
    "turtle": "reptile",
    "horse": "mammal",
}
COLOURS = {
    "banana": "yellow",
    "grass": "green",
    "the sky on a clear day": "blue",
    "snow": "white",
    "a ripe tomato": "red",
    "coal": "black",
    "an orange": "orange",
    "a plum": "purple",
}
PLURALS = {
    "child": "children",
    "mouse": "mice",
    "tooth": "teeth",
    "foot": "feet",
    "box": "boxes",
    "city": "cities",
    "leaf": "leaves",
    "person": "people",
    "goose": "geese",
    "bus": "buses",
}
FRUITS = ["apple", "pear", "mango", "grape", "lemon", "cherry", "peach", "kiwi", "melon", "fig"]


def _opposite(rng):
    w = rng.choice(sorted(OPPOSITES))
    return f'What is the opposite of the word "{w}"?', "", f'The opposite of "{w}" is "{OPPOSITES[w]}".'


def _classify(rng):
    names = rng.sample(sorted(ANIMALS), 3)
    lines = "\n".join(f"{n.capitalize()}: {ANIMALS[n]}" for n in names)
    return "Classify each animal as a mammal, bird, fish, reptile or amphibian.", ", ".join(names), lines


def _colour(rng):
    thing = rng.choice(sorted(COLOURS))
    return f"What colour is {thing}?", "", f"{thing[0].upper() + thing[1:]} is {COLOURS[thing]}."


def _plural(rng):
    w = rng.choice(sorted(PLURALS))
    return f'What is the plural of "{w}"?', "", f'The plural of "{w}" is "{PLURALS[w]}".'


def _sort(rng):
    nums = [rng.randint(0, 99) for _ in range(rng.randint(4, 8))]
    order = rng.choice(["ascending", "descending"])
    out = sorted(nums, reverse=order == "descending")
    return f"Sort these numbers in {order} order.", ", ".join(map(str, nums)), ", ".join(map(str, out))


def _larger(rng):
    a, b = rng.sample(range(1, 1000), 2)
    return f"Which number is larger, {a} or {b}?", "", f"{max(a, b)} is larger than {min(a, b)}."


def _list_fruits(rng):
    k = rng.randint(2, 5)
    return f"Name {k} fruits.", "", "\n".join(f"- {f}" for f in rng.sample(FRUITS, k))


def _count_words(rng):
    words = rng.sample(FRUITS + sorted(OPPOSITES) + sorted(ANIMALS), rng.randint(3, 9))
    return "How many words are in this sentence?", " ".join(words), f"The sentence has {len(words)} words."


def _uppercase(rng):
    words = " ".join(rng.sample(FRUITS + sorted(ANIMALS), rng.randint(2, 5)))
    return "Rewrite the text in capital letters.", words, words.upper()


KINDS = [_opposite, _classify, _colour, _plural, _sort, _larger, _list_fruits, _count_words, _uppercase]


def generate(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(KINDS)(rng)
