"""Prompt formats: the one place where an example becomes prompt text and response text.

Two formats, chosen by the recipe's `template`:

    alpaca   the paper's Alpaca template (`format_prompt`); the build appends EOS to the response
    chat     the tokenizer's own chat template (`apply_chat_template`): a user turn holding the
             instruction (and the input after a blank line), an optional system turn, and the
             assistant turn as the response, which ends with the template's end-of-turn token
             (ChatML: `<|im_end|>`); that token plays EOS's role, so no EOS is appended

Training (the build), evaluation (prompts read back from the shards) and `launch/generate.py`
all go through `prompt_format`, so a prompt is rendered the same way everywhere.
"""

from __future__ import annotations

from typing import Optional

from .examples import BuildError
from .tokenizer import special_ids

TEMPLATES = ("alpaca", "chat")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# The example a chat template is rendered with once, up front, to learn its end-of-turn token and
# whether it writes BOS itself (and to fail before any work when it cannot render our messages).
_PROBE = ("Say hi.", "", "Hi.")


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt the model sees; the response (the only part with loss by default) follows it."""
    template = PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


class PromptFormat:
    """How an example (instruction, input, output) becomes prompt text and response text."""

    name: str = ""
    append_eos: bool = True
    """The build appends EOS after the response (False when the response closes its own turn)."""
    end_of_turn_id: Optional[int] = None
    """The token a response ends with, when it is not the EOS the build appends: generation stops on it."""
    renders_bos: bool = False
    """The rendered prompt already starts with the tokenizer's BOS text: the build adds no second one."""

    def prompt(self, instruction: str, input: str = "") -> str:
        """What the model sees before the answer."""
        raise NotImplementedError

    def pair(self, instruction: str, input: str, output: str) -> tuple[str, str]:
        """(prompt text, response text): the loss boundary lies between them."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The manifest's `template` entry: what generation needs to format and stop like the data."""
        return {"name": self.name}

    def document_bos(self, tokenizer, add_bos: bool) -> Optional[int]:
        """The BOS id put before the prompt's tokens, or None (none wanted, none in the vocabulary,
        or the template writes it into the text already)."""
        return tokenizer.bos_token_id if add_bos and not self.renders_bos else None


class AlpacaFormat(PromptFormat):
    """The paper's template; the response is the output as it is, EOS appended by the build."""

    name = "alpaca"

    def prompt(self, instruction: str, input: str = "") -> str:
        return format_prompt(instruction, input)

    def pair(self, instruction: str, input: str, output: str) -> tuple[str, str]:
        return format_prompt(instruction, input), output


class ChatFormat(PromptFormat):
    """The tokenizer's chat template; the response is the assistant turn up to its end-of-turn token."""

    name = "chat"

    def __init__(self, tokenizer, system_prompt: Optional[str] = None):
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.label = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not getattr(tokenizer, "chat_template", None):
            raise BuildError(f"tokenizer {self.label} has no chat template; use template: alpaca")
        prompt, response = self.pair(*_PROBE)
        self.renders_bos = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
        last = tokenizer(response, add_special_tokens=False)["input_ids"][-1:]
        closes_turn = bool(last) and last[0] in special_ids(tokenizer)
        # A template whose assistant turn ends in plain text gets EOS appended, as alpaca does.
        self.append_eos = not closes_turn
        self.end_of_turn_id = last[0] if closes_turn else tokenizer.eos_token_id

    def _messages(self, instruction: str, input: str) -> list[dict]:
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return system + [{"role": "user", "content": "\n\n".join(part for part in (instruction, input) if part)}]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # jinja raises its own errors (e.g. "system role not supported")
            raise BuildError(
                f"tokenizer {self.label}: its chat template cannot render " f"{[m['role'] for m in messages]}: {err}"
            ) from None

    def prompt(self, instruction: str, input: str = "") -> str:
        return self._render(self._messages(instruction, input), add_generation_prompt=True)

    def pair(self, instruction: str, input: str, output: str) -> tuple[str, str]:
        messages = self._messages(instruction, input)
        prompt = self._render(messages, add_generation_prompt=True)
        full = self._render(messages + [{"role": "assistant", "content": output}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise BuildError(
                f"tokenizer {self.label}: its chat template does not render the prompt (with the "
                "generation prompt) as a prefix of the full conversation, so there is no loss boundary"
            )
        # What follows the end-of-turn token (ChatML's newline) belongs to no turn.
        return prompt, full[len(prompt) :].rstrip()

    def describe(self) -> dict:
        return {"name": self.name, "system_prompt": self.system_prompt, "end_of_turn_id": self.end_of_turn_id}


def prompt_format(name: str, tokenizer=None, system_prompt: Optional[str] = None) -> PromptFormat:
    """The format called `name` ("alpaca" or "chat"); chat needs the tokenizer whose template it renders."""
    if name == "alpaca":
        return AlpacaFormat()
    if name == "chat":
        if tokenizer is None:
            raise BuildError("template chat needs a tokenizer (its chat template renders the prompts)")
        return ChatFormat(tokenizer, system_prompt)
    raise BuildError(f"unknown template {name!r}: choose one of {list(TEMPLATES)}")
