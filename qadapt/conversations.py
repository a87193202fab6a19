"""Conversations: the chat data people have, read into one shape and rendered with the loss on the
assistant's turns only.

Formats, detected per file from its first row (or forced with `data.format`):
- `messages` (OpenAI): {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}]};
- `sharegpt`: {"conversations": [{"from": "system" | "human" | "gpt" | "tool" ..., "value": "..."}]};
- `prompt_completion`: {"prompt": ..., "completion": ...}, each a string (a user turn, an assistant turn)
  or a list of messages.
Each becomes a record {"messages": [...]}: the same conversation gives the same record in every format.

The loss mask comes from the chat template itself. A template that marks the assistant's text with
transformers' `{% generation %}` tags is used as it is. For the others, the rendering is split at each assistant turn
by rendering the conversation up to that turn (with the generation prompt) and through it: the text in
between is the turn (its content and its end-of-turn marks, not the whitespace after them). A template
whose renderings of a conversation's beginnings are not beginnings of its rendering (some thinking
templates drop earlier turns' reasoning), or whose tokens straddle a turn's edge, is refused by name:
its mask could not be exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qadapt.errors import QadaptError

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speaker names, as the peers read them (LLaMA-Factory, axolotl).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "tool": "tool", "observation": "tool", "function_response": "tool"}


def row_format(row) -> str | None:
    """The conversation format a row is written in, or None when it is not a conversation."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def to_conversation(row, form: str) -> tuple[dict | None, str | None]:
    """({"messages": [...]}, None) for a row of format `form`, else (None, what is wrong with it)."""
    if row_format(row) != form:
        fields = sorted(map(str, row)) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        return None, f"the example has fields {fields}, not those of the file's format ({form}: {_FIELDS[form]})"
    try:
        messages = _READERS[form](row)
    except _BadRow as exc:
        return None, str(exc)
    problem = _conversation_problem(messages)
    return (None, problem) if problem else ({"messages": messages}, None)


class _BadRow(Exception):
    pass


def _openai_messages(turns, field: str) -> list[dict]:
    if not isinstance(turns, list):
        raise _BadRow(f"{field} must be a list of messages, got a JSON {type(turns).__name__}")
    messages = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "role" not in turn:
            raise _BadRow(f"{field}[{number}] is not a message with a role and content")
        messages.append(_message(turn["role"], turn.get("content"), f"{field}[{number}]"))
    return messages


def _sharegpt_messages(row: dict) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise _BadRow(f"conversations must be a list of turns, got a JSON {type(turns).__name__}")
    messages = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _BadRow(f"conversations[{number}] is not a turn with from and value")
        speaker = turn["from"]
        if speaker not in SHAREGPT_ROLES:
            raise _BadRow(f"conversations[{number}] is from {speaker!r}, not one of {', '.join(SHAREGPT_ROLES)}")
        messages.append(_message(SHAREGPT_ROLES[speaker], turn["value"], f"conversations[{number}]"))
    if "system" in row and isinstance(row["system"], str) and row["system"].strip():
        messages.insert(0, {"role": "system", "content": row["system"]})
    return messages


def _prompt_completion_messages(row: dict) -> list[dict]:
    def side(value, role: str, field: str) -> list[dict]:
        if isinstance(value, str):
            return [_message(role, value, field)]
        return _openai_messages(value, field)

    return side(row["prompt"], "user", "prompt") + side(row["completion"], "assistant", "completion")


