"""Conversations: three formats read to one shape, and the loss on exactly the assistant's turns."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from conftest import qadapt, train_tiny_run, write_tiny_recipe
from qadapt import data as D
from qadapt.errors import QadaptError

TALK = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "Mia has 3 apples and buys 4 more. How many does she have?"},
    {"role": "assistant", "content": "3 + 4 = 7, so she has 7 apples."},
    {"role": "user", "content": "She eats 2. How many are left?"},
    {"role": "assistant", "content": "7 - 2 = 5 apples are left."},
]
SHAREGPT_SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}

# Chat templates of other families, written the way those families write their turns.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
         "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{% if loop.previtem is defined and loop.previtem['role'] == 'assistant' %}"
           "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
           "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
# A thinking template that drops the reasoning of earlier assistant turns (as Qwen3's does).
THINKING = ("{% for m in messages %}{% set content = m['content'] %}"
            "{% if m['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}{% endif %}"
            "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MARKS = {"llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
         "gemma": ["<start_of_turn>", "<end_of_turn>"], "mistral": ["[INST]", "[/INST]"], "thinking": []}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != D.IGNORE_INDEX])


@pytest.fixture(scope="module")
def family_tokenizer(smol_tokenizer, tmp_path_factory):
    """The embedded tokenizer with another family's chat template and turn markers, saved and read back."""
    def make(family: str):
        folder = tmp_path_factory.mktemp(family)
        tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
        tokenizer.add_special_tokens({"additional_special_tokens": MARKS[family]})
        tokenizer.chat_template = {"llama3": LLAMA3, "gemma": GEMMA, "mistral": MISTRAL, "thinking": THINKING}[family]
        if family == "llama3":
            tokenizer.eos_token = "<|eot_id|>"
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    return make


def test_the_same_conversation_in_three_formats_gives_the_same_tokens_and_mask(tmp_path, smol_tokenizer):
    sharegpt = {"conversations": [{"from": SHAREGPT_SPEAKERS[m["role"]], "value": m["content"]} for m in TALK]}
    prompt_completion = {"prompt": TALK[:-1], "completion": TALK[-1]["content"]}
    rows = {}
    for name, row in [("messages", {"messages": TALK}), ("sharegpt", sharegpt), ("pc", prompt_completion)]:
        records = D.load_examples(write_rows(tmp_path / f"{name}.jsonl", [row]))
        assert records == [{"messages": TALK, "where": str(tmp_path / f"{name}.jsonl") + ":1"}]
        rows[name] = D.tokenize(records, smol_tokenizer, "chat", 512, False).rows
    assert rows["messages"] == rows["sharegpt"] == rows["pc"]
    assert trained_text(smol_tokenizer, rows["messages"][0]) == "".join(
        m["content"] + "<|im_end|>" for m in TALK if m["role"] == "assistant")


def test_a_run_trains_on_a_conversation_file(tmp_path, tiny_llama_dir, capsys):
    # The tiny LLaMA carries the embedded tokenizer and its chat template; NF4, the real quantized path.
    path = write_rows(tmp_path / "talks.jsonl", [{"messages": TALK}] * 6)
    run = train_tiny_run(tmp_path / "run", tiny_llama_dir, data={"path": path, "template": "chat", "val_size": 2},
                         train={"max_steps": 2})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["last_loss"] > 0
    assert "data: 4 training examples, 2 held out for eval loss" in capsys.readouterr().out


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_every_assistant_turn_is_trained_with_its_end_of_turn_mark_and_nothing_else(smol_tokenizer, template):
    row = D.tokenize([{"messages": TALK}], smol_tokenizer, template, 512, False).rows[0]
    answers = [m["content"] for m in TALK if m["role"] == "assistant"]
    assert trained_text(smol_tokenizer, row) == "".join(a + smol_tokenizer.eos_token for a in answers)
    last = D.tokenize([{"messages": TALK}], smol_tokenizer, template, 512, False, train_on="last").rows[0]
    assert trained_text(smol_tokenizer, last) == answers[-1] + smol_tokenizer.eos_token
    everything = D.tokenize([{"messages": TALK}], smol_tokenizer, template, 512, True).rows[0]
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize("family, end", [("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>"), ("mistral", None)])
def test_other_families_templates_mark_exactly_the_assistant_turns(family_tokenizer, family, end):
    tokenizer = family_tokenizer(family)
    talk = TALK[1:] if family == "mistral" else TALK  # that template has no system turn
    row = D.tokenize([{"messages": talk}], tokenizer, "chat", 512, False).rows[0]
    end = end or tokenizer.eos_token
    prefix = " " if family == "mistral" else ""  # [/INST] and the answer are one space apart
    assert trained_text(tokenizer, row) == "".join(prefix + m["content"] + end for m in talk if m["role"] == "assistant")


