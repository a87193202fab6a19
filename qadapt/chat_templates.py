"""Prompt templates: the paper's Alpaca prompt, and the chat template a run trains and answers with,
chosen in the recipe and kept in the run.

`data.chat_template` (with `data.template: chat`) is null for the tokenizer's own template, a name
(TEMPLATES) or a Jinja file. `data.thinking` sets a template's thinking switch (Qwen3's and SmolLM3's
`enable_thinking`) by writing it into the template's first line, so the choice travels with the template
text wherever it goes: the run directory (chat_template.jinja, read back by everything that loads the run),
a merged model's tokenizer, a GGUF file.
"""

from __future__ import annotations

from pathlib import Path

from qadapt.errors import QadaptError
from qadapt.files import atomic_file
from qadapt.run_dir import RunDir

# The Alpaca template, as the LLM-Adapters paper trains and evaluates with it.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_chat_template() -> str:
    """A Jinja chat template that writes a user message exactly as ALPACA_PROMPT does.

    A merged or exported model trained on Alpaca prompts carries it, so that chat front ends
    (transformers' apply_chat_template, llama.cpp, Ollama) prompt it the way it was trained.
    """
    user = ALPACA_PROMPT.replace("{instruction}", "' + message['content'] + '").replace("\n", "\\n")
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '" + user + "' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
    )


# Turn formats of common families, for a base whose tokenizer has no template or another one. A marker the
# tokenizer lacks as a special token is written as text (several tokens); where such text merges with the
# text beside it into one token, the assistant turns cannot be masked exactly and training says so.
TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
               " + '<|im_end|>\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    # Gemma has no system role: the system prompt opens the first user turn, as Gemma's own template does.
    "gemma": ("{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
              "{% if message['role'] == 'system' %}{% set ns.system = message['content'] | trim + '\\n\\n' %}"
              "{% else %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
              "{{ '<start_of_turn>' + role + '\\n' + (ns.system if role == 'user' else '') + "
              "message['content'] | trim + '<end_of_turn>\\n' }}{% if role == 'user' %}{% set ns.system = '' %}"
              "{% endif %}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
    "phi3": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
    "alpaca": alpaca_chat_template(),
}
_THINKING_SWITCH = "enable_thinking"


def template_text(choice: str) -> str:
    """The Jinja text of a named template or of a template file."""
    if choice in TEMPLATES:
        return TEMPLATES[choice]
    path = Path(choice).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.suffix in (".jinja", ".j2", ".txt") or "/" in choice:
        raise QadaptError(f"data.chat_template: template file not found: {path}")
    raise QadaptError(f"data.chat_template {choice!r} is neither a named template ({', '.join(TEMPLATES)}) nor "
                      "a Jinja file")


def with_thinking(template: str, thinking: bool | None, name: str) -> str:
    """`template` with its thinking switch set once and for all (None leaves it to the template's default)."""
    if thinking is None:
        return template
    if _THINKING_SWITCH not in template:
        raise QadaptError(f"data.thinking is set, but the chat template {name} has no thinking switch "
                          f"({_THINKING_SWITCH}); leave data.thinking null")
    return f"{{%- set {_THINKING_SWITCH} = {str(thinking).lower()} %}}\n{template}"


def use_run_template(tokenizer, data_config, run_dir: Path | None = None) -> None:
    """Give `tokenizer` the chat template of the run: the one saved in `run_dir` once the run trained (so a
    template file or a base model changed later changes nothing), else the recipe's choice."""
    saved = RunDir(run_dir).chat_template_file if run_dir is not None else None
    if saved is not None and saved.is_file():
        tokenizer.chat_template = saved.read_text(encoding="utf-8")
        return
    choice, thinking = data_config.chat_template, data_config.thinking
    if choice is not None:
        tokenizer.chat_template = template_text(choice)
    if thinking is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise QadaptError("data.thinking is set, but the tokenizer has no chat template")
        tokenizer.chat_template = with_thinking(tokenizer.chat_template, thinking, template_name(tokenizer))


def save_run_template(tokenizer, run_dir: Path) -> None:
    """Keep the template a chat run trains with in its directory (atomically)."""
    with atomic_file(RunDir(run_dir).chat_template_file) as tmp:
        tmp.write_text(tokenizer.chat_template, encoding="utf-8")


def template_name(tokenizer) -> str:
    """How messages name the tokenizer's chat template: its name if it is a named one."""
    named = next((name for name, text in TEMPLATES.items() if text == tokenizer.chat_template), None)
    return named or f"of {getattr(tokenizer, 'name_or_path', None) or 'the tokenizer'}"
