"""The chat page: one prompt answered by the base and by each adapter chosen, side by side, on one loaded
base (qadapt.inference.adapter_bank): the base is loaded once, as the runs trained on it, and each
adapter is switched in; the base answers with the adapters switched off. Greedy or sampled."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from qadapt.run_dir import RunDir
from qadapt.studio.web import HttpError, Request, Route

SCRIPT = "chat.js"
LONGEST_ANSWER = 1024


class ChatModels:
    """The studio's one adapter bank, on the base of the runs last asked for; replaced when runs on
    another base are asked for. One answer at a time: requests wait their turn."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bank = None
        self.base_key: tuple | None = None
        self.tokenizers: dict[Path, object] = {}  # each run's, read once

    def tokenizer(self, run: RunDir):
        from qadapt.tasks import task_named

        if run.path not in self.tokenizers:
            recipe = run.trained_recipe
            self.tokenizers[run.path] = task_named(recipe.task).run_tokenizer(recipe, run.path)
        return self.tokenizers[run.path]

    def bank_for(self, runs: dict[str, RunDir]):
        from qadapt.inference.adapter_bank import AdapterBank
        from qadapt.inference.loader import head_labels, load_frozen_base

        first = next(iter(runs.values())).trained_recipe.model
        key = (first.name, first.revision, first.quant, first.double_quant, first.compute_dtype)
        if key != self.base_key:
            self.bank, self.base_key = None, None  # the old base goes before the new one loads
            started = time.perf_counter()
            self.bank = AdapterBank(*load_frozen_base(first, head_labels(next(iter(runs.values())).adapter)))
            self.bank.base_load_s = time.perf_counter() - started
            self.base_key = key
        for name, run in runs.items():
            if name not in self.bank.adapters:
                self.bank.load(name, run.adapter.path)
        return self.bank


def chosen_runs(studio, names: list) -> dict[str, RunDir]:
    """The runs asked for, each finished, answering text, and trained on one base."""
    from qadapt.tasks import task_named

    if not names or not all(isinstance(name, str) for name in names):
        raise HttpError(400, "'runs' must name at least one finished run")
    runs = {name: RunDir(studio.run_folder(name)) for name in dict.fromkeys(names)}
    bases = set()
    for name, run in runs.items():
        if not run.adapter.weights_file.is_file():
            raise HttpError(409, f"{name} has no adapter yet: chat with it once it has finished")
        recipe = run.trained_recipe
        if not task_named(recipe.task).generates:
            raise HttpError(409, f"{name} is a {recipe.task} run: it does not answer in text")
        bases.add((recipe.model.name, recipe.model.quant))
    if len(bases) > 1:
        raise HttpError(409, "the runs chosen were trained on different bases "
                             f"({', '.join(f'{n} {q}' for n, q in sorted(bases))}): one base is loaded at a time")
    return runs


def answer(studio, request: Request) -> dict:
    """{"answers": [{"name": "base" or a run, "text", "seconds"}]}: the base first (when asked), then
    each run, every one prompted with its run's template (the base with the first run's)."""
    from qadapt.adapters import adapters_off
    from qadapt.inference.answering import answer_prompts, sample_answers, sampling_of

    prompt = request.field("prompt")
    if not prompt.strip():
        raise HttpError(400, "'prompt' is empty")
    runs = chosen_runs(studio, request.field("runs", list))
    with_base = request.field("base", bool, True)
    max_new_tokens = request.field("max_new_tokens", int, 128)
    if not 1 <= max_new_tokens <= LONGEST_ANSWER:
        raise HttpError(400, f"'max_new_tokens' must be 1 to {LONGEST_ANSWER}, got {max_new_tokens}")
    temperature = float(request.field("temperature", (int, float), 0))
    sampling = sampling_of(temperature, float(request.field("top_p", (int, float), 1.0)),
                           seed=request.field("seed", int, 0))

    models: ChatModels = studio.state.setdefault("chat", ChatModels())

    def reply(model, run: RunDir) -> str:
        recipe, tokenizer = run.trained_recipe, models.tokenizer(run)
        if sampling is None:
            return answer_prompts(model, tokenizer, recipe.data.template, [prompt], max_new_tokens)[0]
        return sample_answers(model, tokenizer, recipe.data.template, [{"instruction": prompt, "input": ""}],
                              sampling, max_new_tokens, keys=[0])[0][0]

    answers = []
    with models.lock:
        bank = models.bank_for(runs)
        first_name, first = next(iter(runs.items()))
        if with_base:
            bank.activate(first_name)
            started = time.perf_counter()
            with adapters_off(bank.model):
                answers.append({"name": "base", "text": reply(bank.model, first),
                                "seconds": time.perf_counter() - started})
        for name, run in runs.items():
            bank.activate(name)
            started = time.perf_counter()
            answers.append({"name": name, "text": reply(bank.model, run), "seconds": time.perf_counter() - started})
    return {"answers": answers, "base_load_s": bank.base_load_s}


ROUTES = [
    Route("POST", r"/api/chat", answer),
]