def test_an_alpaca_conversation_starts_with_the_tokenizers_own_special_tokens_as_a_single_turn_does(smol_tokenizer):
    with_bos = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path, add_bos_token=True)
    single = D.tokenize([{"instruction": TALK[1]["content"], "input": "", "output": TALK[2]["content"]}], with_bos,
                        "alpaca", 512, False).rows[0]
    talk = D.tokenize([{"messages": TALK[1:3]}], with_bos, "alpaca", 512, False).rows[0]
    assert single["input_ids"][0] == talk["input_ids"][0] == with_bos.bos_token_id
    assert talk["input_ids"][1] != with_bos.bos_token_id and talk["labels"][0] == D.IGNORE_INDEX
    assert talk["input_ids"][:len(single["input_ids"]) - 8] == single["input_ids"][:-8]  # the same prompt


def test_a_template_that_forbids_two_assistant_turns_in_a_row_names_the_row_or_skips_it(family_tokenizer, tmp_path,
                                                                                        capsys):
    talk = [TALK[1], TALK[2], {"role": "assistant", "content": "Anything else?"}]
    path = write_rows(tmp_path / "talks.jsonl", [{"messages": TALK[1:]}, {"messages": talk}])
    records = D.load_examples(path)
    with pytest.raises(QadaptError, match=f"{path}:2: chat template .* cannot render this conversation: roles must "
                                          "alternate user/assistant .*data.bad_rows=skip"):
        D.tokenize(records, family_tokenizer("mistral"), "chat", 512, False)
    kept = D.tokenize(records, family_tokenizer("mistral"), "chat", 512, False, bad_rows="skip")
    assert len(kept.rows) == 1 and "skipped 1 conversations the chat template" in capsys.readouterr().out
    with pytest.raises(QadaptError, match=f"renders none of the 1 conversations; the first: {path}:2"):
        D.tokenize(records[1:], family_tokenizer("mistral"), "chat", 512, False, bad_rows="skip")


def test_a_template_that_rewrites_earlier_turns_is_refused_unless_only_the_last_is_trained(family_tokenizer):
    tokenizer = family_tokenizer("thinking")
    talk = [TALK[1], {"role": "assistant", "content": "<think>3 and 4</think>7 apples."},
            TALK[3], {"role": "assistant", "content": "<think>7 less 2</think>5 apples."}]
    with pytest.raises(QadaptError, match="does not render a conversation's beginning as the beginning of the whole "
                                          r"\(at turn 2\).*data.train_on: last"):
        D.tokenize([{"messages": talk}], tokenizer, "chat", 512, False)
    row = D.tokenize([{"messages": talk}], tokenizer, "chat", 512, False, train_on="last").rows[0]
    assert trained_text(tokenizer, row) == "<think>7 less 2</think>5 apples.<|im_end|>"


