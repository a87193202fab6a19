"""Answering prompts with a loaded model: one instruction, a conversation, or sampled answers.

Prompts are templated as training templated them and each answer is cut where a new turn would start
(qadapt.tasks.math_sets' stops). `Answerer` is what `qadapt generate` and `qadapt chat` talk to: the model
loaded once, each line answered greedily or sampled, alone or with the conversation so far.
"""

from __future__ import annotations

import itertools

from qadapt.data import conversation_template, prompt_text
from qadapt.decoding.generation import sample_generate
from qadapt.decoding.sampling import Sampling
from qadapt.errors import QadaptError
from qadapt.tasks.math_sets import decode_prompts, stop_strings
from qadapt.text_templates import is_text_template


def sampling_of(temperature: float, top_p: float = 1.0, top_k: int = 0, samples: int = 1,
                seed: int = 0) -> Sampling | None:
    """The sampling the options ask for, or None for greedy decoding (temperature 0)."""
    if temperature < 0:
        raise QadaptError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if temperature == 0:
        if samples > 1 or top_p != 1.0 or top_k:
            raise QadaptError("--samples, --top-p and --top-k sample: give a --temperature above 0 too")
        return None
    return Sampling(temperature, top_p, top_k, samples, seed)


class Answerer:
    """A target (a run or a bare model) loaded once, answering one line at a time.

    Greedy unless `sampling`; with `history` each answer sees the turns before it, rendered by the run's
    chat template as in training; without, a sampled line is seeded by its number.
    """

    def __init__(self, target: str, max_new_tokens: int = 256, quant: str = "nf4", template: str | None = None,
                 sampling: Sampling | None = None, history: bool = False):
        from qadapt.inference.loader import load_target

        self.loaded = load_target(target, quant, template)
        self.max_new_tokens, self.sampling, self.history = max_new_tokens, sampling, history
        self.messages: list[dict] = []
        self.turn = itertools.count(1)

    def __call__(self, prompt: str) -> str:
        m = self.loaded
        if self.history:
            self.messages.append({"role": "user", "content": prompt})
            reply = answer_conversation(m.model, m.tokenizer, m.template, self.messages, self.max_new_tokens,
                                        self.sampling)
            self.messages.append({"role": "assistant", "content": reply})
            return reply
        if self.sampling is None:
            return answer_prompts(m.model, m.tokenizer, m.template, [prompt], self.max_new_tokens)[0]
        return self.samples(prompt, batch_size=1, keys=[next(self.turn)])[0]

    def samples(self, prompt: str, batch_size: int = 64, keys: list[int] | None = None) -> list[str]:
        """`sampling.samples` answers to one instruction (`keys`: its seed, qadapt.decoding.generation)."""
        m = self.loaded
        return sample_answers(m.model, m.tokenizer, m.template, [{"instruction": prompt, "input": ""}],
                              self.sampling, self.max_new_tokens, batch_size, keys=keys)[0]


def answer_prompts(model, tokenizer, template: str, instructions: list[str], max_new_tokens: int = 256,
                   batch_size: int = 64, on_done=None) -> list[str]:
    """Greedy answers to instructions, templated as in training, cut where a new turn would start."""
    prompts = [prompt_text({"instruction": i, "input": ""}, template, tokenizer) for i in instructions]
    return decode_prompts(model, tokenizer, template, prompts, max_new_tokens, batch_size, on_done)


def sample_answers(model, tokenizer, template: str, records: list[dict], sampling: Sampling,
                   max_new_tokens: int = 256, batch_size: int = 64, keys: list[int] | None = None,
                   on_done=None) -> list[list[str]]:
    """`sampling.samples` sampled answers to each record's prompt (as training templates it); `keys` seed
    each record's samples (qadapt.decoding.generation.sample_generate)."""
    prompts = [prompt_text(r, template, tokenizer) for r in records]
    return sample_generate(model, tokenizer, prompts, sampling, max_new_tokens, batch_size,
                           stop_strings(template, tokenizer), add_special_tokens=is_text_template(template),
                           on_done=on_done, prompt_keys=keys)


def answer_conversation(model, tokenizer, template: str, messages: list[dict], max_new_tokens: int = 256,
                        sampling: Sampling | None = None) -> str:
    """The next assistant turn of `messages` (greedy, or one sample seeded by the turn's number), the
    conversation rendered as training renders one."""
    chat_template, _ = conversation_template(template, tokenizer)
    prompt = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                           add_generation_prompt=True)
    if sampling is None:
        return decode_prompts(model, tokenizer, template, [prompt], max_new_tokens, 1)[0]
    return sample_generate(model, tokenizer, [prompt], sampling, max_new_tokens, 1, stop_strings(template, tokenizer),
                           add_special_tokens=is_text_template(template), prompt_keys=[len(messages)])[0][0]
