"""Training data: read, template, tokenize with a loss mask, batch.

Every source becomes records in the LLM-Adapters format — instruction, input, output, answer:
- `builtin:arithmetic`: generated word problems told one way (qadapt.builtin_data.arithmetic), offline;
- `builtin:word-problems`: generated everyday word problems of many kinds and phrasings (qadapt.builtin_data.word_problems);
- `builtin:conversations`: those stories with follow-up questions, as conversations (qadapt.builtin_data.conversation_problems);
- a GSM8K JSONL file (`question`, `answer` ending "#### N"): the rationale without its calculator
  annotations, then "The answer is N.";
- an LLM-Adapters / Alpaca JSON or JSONL file (`instruction`, `input`, `output`, `answer`);
- problems alone (`prompt`, `answer`: no solution, for scoring and learning from rewards);
- a datasets-hub id, `name` or `name:config` (e.g. `openai/gsm8k:main`), in either format.
A file of conversations (OpenAI `messages`, ShareGPT `conversations`, `prompt` / `completion`) becomes
records {"messages": [...]} instead (qadapt.conversations), rendered by the chat template with the loss on
the assistant's turns. A file of preference pairs (`chosen`, `rejected`) becomes records {"chosen": record,
"rejected": record} (qadapt.preference_pairs).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qadapt import conversations, preference_pairs
from qadapt.builtin_data import arithmetic, conversation_problems, word_problems
from qadapt.chat_templates import alpaca_chat_template, template_name
from qadapt.console import say
from qadapt.errors import QadaptError
from qadapt.text_templates import TEXT_TEMPLATES, is_text_template, text_template

BUILTIN_ARITHMETIC = "builtin:arithmetic"
BUILTIN_WORD_PROBLEMS = "builtin:word-problems"
BUILTIN_CONVERSATIONS = "builtin:conversations"
BUILTIN_SETS = {BUILTIN_ARITHMETIC: arithmetic.problems, BUILTIN_WORD_PROBLEMS: word_problems.problems,
                BUILTIN_CONVERSATIONS: conversation_problems.conversations}
BUILTIN_SIZES = {"train": 4000, "test": 500}
IGNORE_INDEX = -100  # label of a token that carries no loss
_CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


def load_examples(path: str, split: str = "train", bad_rows: str = "fail", form: str = "auto") -> list[dict]:
    """Records (instruction, input, output, answer; or a conversation's messages) from a built-in set, a file
    or a hub dataset.

    `form` is the rows' format (qadapt.recipe.DataFormat); `auto` reads it off the file's first row.
    A malformed row (not JSON, not an object of the format) is an error naming the file and line, or with
    `bad_rows="skip"` is dropped and counted.
    """
    if path.startswith("builtin:"):
        if path not in BUILTIN_SETS:
            raise QadaptError(f"unknown built-in data {path!r}; choose one of {', '.join(BUILTIN_SETS)}")
        if split not in BUILTIN_SIZES:
            raise QadaptError(f"{path} has splits {', '.join(BUILTIN_SIZES)}, not {split!r}")
        return BUILTIN_SETS[path](split, BUILTIN_SIZES[split])
    file = Path(path).expanduser()
    if file.is_file():
        rows, source = _read_file(file), str(file)
    elif file.suffix in (".json", ".jsonl") or path.startswith((".", "/", "~")):
        raise QadaptError(f"data file not found: {file}")
    else:
        rows, source = [(index, row, None) for index, row in enumerate(_load_hub_dataset(path, split), 1)], path
    if not rows:
        raise QadaptError(f"no examples in {source}")
    if form == "auto":
        form = next((row_format(row) for _, row, problem in rows if not problem), "instruction")
    readers = {"instruction": _to_record, "pairs": preference_pairs.to_pair}
    read = readers.get(form) or (lambda row: conversations.to_conversation(row, form))
    records, bad = [], []
    for line, row, problem in rows:
        record, problem = (None, problem) if problem else read(row)
        if record is not None and ("messages" in record or form == "pairs"):
            record["where"] = f"{source}:{line}"  # named if the chat template cannot render it, or a side is cut
        if problem and bad_rows == "fail":
            raise QadaptError(f"{source}:{line}: {problem} (data.bad_rows=skip drops such rows)")
        if problem:
            bad.append(line)
        else:
            records.append(record)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        say(f"data: skipped {len(bad)} malformed rows of {len(rows)} in {source} (lines {shown})")
    if not records:
        raise QadaptError(f"no usable examples in {source}: all {len(rows)} rows are malformed")
    return records


def row_format(row) -> str:
    """The format a row is written in (qadapt.recipe.DataFormat, less auto)."""
    if preference_pairs.is_pair_row(row):
        return "pairs"
    return conversations.row_format(row) or "instruction"


def _read_file(file: Path) -> list[tuple[int, object, str | None]]:
    """(line, row, problem) for a JSON list of examples or JSON Lines (one example per line)."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QadaptError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if file.suffix != ".jsonl":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith("["):
                raise QadaptError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        else:
            if not isinstance(rows, list):
                raise QadaptError(f"{file}: expected a list of examples, got a JSON {type(rows).__name__}")
            return [(index, row, None) for index, row in enumerate(rows, 1)]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line), None))
            except json.JSONDecodeError as exc:
                rows.append((number, None, f"not valid JSON ({exc.msg})"))
    return rows


