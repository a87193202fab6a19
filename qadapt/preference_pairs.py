"""Preference pairs in TRL's formats: a prompt, an answer preferred (chosen) and one not (rejected).

A row is one of:
- explicit prompt: {"prompt", "chosen", "rejected"}, each a text, or message lists (the prompt's messages,
  then each side's assistant turns; a side given as text is one assistant turn);
- implicit prompt: {"chosen", "rejected"}, two whole conversations (message lists) whose first messages are
  the same, or two texts that begin the same: what they share is the prompt (split where TRL's
  extract_prompt splits it: at the first difference, before a space that precedes it).

A pair becomes {"chosen": record, "rejected": record}, two records of the kinds qadapt trains on: an
instruction record for a text prompt, a conversation ({"messages": [...]}) for messages. So a pair's prompt
template, chat template and loss masks are the supervised path's (qadapt.data, qadapt.conversations).
"""

from __future__ import annotations

from qadapt import conversations


def is_pair_row(row) -> bool:
    """Whether a row is written as a preference pair (it has either side)."""
    return isinstance(row, dict) and ("chosen" in row or "rejected" in row)


def to_pair(row) -> tuple[dict | None, str | None]:
    """(pair, None) for a preference row, else (None, what is wrong with it)."""
    if not isinstance(row, dict):
        return None, f"expected an object with chosen and rejected, got a JSON {type(row).__name__}"
    for side in ("chosen", "rejected"):
        if side not in row:
            return None, f"the pair has no {side} answer"
    chosen, rejected = row["chosen"], row["rejected"]
    if not all(isinstance(value, (str, list)) for value in (chosen, rejected)):
        return None, "chosen and rejected must each be a text or a message list"
    if chosen == rejected:
        return None, "chosen and rejected are the same answer: the pair prefers nothing"
    if "prompt" in row:
        return _explicit(row["prompt"], chosen, rejected)
    if type(chosen) is not type(rejected):
        return None, "without a prompt, chosen and rejected must both be texts or both be message lists"
    if isinstance(chosen, str):
        return _implicit_texts(chosen, rejected)
    return _implicit_conversations(chosen, rejected)


def _explicit(prompt, chosen, rejected) -> tuple[dict | None, str | None]:
    if isinstance(prompt, str) and isinstance(chosen, str):
        if not prompt.strip():
            return None, "prompt is empty"
        if not (chosen.strip() and rejected.strip()):
            return None, "an answer is empty"
        return {side: {"instruction": prompt, "input": "", "output": answer, "answer": ""}
                for side, answer in (("chosen", chosen), ("rejected", rejected))}, None
    prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(prompt_messages, list):
        return None, f"prompt must be a text or a message list, got a JSON {type(prompt).__name__}"
    pair = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        answer_messages = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
        pair[side], problem = _conversation(prompt_messages + answer_messages, side)
        if problem:
            return None, problem
    return pair, None


def _implicit_texts(chosen: str, rejected: str) -> tuple[dict | None, str | None]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared and chosen[shared - 1] == " ":  # the space belongs to the answers, as TRL splits
        shared -= 1
    if not chosen[:shared].strip():
        return None, "chosen and rejected share no beginning to take as the prompt; give it as prompt"
    return _explicit(chosen[:shared], chosen[shared:], rejected[shared:])


def _implicit_conversations(chosen: list, rejected: list) -> tuple[dict | None, str | None]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if not shared:
        return None, "chosen and rejected share no first message to take as the prompt; give it as prompt"
    return _explicit(chosen[:shared], chosen[shared:], rejected[shared:])


def _conversation(messages: list, side: str) -> tuple[dict | None, str | None]:
    record, problem = conversations.to_conversation({"messages": messages}, "messages")
    if problem:
        return None, f"{side}: {problem}"
    if record["messages"][-1]["role"] != "assistant":
        return None, f"{side}: the conversation does not end with the answer (an assistant turn)"
    return record, None
