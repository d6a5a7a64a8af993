"""The embedded corpus: deterministic, varied, and correct enough to learn from."""

from __future__ import annotations

import ast
import re

from data_pipeline.embedded import GENERATORS, generate


def test_deterministic_by_seed_and_varied():
    for name in GENERATORS:
        a, b, c = generate(name, 300, 0), generate(name, 300, 0), generate(name, 300, 1)
        assert a == b and a != c, name
        assert len(set(a)) > 150, name
        assert all(isinstance(x, str) for row in a for x in row) and all(row[2] for row in a)


def test_arithmetic_answers_are_right():
    for _question, _, answer in generate("arithmetic", 200, 5):
        steps = re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", answer)
        assert steps, answer
        for a, op, b, result in steps:
            a, b, result = int(a), int(b), int(result)
            assert {"+": a + b, "-": a - b, "x": a * b, "/": a // b}[op] == result
        assert answer.endswith(f"The answer is {steps[-1][3]}.")


def test_code_answers_are_valid_python():
    for _, _, code in generate("code", 200, 2):
        ast.parse(code)


def test_retrieval_answer_is_in_the_cited_passage():
    for _question, passages, answer in generate("retrieval", 200, 4):
        sentence, cite = re.fullmatch(r"(.*) \[(\d)\]", answer).groups()
        cited = passages.split("\n\n")[int(cite) - 1]
        assert sentence in cited