def _message(role, content, where: str) -> dict:
    if role not in ROLES:
        raise _BadRow(f"{where} has role {role!r}, not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise _BadRow(f"{where} ({role}) has no text content")
    return {"role": role, "content": content}


def _conversation_problem(messages: list[dict]) -> str | None:
    if not messages:
        return "the conversation is empty"
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant turn to learn from"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        return "an assistant turn is empty"
    return None


_READERS = {"messages": lambda row: _openai_messages(row["messages"], "messages"),
            "sharegpt": _sharegpt_messages, "prompt_completion": _prompt_completion_messages}
_FIELDS = {"messages": "messages", "sharegpt": "conversations with from and value",
           "prompt_completion": "prompt and completion"}


_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_GENERATION_TAGS = re.compile(r"{%-?\s*(?:end)?generation\s*-?%}")


@dataclass
class RenderedConversation:
    input_ids: list[int]
    trained: list[bool]  # per token: part of a trained assistant turn


def render(messages: list[dict], tokenizer, template: str, template_name: str,
           train_on: str = "assistant") -> RenderedConversation:
    """The conversation's tokens as `template` (a Jinja chat template) writes them, and which are trained
    (`train_on`: every assistant turn, or the last)."""
    if not getattr(tokenizer, "is_fast", False):
        raise QadaptError("conversations need a fast (Rust) tokenizer, which maps tokens back to the text; "
                          f"{type(tokenizer).__name__} is not one")

    def text(turns: list[dict], generation_prompt: bool) -> str:
        return _apply(tokenizer, template, template_name, turns, add_generation_prompt=generation_prompt,
                      tokenize=False)

    if _GENERATION_TAG.search(template):
        return _tagged(messages, tokenizer, template, template_name, train_on)
    whole = text(messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for index in turns[-1:] if train_on == "last" else turns:
        before, through = text(messages[:index], True), text(messages[:index + 1], False)
        if not (through.startswith(before) and whole.startswith(through)):
            raise QadaptError(f"chat template {template_name} does not render a conversation's beginning as the "
                              f"beginning of the whole (at turn {index + 1}), so its assistant turns cannot be found "
                              "exactly; use data.train_on: last, or another data.chat_template")
        end = len(through.rstrip())
        if messages[index]["content"].strip() not in through[len(before):end]:
            raise QadaptError(f"chat template {template_name} does not write assistant turn {index + 1}'s content "
                              "where the turn is; its mask cannot be found")
        spans.append((len(before), end))
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    trained = []
    for start, end in encoded["offset_mapping"]:
        inside = any(s <= start and end <= e for s, e in spans)
        if not inside and any(start < s < end or start < e < end for s, e in spans):
            raise QadaptError(f"chat template {template_name}: a token of {whole[start:end]!r} straddles the edge of "
                              "an assistant turn, so the turn's tokens cannot be told apart exactly (are the "
                              "template's turn markers special tokens of this tokenizer?)")
        trained.append(inside and end > start)
    return RenderedConversation(encoded["input_ids"], trained)


def _apply(tokenizer, template: str, template_name: str, messages: list[dict], **options):
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, **options)
    except Exception as exc:  # jinja's TemplateError, or raise_exception() inside the template
        raise QadaptError(f"chat template {template_name} cannot render this conversation: {exc}") from None


def _tagged(messages: list[dict], tokenizer, template: str, template_name: str,
            train_on: str) -> RenderedConversation:
    """The mask a template's `{% generation %}` tags give (transformers' assistant mask), as they give it."""
    out = _apply(tokenizer, template, template_name, messages, tokenize=True, return_dict=True,
                 return_assistant_tokens_mask=True)
    trained = [bool(flag) for flag in out["assistant_masks"]]
    if not any(trained):
        raise QadaptError(f"chat template {template_name} has generation tags, but they mark no token of this "
                          "conversation's assistant turns")
    if train_on == "last":  # only the last run of marked tokens: the last turn
        start = len(trained) - 1
        while not trained[start]:
            start -= 1
        while start > 0 and trained[start - 1]:
            start -= 1
        trained = [flag and index >= start for index, flag in enumerate(trained)]
    return RenderedConversation(list(out["input_ids"]), trained)


def end_of_turn(tokenizer, template: str) -> str:
    """What the template writes after an assistant's text to end the turn (e.g. <|im_end|>, <|eot_id|>, the
    EOS), found by rendering one short exchange: the string a reply stops at. Empty if it writes nothing."""
    exchange = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi there."}]
    whole = tokenizer.apply_chat_template(exchange, chat_template=template, tokenize=False)
    reply = whole.rfind("Hi there.")
    return whole[reply + len("Hi there."):].strip() if reply >= 0 else ""


def without_generation_tags(template: str) -> str:
    """`template` without transformers' `{% generation %}` tags, which mark assistant spans for training and
    render nothing, for runtimes that do not know them (llama.cpp, Ollama)."""
    return _GENERATION_TAGS.sub("", template)
