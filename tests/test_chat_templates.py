"""Chat templates chosen in the recipe (named, from a file, with a thinking switch, with generation tags):
the loss on exactly the assistant's turns, and the run keeping the template it trained with."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from conftest import train_tiny_run
from qadapt import data as D
from qadapt.chat_templates import TEMPLATES, template_text, use_run_template
from qadapt.conversations import end_of_turn, without_generation_tags
from qadapt.errors import QadaptError
from qadapt.recipe import recipe_from_dict
from qadapt.run_dir import RunDir
from qadapt.tasks.math_sets import stop_strings
from test_conversations import TALK, trained_text, write_rows

MARKERS = {"chatml": ["<|im_start|>", "<|im_end|>"], "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           "gemma": ["<start_of_turn>", "<end_of_turn>"], "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]}
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}

# Qwen3's way with thinking, cut to its bones: the last reply opens with a think block, and the generation
# prompt writes an empty one when thinking is switched off.
QWEN3 = ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
         "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
         "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
         "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
         "{% endif %}")
# ChatML whose assistant text is marked with transformers' generation tags (the end-of-turn mark outside).
TAGGED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
          "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '<|im_end|>\\n' }}"
          "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def choose(tokenizer, chat_template=None, thinking=None):
    """`tokenizer` (a copy) with the template a recipe's data section chooses."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    use_run_template(tokenizer, SimpleNamespace(chat_template=chat_template, thinking=thinking))
    return tokenizer


@pytest.fixture(scope="module")
def marked_tokenizer(smol_tokenizer, tmp_path_factory):
    """The embedded tokenizer with a named template's turn markers as special tokens, saved and read back."""
    def make(name: str):
        folder = tmp_path_factory.mktemp(name)
        tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
        tokenizer.add_special_tokens({"additional_special_tokens": MARKERS[name]})
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    return make


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "phi3"])
def test_a_named_template_trains_each_assistant_turn_and_its_end_of_turn_mark(marked_tokenizer, name):
    tokenizer = choose(marked_tokenizer(name), name)
    assert tokenizer.chat_template == TEMPLATES[name]
    row = D.tokenize([{"messages": TALK}], tokenizer, "chat", 512, False).rows[0]
    assert trained_text(tokenizer, row) == "".join(m["content"] + END[name] for m in TALK if m["role"] == "assistant")
    assert end_of_turn(tokenizer, tokenizer.chat_template) == END[name]
    assert stop_strings("chat", tokenizer) == (() if END[name] == tokenizer.eos_token else (END[name],))
    text = tokenizer.decode(row["input_ids"])
    assert TALK[0]["content"] in text  # the system prompt is kept (Gemma: at the head of the first user turn)
    if name == "gemma":
        assert f"<start_of_turn>user\n{TALK[0]['content']}\n\n{TALK[1]['content']}<end_of_turn>" in text


def test_a_marker_the_tokenizer_splits_and_merges_with_its_neighbours_is_refused_by_name(smol_tokenizer):
    # SmolLM2 has no <|eot_id|> token: "<|eot_id|><|start_header_id|>" is text whose "><" is one token.
    with pytest.raises(QadaptError, match=r"chat template llama3: a token of '><' straddles .*special tokens"):
        D.tokenize([{"messages": TALK}], choose(smol_tokenizer, "llama3"), "chat", 512, False)


def test_a_wrong_template_name_or_file_says_what_is_allowed(tmp_path):
    with pytest.raises(QadaptError, match="'chatm1' is neither a named template .*chatml, llama3, gemma, phi3, alpaca"):
        template_text("chatm1")
    with pytest.raises(QadaptError, match=f"template file not found: {tmp_path / 'mine.jinja'}"):
        template_text(str(tmp_path / "mine.jinja"))
    with pytest.raises(QadaptError, match="data.chat_template applies with data.template: chat"):
        recipe_from_dict({"data": {"chat_template": "chatml"}})
    with pytest.raises(QadaptError, match="data.thinking applies with data.template: chat"):
        recipe_from_dict({"data": {"thinking": False}})