def _load_hub_dataset(path: str, split: str) -> list[dict]:
    import datasets

    name, _, config = path.partition(":")
    try:
        return list(datasets.load_dataset(name, config or None, split=split))
    except Exception as exc:  # the hub client raises many types; the user needs one line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QadaptError(
            f"cannot load dataset {path!r} (not a local file): {first_line}; offline, set data.path to a "
            "local .jsonl or .json file"
        ) from None


def _to_record(row) -> tuple[dict | None, str | None]:
    """(record, None) for a GSM8K or LLM-Adapters row, else (None, what is wrong with it)."""
    if isinstance(row, dict) and "question" in row and "answer" in row:
        if not (_is_text(row["question"]) and _is_text(row["answer"])):
            return None, "GSM8K fields question and answer must be text"
        return gsm8k_record(row["question"], row["answer"]), None
    if isinstance(row, dict) and "instruction" in row and "output" in row:
        answer = row.get("answer", "")
        given_input = row.get("input") or ""  # null or absent: no input
        texts = _is_text(row["instruction"]) and isinstance(row["output"], str) and isinstance(given_input, str)
        if not (texts and isinstance(answer, (str, int, float)) and not isinstance(answer, bool)):
            return None, ("fields instruction, input and output must be text (instruction not empty), answer text "
                          "or a number")
        return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"],
                "answer": str(answer)}, None
    if isinstance(row, dict) and "prompt" in row and "answer" in row:  # a problem without a solution (TRL's prompt)
        answer = row["answer"]
        if not (_is_text(row["prompt"]) and isinstance(answer, (str, int, float)) and not isinstance(answer, bool)):
            return None, "fields prompt and answer must be text (answer may be a number)"
        return {"instruction": row["prompt"], "input": "", "output": "", "answer": str(answer)}, None
    keys = sorted(map(str, row)) if isinstance(row, dict) else f"a JSON {type(row).__name__}"
    return None, (f"the example has fields {keys}; expected GSM8K (question, answer), LLM-Adapters (instruction, "
                  "input, output, answer) or a problem alone (prompt, answer)")


def _is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def gsm8k_record(question: str, answer: str) -> dict:
    rationale, _, final = answer.rpartition("####")
    final = final.strip().replace(",", "")
    rationale = _CALCULATOR_ANNOTATION.sub("", rationale).strip()
    return {"instruction": question, "input": "", "output": f"{rationale}\nThe answer is {final}.", "answer": final}


