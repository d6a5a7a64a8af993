"""Examples -> token ids with a loss boundary, in worker processes, in a fixed order.

Each worker renders an example's prompt and response text with the recipe's prompt format
(`template.py`; a chat template's jinja rendering costs about as much as the tokenisation, so it
runs in the workers too) and encodes them separately (the prompt's length is the loss
boundary) with the tokenizer's batched Rust encoder. Work is cut into fixed-size chunks and
results are consumed in chunk order, so the output never depends on the number of workers.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
from collections import deque
from typing import Iterable, Iterator, Optional

import numpy as np

from .template import PromptFormat, prompt_format

# per worker process: loaded once by _init
_TOKENIZER = None
_FORMAT: Optional[PromptFormat] = None


def _init(tokenizer_path: str, template: str = "alpaca", system_prompt: Optional[str] = None) -> None:
    global _TOKENIZER, _FORMAT
    from .tokenizer import load_tokenizer

    _TOKENIZER = load_tokenizer(tokenizer_path)
    _FORMAT = prompt_format(template, _TOKENIZER, system_prompt)


def encode_texts(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` (no special tokens), concatenated, and their lengths."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        lists = [e.ids for e in encode(texts, add_special_tokens=False)]
    else:  # a slow (Python) tokenizer
        lists = tok(texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
    return ids, lengths


def _encode_chunk(examples: list[tuple[str, str, str]]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [_FORMAT.pair(instruction, input, output) for instruction, input, output in examples]
    texts = [p for p, _ in pairs] + [r for _, r in pairs]
    return encode_texts(_TOKENIZER, texts)


class ChunkEncoder:
    """Renders and encodes chunks of (instruction, input, output) with `workers` processes, results in order."""

    def __init__(
        self, tokenizer_path: str, workers: int = 1, template: str = "alpaca", system_prompt: Optional[str] = None
    ):
        self.workers = max(1, workers)
        self.tokenizer_path = tokenizer_path
        self.pool: Optional[mp.pool.Pool] = None
        init_args = (tokenizer_path, template, system_prompt)
        if self.workers > 1:
            # fork: workers start in milliseconds and inherit the imported modules.
            self.pool = mp.get_context("fork").Pool(self.workers, initializer=_init, initargs=init_args)
        else:
            _init(*init_args)

    def map(self, chunks: Iterable[list[tuple[str, str, str]]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, lengths) per chunk; lengths holds the prompts' lengths then the responses'."""
        if self.pool is None:
            yield from map(_encode_chunk, chunks)
            return
        window: deque = deque()  # bounded look-ahead keeps memory flat on huge corpora
        for chunk in chunks:
            window.append(self.pool.apply_async(_encode_chunk, (chunk,)))
            if len(window) >= 2 * self.workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


@dataclasses.dataclass
class DocPolicy:
    """How one example becomes one document of token ids."""

    seq_len: int
    bos_id: Optional[int]
    eos_id: int
    overlong: str = "truncate"
    min_response_tokens: int = 8
    response_share: float = 0.5
    prompt_tail: int = 0
    """Tokens at the end of every prompt (the template's response header) kept when cutting it."""
    train_on_prompt: bool = False
    append_eos: bool = True
    """Append EOS after the response; False when the response ends with its template's own
    end-of-turn token, which then plays EOS's role."""


def assemble(prompt: np.ndarray, response: np.ndarray, policy: DocPolicy) -> tuple[Optional[np.ndarray], int, str]:
    """(tokens, loss_start, status): status is "ok", "truncated", "too_long" or "prompt_too_long".

    Tokens are [BOS] prompt response EOS (no EOS when `append_eos` is False: the response then
    ends with its end-of-turn token). Over-long with `truncate`: the response keeps up to
    `response_share` of the sequence (at least `min_response_tokens`), the prompt keeps its head
    and its template tail around a cut, and the response fills what is left. A truncated
    response loses its EOS (or end-of-turn): the model must not learn to stop where the cut
    fell. `loss_start` is at least 1: a packed document's first token has nothing of its own
    before it to predict it.
    """
    head = np.asarray([policy.bos_id] if policy.bos_id is not None else [], np.int32)
    eos = np.asarray([policy.eos_id] if policy.append_eos else [], np.int32)
    if len(head) + len(prompt) + len(response) + len(eos) <= policy.seq_len:
        return np.concatenate([head, prompt, response, eos]), _loss_start(len(head) + len(prompt), policy), "ok"
    if policy.overlong == "drop":
        return None, 0, "too_long"
    reserve = min(
        len(response) + len(eos), max(policy.min_response_tokens, int(policy.seq_len * policy.response_share))
    )
    budget = policy.seq_len - len(head) - reserve  # room for the prompt
    if len(prompt) > budget:
        tail = min(policy.prompt_tail, len(prompt))
        if budget - tail < 1:
            return None, 0, "prompt_too_long"
        prompt = np.concatenate([prompt[: budget - tail], prompt[len(prompt) - tail :]])
    room = policy.seq_len - len(head) - len(prompt)
    if len(response) + len(eos) <= room:
        tokens = np.concatenate([head, prompt, response, eos])
    else:
        tokens = np.concatenate([head, prompt, response[:room]])
    return tokens, _loss_start(len(head) + len(prompt), policy), "truncated"


def _loss_start(n_prompt: int, policy: DocPolicy) -> int:
    return 1 if policy.train_on_prompt else max(1, n_prompt)


def template_tail_tokens(fmt: PromptFormat, encode) -> int:
    """Length of the token suffix shared by all prompts of `fmt` (alpaca's `### Response:` header,
    ChatML's `<|im_end|>\n<|im_start|>assistant\n`).

    Found as the common suffix of two unrelated prompts' encodings, so it holds for any tokenizer.
    """
    a, b = (encode(fmt.prompt(i, x)) for i, x in (("Say hi.", "x = 1"), ("Name 3 colours please", "Some other words")))
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n