@pytest.mark.parametrize("row, problem", [
    ({"messages": []}, "the conversation is empty"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "the conversation has no assistant turn to learn from"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "messages\\[1\\] has role 'bot', not one of system, user"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages\\[1\\] \\(user\\) has no text content"),
    ({"conversations": [{"from": "robot", "value": "Hi"}]}, "conversations\\[1\\] is from 'robot'"),
])
def test_a_bad_conversation_names_its_file_line_and_problem(tmp_path, row, problem):
    good = {"messages": TALK} if "messages" in row else {"conversations": [
        {"from": SHAREGPT_SPEAKERS[m["role"]], "value": m["content"]} for m in TALK]}
    path = write_rows(tmp_path / "talks.jsonl", [good, row])
    with pytest.raises(QadaptError, match=f"talks.jsonl:2: {problem}"):
        D.load_examples(path)
    assert D.load_examples(path, bad_rows="skip") == [{"messages": TALK, "where": f"{path}:1"}]


def test_a_file_keeps_one_format(tmp_path):
    path = write_rows(tmp_path / "mixed.jsonl", [{"messages": TALK}, {"instruction": "2+2?", "output": "4"}])
    with pytest.raises(QadaptError, match="mixed.jsonl:2: the example has fields \\['instruction', 'output'\\], not "
                                          "those of the file's format \\(messages: messages\\)"):
        D.load_examples(path)
    forced = write_rows(tmp_path / "forced.jsonl", [{"instruction": "2+2?", "output": "4"}])
    with pytest.raises(QadaptError, match="forced.jsonl:1: .*not those of the file's format \\(sharegpt"):
        D.load_examples(forced, form="sharegpt")


def test_qadapt_data_shows_the_trained_segments_and_the_counts(tmp_path, tiny_llama_dir, smol_tokenizer):
    talks = [TALK, TALK[1:3]]
    path = write_rows(tmp_path / "talks.jsonl", [{"messages": talk} for talk in talks])
    recipe = write_tiny_recipe(tmp_path / "recipe.yaml", tiny_llama_dir, data={"path": path, "template": "chat"})
    result = qadapt("data", str(recipe), "--show", "2", "--json")
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    shown = [[s["text"] for s in example["segments"] if s["trained"]] for example in view["examples"]]
    assert shown == [[m["content"] + "<|im_end|>" for m in talk if m["role"] == "assistant"] for talk in talks]
    rows = D.tokenize([{"messages": talk} for talk in talks], smol_tokenizer, "chat", 512, False).rows
    assert "".join(s["text"] for s in view["examples"][0]["segments"]) == smol_tokenizer.decode(rows[0]["input_ids"])
    assert view["counts"] == {"examples": 2, "held_out": 0, "tokens": sum(len(r["input_ids"]) for r in rows),
                              "trained_tokens": sum(label != D.IGNORE_INDEX for r in rows for label in r["labels"]),
                              "cut": 0, "dropped": 0}
    plain = qadapt("data", str(recipe), "--show", "1")  # not a terminal: trained text in brackets
    assert plain.returncode == 0, plain.stderr
    assert f"[[{TALK[2]['content']}<|im_end|>]]" in plain.stdout and "--- example 2" not in plain.stdout
    assert "2 training examples (0 held out)" in plain.stdout


def test_the_built_in_conversations_follow_one_story_over_several_turns(smol_tokenizer):
    train, test = (D.load_examples("builtin:conversations", split) for split in ("train", "test"))
    assert len(train) == 4000 and len(test) == 500
    assert D.load_examples("builtin:conversations", "test") == test  # deterministic
    firsts = {split: {next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows}
              for split, rows in (("train", train), ("test", test))}
    assert not firsts["train"] & firsts["test"]
    assert 0.25 < sum(r["messages"][0]["role"] == "system" for r in train) / len(train) < 0.42
    for record in train[:200]:
        turns = [m for m in record["messages"] if m["role"] != "system"]
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and len(turns) >= 4
        assert all(m["content"].rstrip(".").rsplit("The answer is ", 1)[1] for m in turns if m["role"] == "assistant")
    row = D.tokenize(train[:1], smol_tokenizer, "chat", 512, False).rows[0]
    assert trained_text(smol_tokenizer, row) == "".join(
        m["content"] + "<|im_end|>" for m in train[0]["messages"] if m["role"] == "assistant")
    with pytest.raises(QadaptError, match="builtin:conversations is a set of conversations, not of problems"):
        from qadapt.tasks.math_sets import load_eval_set

        load_eval_set("builtin:conversations")


def test_a_wordpiece_tokenizer_marks_the_same_turns():
    # The embedded encoder's uncased WordPiece tokenizer, with a template of its own special tokens.
    from qadapt import conversations
    from qadapt.models import load_tokenizer
    from qadapt.recipe import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name="all-minilm-l6-v2"), generates=False)
    template = ("{% for m in messages %}{{ '[CLS] ' + m['role'] + ': ' + m['content'] + ' [SEP] ' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '[CLS] assistant: ' }}{% endif %}")
    rendered = conversations.render(TALK, tokenizer, template, "wordpiece")
    trained = tokenizer.decode([t for t, on in zip(rendered.input_ids, rendered.trained) if on])
    expected = " ".join(m["content"] + " [SEP]" for m in TALK if m["role"] == "assistant")
    assert trained == tokenizer.decode(tokenizer(expected, add_special_tokens=False)["input_ids"])