def normalized_question(record: dict) -> str:
    """A record's question as compared across data sets: lower case, words and numbers only.

    A conversation's question is its first user turn."""
    if "messages" in record:
        text = next((m["content"] for m in record["messages"] if m["role"] == "user"), "").lower()
    else:
        text = f"{record['instruction']} {record.get('input') or ''}".lower()
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text))


def eval_overlap(records: list[dict], eval_records: dict[str, list[dict]], exclude: bool) -> list[dict]:
    """Say how many training questions also appear in each eval set; drop them when `exclude`."""
    seen = {name: {normalized_question(r) for r in rows} for name, rows in eval_records.items()}
    questions = [normalized_question(r) for r in records]  # once each: thousands of rows, six sets
    shared = [i for i, q in enumerate(questions) if any(q in s for s in seen.values())]
    if not shared:
        say(f"data: none of the {len(records):,} training questions appears in the eval sets")
        return records
    per_set = {name: sum(questions[i] in eval_questions for i in shared) for name, eval_questions in seen.items()}
    counts = ", ".join(f"{name} {count}" for name, count in per_set.items() if count)
    action = "dropped (data.exclude_eval_overlap)" if exclude else "kept; data.exclude_eval_overlap=true drops them"
    say(f"data: {len(shared):,} of {len(records):,} training questions also appear in the eval sets ({counts}): "
        f"{action}")
    if not exclude:
        return records
    dropped = set(shared)
    return [r for i, r in enumerate(records) if i not in dropped]


def prompt_text(record: dict, template: str, tokenizer, training: bool = False) -> str:
    """The prompt up to where the response starts, as the model sees it in evaluation (or in training: a
    text template may train on another text than it answers, qadapt.text_templates)."""
    if is_text_template(template):
        return text_template(template).prompt(record, training)
    if template == "chat":
        content = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, chat_template=_chat_template(tokenizer), tokenize=False,
                                             add_generation_prompt=True)
    raise QadaptError(f"unknown template {template!r}; choose {', '.join(TEXT_TEMPLATES)} or chat")


def conversation_template(template: str, tokenizer) -> tuple[str, str]:
    """(Jinja chat template, its name for messages) that renders conversations under data.template; under a
    text template, the Alpaca one."""
    if is_text_template(template):
        return alpaca_chat_template(), "alpaca"
    return _chat_template(tokenizer), template_name(tokenizer)


