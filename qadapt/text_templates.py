"""Plain-text prompt templates (`data.template`), as against a chat template's turns.

`alpaca` is the Stanford Alpaca text, clean, the same in training and answering: qadapt's default.

`llm-adapters` reproduces LLM-Adapters (arXiv 2304.01933) exactly. Its `finetune.py` trains on an
indented Alpaca text (16 spaces before each line after the first, lines of spaces between sections,
trailing spaces after the opening sentence) and its `evaluate.py` answers another indented text (empty
lines between sections, other trailing spaces); both are kept here byte for byte. Its training also
tokenizes prompt and response as one string (so their boundary tokens are the tokenizer's choice), and
masks the prompt by the length of the prompt tokenized alone.

A text template's prompt gets the tokenizer's own special tokens (e.g. BOS), as in both references.
"""

from __future__ import annotations

from dataclasses import dataclass

from qadapt.chat_templates import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from qadapt.errors import QadaptError

_LLM_ADAPTERS_INDENT = " " * 16


@dataclass(frozen=True)
class TextTemplate:
    training: tuple[str, str]  # (without input, with input) forms, {instruction} and {input} to fill
    answering: tuple[str, str]
    tokenized_whole: bool  # prompt and response tokenized as one string (else each alone, then joined)

    def prompt(self, record: dict, training: bool = False) -> str:
        bare, with_input = self.training if training else self.answering
        return (with_input if record.get("input") else bare).format(instruction=record["instruction"],
                                                                    input=record.get("input", ""))


def _indented(opening: str, *sections: tuple[str, ...], blank: str) -> str:
    """LLM-Adapters' layout: the opening sentence, an empty line, then each section's lines indented by 16
    spaces, sections apart by a `blank` line, ending in 16 spaces after "### Response:"."""
    body = f"\n{blank}\n".join("\n".join(_LLM_ADAPTERS_INDENT + line for line in lines) for lines in sections)
    return f"{opening}\n\n{body}\n{_LLM_ADAPTERS_INDENT}"


_INSTRUCTION, _INPUT, _RESPONSE = ("### Instruction:", "{instruction}"), ("### Input:", "{input}"), ("### Response:",)
_OPENING = ALPACA_PROMPT.split("\n", 1)[0]
_OPENING_WITH_INPUT = ALPACA_PROMPT_WITH_INPUT.split("\n", 1)[0]

ALPACA = TextTemplate(training=(ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT),
                      answering=(ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT), tokenized_whole=False)

# finetune.py: lines of 16 spaces between sections, trailing spaces (two; one with an input) after the opening.
# evaluate.py: empty lines between sections, one trailing space without an input, none with one.
LLM_ADAPTERS = TextTemplate(
    training=(_indented(_OPENING + "  ", _INSTRUCTION, _RESPONSE, blank=_LLM_ADAPTERS_INDENT),
              _indented(_OPENING_WITH_INPUT + " ", _INSTRUCTION, _INPUT, _RESPONSE, blank=_LLM_ADAPTERS_INDENT)),
    answering=(_indented(_OPENING + " ", _INSTRUCTION, _RESPONSE, blank=""),
               _indented(_OPENING_WITH_INPUT, _INSTRUCTION, _INPUT, _RESPONSE, blank="")),
    tokenized_whole=True,
)

TEXT_TEMPLATES = {"alpaca": ALPACA, "llm-adapters": LLM_ADAPTERS}


def is_text_template(name: str) -> bool:
    """A plain-text template (its prompt gets the tokenizer's special tokens), not a chat template."""
    return name in TEXT_TEMPLATES


def text_template(name: str) -> TextTemplate:
    if name not in TEXT_TEMPLATES:
        raise QadaptError(f"unknown text template {name!r}; choose one of {', '.join(TEXT_TEMPLATES)}")
    return TEXT_TEMPLATES[name]
