"""Tiny Python functions written from a one-line description (mirrors CodeAlpaca)."""

from __future__ import annotations

import random

ARGS = ["nums", "values", "items", "data", "xs", "numbers"]
WORDS = ["text", "s", "word", "sentence", "line"]

# (description, body template using {a} for the argument, kind of argument)
TASKS = [
    (
        "returns the sum of a list of numbers",
        "    total = 0\n    for x in {a}:\n        total += x\n    return total",
        "list",
    ),
    (
        "returns the largest number in a list",
        "    best = {a}[0]\n    for x in {a}:\n        if x > best:\n            best = x\n    return best",
        "list",
    ),
    (
        "returns the smallest number in a list",
        "    best = {a}[0]\n    for x in {a}:\n        if x < best:\n            best = x\n    return best",
        "list",
    ),
    ("returns the average of a list of numbers", "    return sum({a}) / len({a})", "list"),
    ("returns only the even numbers of a list", "    return [x for x in {a} if x % 2 == 0]", "list"),
    ("returns only the odd numbers of a list", "    return [x for x in {a} if x % 2 == 1]", "list"),
    ("returns the list sorted in ascending order", "    return sorted({a})", "list"),
    ("returns the list in reverse order", "    return {a}[::-1]", "list"),
    (
        "returns the number of items in a list that are greater than zero",
        "    return sum(1 for x in {a} if x > 0)",
        "list",
    ),
    ("returns the squares of the numbers in a list", "    return [x * x for x in {a}]", "list"),
    (
        "removes duplicates from a list while keeping the order",
        (
            "    seen = set()\n    out = []\n    for x in {a}:\n"
            "        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out"
        ),
        "list",
    ),
    ("reverses a string", "    return {a}[::-1]", "str"),
    ("counts the vowels in a string", '    return sum(1 for c in {a}.lower() if c in "aeiou")', "str"),
    (
        "checks whether a string is a palindrome",
        '    cleaned = {a}.lower().replace(" ", "")\n    return cleaned == cleaned[::-1]',
        "str",
    ),
    ("converts a string to upper case", "    return {a}.upper()", "str"),
    ("counts the words in a string", "    return len({a}.split())", "str"),
    ("returns the first character of a string", "    return {a}[0]", "str"),
    (
        "computes the factorial of a number",
        "    result = 1\n    for i in range(2, {a} + 1):\n        result *= i\n    return result",
        "int",
    ),
    ("checks whether a number is even", "    return {a} % 2 == 0", "int"),
    (
        "returns the n-th Fibonacci number",
        "    a, b = 0, 1\n    for _ in range({a}):\n        a, b = b, a + b\n    return a",
        "int",
    ),
    (
        "checks whether a number is prime",
        (
            "    if {a} < 2:\n        return False\n    for i in range(2, int({a} ** 0.5) + 1):\n"
            "        if {a} % i == 0:\n            return False\n    return True"
        ),
        "int",
    ),
    ("returns the sum of the digits of a number", "    return sum(int(d) for d in str({a}))", "int"),
]
VERBS = [
    "Write a Python function that",
    "Create a Python function which",
    "Implement a function that",
    "Write a function in Python that",
    "Define a Python function that",
]


def _name(rng: random.Random, description: str) -> str:
    words = [w for w in description.split() if w.isalpha() and len(w) > 3][:3]
    return rng.choice(["", "get_", "compute_"]) + "_".join(words)


def generate(rng: random.Random) -> tuple[str, str, str]:
    description, body, kind = rng.choice(TASKS)
    arg = rng.choice(WORDS) if kind == "str" else ("n" if kind == "int" else rng.choice(ARGS))
    name = _name(rng, description)
    instruction = f"{rng.choice(VERBS)} {description}."
    code = f"def {name}({arg}):\n" + body.format(a=arg)
    inp = ""
    if rng.random() < 0.5:  # half the rows carry an input, as in CodeAlpaca
        if kind == "list":
            values = [rng.randint(-20, 99) for _ in range(rng.randint(3, 7))]
            inp = f"{arg} = {values}"
            code += f"\n\n{arg} = {values}\nprint({name}({arg}))"
        elif kind == "str":
            inp = f'{arg} = "{rng.choice(["level", "hello world", "data science", "racecar", "python"])}"'
            code += f"\n\n{inp}\nprint({name}({arg}))"
        else:
            inp = f"{arg} = {rng.randint(1, 15)}"
            code += f"\n\n{inp}\nprint({name}({arg}))"
    return instruction, inp, code