def _chat_template(tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise QadaptError("data.template is chat but the tokenizer has no chat template; use alpaca")
    return tokenizer.chat_template


@dataclass
class TokenizedData:
    rows: list[dict]  # input_ids and labels, lists of ints
    truncated: int  # examples cut at cutoff_len
    dropped: int  # examples whose response did not fit at all
    kept: list[int] = field(default_factory=list)  # each row's index in the records given


def tokenize(records: list[dict], tokenizer, template: str, cutoff_len: int, train_on_inputs: bool,
             train_on: str = "assistant", bad_rows: str = "fail") -> TokenizedData:
    """Prompt + response + EOS, cut at cutoff_len; labels IGNORE_INDEX on the prompt unless train_on_inputs.

    A conversation is rendered whole by the chat template (the tokenizer's, or the Alpaca one), its loss on
    the assistant's turns (`train_on`: every one, or the last). One the template cannot render (e.g. two
    assistant turns in a row where it forbids them) is an error naming its file and line, or with
    `bad_rows="skip"` is dropped and counted.
    """
    talks = [i for i, r in enumerate(records) if "messages" in r]
    pairs = [i for i, r in enumerate(records) if "messages" not in r]
    examples: dict[int, tuple[list[int], list[int]]] = {}
    if pairs:
        prompts = [prompt_text(records[i], template, tokenizer, training=True) for i in pairs]
        # A chat template writes its own special tokens; a text template gets the tokenizer's (e.g. BOS).
        text = is_text_template(template)
        prompt_ids = tokenizer(prompts, add_special_tokens=text)["input_ids"]
        if text and text_template(template).tokenized_whole:  # LLM-Adapters: one string, the prompt's length masked
            whole = tokenizer([p + records[i]["output"] for p, i in zip(prompts, pairs)])["input_ids"]
            for i, ids, prompt in zip(pairs, whole, prompt_ids):
                masked = len(prompt)
                input_ids = ids + [tokenizer.eos_token_id]
                examples[i] = input_ids, [IGNORE_INDEX] * masked + input_ids[masked:]
        else:
            response_ids = tokenizer([records[i]["output"] for i in pairs], add_special_tokens=False)["input_ids"]
            for i, prompt, response in zip(pairs, prompt_ids, response_ids):
                input_ids = prompt + response + [tokenizer.eos_token_id]
                examples[i] = input_ids, [IGNORE_INDEX] * len(prompt) + input_ids[len(prompt):]
    if talks:
        chat_template, name = conversation_template(template, tokenizer)
        # The Alpaca text starts with the tokenizer's own special tokens (e.g. BOS), as a single turn does.
        lead = tokenizer("", add_special_tokens=True)["input_ids"] if is_text_template(template) else []
        unrendered = []
        for i in talks:
            try:
                rendered = conversations.render(records[i]["messages"], tokenizer, chat_template, name, train_on)
            except QadaptError as exc:
                where = records[i].get("where", f"conversation {i + 1}")
                if bad_rows == "fail":
                    raise QadaptError(f"{where}: {exc} (data.bad_rows=skip drops such rows)") from None
                unrendered.append(f"{where}: {exc}")
                continue
            examples[i] = lead + rendered.input_ids, [IGNORE_INDEX] * len(lead) + [
                t if on else IGNORE_INDEX for t, on in zip(rendered.input_ids, rendered.trained)]
        if unrendered and len(unrendered) == len(talks):  # the template, not the rows: say why
            raise QadaptError(f"the chat template {name} renders none of the {len(talks)} conversations; the "
                              f"first: {unrendered[0]}")
        if unrendered:
            shown = "; ".join(unrendered[:3]) + ("; ..." if len(unrendered) > 3 else "")
            say(f"data: skipped {len(unrendered)} conversations the chat template {name} cannot render ({shown})")
    rows, truncated, dropped, kept = [], 0, 0, []
    for i in range(len(records)):
        if i not in examples:
            continue
        input_ids, labels = examples[i]
        if train_on_inputs:
            labels = list(input_ids)
        if len(input_ids) > cutoff_len:
            truncated += 1
            input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        rows.append({"input_ids": input_ids, "labels": labels})
        kept.append(i)
    return TokenizedData(rows, truncated, dropped, kept)


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and loss.

    Packed rows (qadapt.packing) also carry position ids; their padding gets positions from 0, so it is
    a sequence of its own that no example attends to.
    """
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    packed = "position_ids" in rows[0]
    position_ids = torch.zeros((len(rows), width), dtype=torch.long) if packed else None
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
        if packed:
            position_ids[i, :n] = torch.tensor(row["position_ids"])
            position_ids[i, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    return batch | ({"position_ids": position_ids} if packed else {})


def model_inputs(batch: dict) -> dict:
    """What the model's forward takes of a batch: packed rows give position ids and no attention mask (so
    transformers masks each example apart), others the attention mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def split_held_out(rows: list, size: int, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded random slice of `size` rows is held out for the eval loss."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


class ExampleOrder:
    """Indices into the data, epoch after epoch, each epoch a fresh seeded permutation.

    `start` skips that many examples, so a resumed run continues the same order where it stopped; `position`
    counts what has been drawn, which is where a checkpoint's run stands (a task may draw more or fewer
    examples than one step's batch).
    """

    def __init__(self, count: int, seed: int, start: int = 0):
        self.count, self.seed, self.position = count, seed, start
        self._epoch, self._permutation = -1, []

    def __iter__(self) -> "ExampleOrder":
        return self

    def __next__(self) -> int:
        epoch, index = divmod(self.position, self.count)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.count, generator=generator).tolist()
        self.position += 1
        return self._permutation[index]