def test_the_thinking_switch_is_fixed_in_the_template_and_stays_out_of_the_loss(smol_tokenizer, tmp_path):
    (tmp_path / "qwen3.jinja").write_text(QWEN3)
    talk = TALK[:3]
    default = choose(smol_tokenizer, str(tmp_path / "qwen3.jinja"))
    off = choose(smol_tokenizer, str(tmp_path / "qwen3.jinja"), thinking=False)
    record = {"instruction": talk[1]["content"], "input": ""}
    assert D.prompt_text(record, "chat", default).endswith("<|im_start|>assistant\n")
    assert D.prompt_text(record, "chat", off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Switched off, the empty think block belongs to the prompt; by default it is the reply's first words.
    row = D.tokenize([{"messages": talk}], off, "chat", 512, False).rows[0]
    assert trained_text(off, row) == talk[2]["content"] + "<|im_end|>"
    row = D.tokenize([{"messages": talk}], default, "chat", 512, False).rows[0]
    assert trained_text(default, row) == "<think>\n\n</think>\n\n" + talk[2]["content"] + "<|im_end|>"
    with pytest.raises(QadaptError, match="data.thinking is set, but the chat template chatml has no thinking switch"):
        choose(smol_tokenizer, "chatml", thinking=True)


@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_generation_tags_are_used_as_the_template_marks_them(smol_tokenizer, train_on):
    tokenizer = choose(smol_tokenizer)
    tokenizer.chat_template = TAGGED
    row = D.tokenize([{"messages": TALK}], tokenizer, "chat", 512, False, train_on=train_on).rows[0]
    answers = [m["content"] for m in TALK if m["role"] == "assistant"]
    assert trained_text(tokenizer, row) == "".join(answers if train_on == "assistant" else answers[-1:])
    # The same text as a template without the tags, which runtimes other than transformers can read.
    plain = without_generation_tags(TAGGED)
    assert "{% generation %}" not in plain and "endgeneration" not in plain
    assert tokenizer.apply_chat_template(TALK, tokenize=False) == tokenizer.apply_chat_template(
        TALK, chat_template=plain, tokenize=False)


def test_a_run_keeps_the_template_it_trained_with_through_eval_and_merge(tmp_path, tiny_llama_dir):
    from qadapt.export.merge import merge_run
    from qadapt.inference.loader import load_target

    template_file = tmp_path / "phi3.jinja"
    template_file.write_text(TEMPLATES["phi3"])
    path = write_rows(tmp_path / "talks.jsonl", [{"messages": TALK}] * 4)
    run = train_tiny_run(tmp_path / "run", tiny_llama_dir, train={"max_steps": 1},
                         data={"path": path, "template": "chat", "chat_template": str(template_file), "val_size": 0})
    assert RunDir(run).chat_template_file.read_text() == TEMPLATES["phi3"]
    template_file.write_text("{{ 'changed after training' }}")  # the run does not read it again
    loaded = load_target(str(run))
    assert loaded.tokenizer.chat_template == TEMPLATES["phi3"]
    assert stop_strings(loaded.template, loaded.tokenizer) == ("<|end|>",)  # not a token of this vocabulary
    merged = tmp_path / "merged"
    merge_run(run, merged, show_written=False)
    assert AutoTokenizer.from_pretrained(merged).chat_template == TEMPLATES["phi3"]
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] in (
        loaded.tokenizer.eos_token_id, [loaded.tokenizer.eos_token_id])


def test_a_tool_turn_goes_through_the_template_and_is_not_trained(smol_tokenizer):
    talk = [TALK[1], {"role": "assistant", "content": "Let me add them: 3 + 4."},
            {"role": "tool", "content": "7"}, {"role": "assistant", "content": "She has 7 apples."}]
    tokenizer = choose(smol_tokenizer, "chatml")
    row = D.tokenize([{"messages": talk}], tokenizer, "chat", 512, False).rows[0]
    assert "<|im_start|>tool\n7<|im_end|>" in tokenizer.decode(row["input_ids"])
    assert trained_text(tokenizer, row) == "Let me add them: 3 + 4.<|im_end|>She has 7 apples.<|im_end|>"
