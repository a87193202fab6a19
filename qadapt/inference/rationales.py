"""`qadapt rationales`: training data from a teacher, as the LLM-Adapters paper made math_10k.

For every problem the teacher writes K sampled solutions; those whose answer is right are kept (numbers
read as the paper's evaluation reads them, the last number; a multiple-choice letter only after "The
answer is", since the paper's first-capital rule would accept any sentence starting with "A"), exact and
near-exact duplicates of one problem are dropped, and the rest are written as LLM-Adapters JSON
(instruction, input, output, answer) that `qadapt train` reads as it is. A stats file gives the problems,
those solved at least once, pass@1 and pass@K with 95% intervals, the rationales kept and their length.

The teacher is anything `qadapt eval` takes (a run, a merged folder, a bare model: prompted in its
training format, sampled by qadapt's decoder) or an OpenAI-compatible endpoint (qadapt.endpoint). Every
finished chunk of problems is appended to OUT.samples.jsonl (with the settings on its first line), so a
run that is stopped resumes where it was: problems already there are not asked again. OUT and
OUT.stats.json are written whole at the end, atomically.

With `pairs`, OUT gets preference pairs instead (JSON Lines of prompt, chosen, rejected, answer): for each
problem with a right and a wrong sample, its first right one and its first wrong one, for `task: preference`.
Preference data for any task whose answers can be checked, with no human labels.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from qadapt.decoding.sampling import Sampling
from qadapt.endpoint import Endpoint
from qadapt.errors import QadaptError
from qadapt.files import atomic_file
from qadapt.inference.answering import sample_answers
from qadapt.scores import wilson_interval
from qadapt.tasks import answers
from qadapt.tasks.math_sets import load_eval_set

NEAR_DUPLICATE = 0.95  # difflib ratio of two normalised rationales at or above which the later one is dropped
DEFAULT_SYSTEM = ("Solve the problem step by step. End with a sentence of the form \"The answer is N.\" "
                  "(for a multiple-choice question, \"The answer is (X).\").")


@dataclass
class Problem:
    key: str  # "set:index", unique across the sets asked
    seed_key: int  # seeds the problem's samples: the same problem gets the same samples on every call
    set: str
    record: dict  # instruction, input, output, answer
    gold: float | str
    multiple_choice: bool


def read_problems(specs: list[str], split: str = "train", limit: int | None = None) -> list[Problem]:
    """The problems of every set (its `split`), each with its gold answer."""
    if not specs:
        raise QadaptError("name at least one set of problems with --data (builtin:arithmetic, a GSM8K .jsonl, "
                          "an LLM-Adapters .json)")
    problems = []
    for spec in specs:
        eval_set = load_eval_set(spec, limit, split)
        for index, (record, gold) in enumerate(zip(eval_set.records, eval_set.golds)):
            key = f"{eval_set.name}:{index}"
            seed_key = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "little")
            problems.append(Problem(key, seed_key, eval_set.name, record, gold, eval_set.multiple_choice))
    return problems


class LocalTeacher:
    """A model qadapt loads (load_target) when first asked, prompted in its training format, sampled by
    qadapt's decoder."""

    def __init__(self, load, sampling: Sampling, max_new_tokens: int, batch_size: int):
        self.load, self.loaded, self.sampling = load, None, sampling
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.chunk = max(1, batch_size // sampling.samples) * 4  # problems per appended chunk

    def solve(self, problems: list[Problem]) -> list[list[str]]:
        self.loaded = self.loaded or self.load()
        m = self.loaded
        return sample_answers(m.model, m.tokenizer, m.template, [p.record for p in problems], self.sampling,
                              self.max_new_tokens, self.batch_size, keys=[p.seed_key for p in problems])


class EndpointTeacher:
    """A model behind an OpenAI-compatible chat-completions endpoint; one request per sample (many servers
    ignore `n`), `concurrency` at a time, each with its own seed."""

    def __init__(self, endpoint: Endpoint, model: str, sampling: Sampling, max_new_tokens: int,
                 concurrency: int, system: str | None):
        self.endpoint, self.model, self.sampling = endpoint, model, sampling
        self.max_new_tokens, self.concurrency, self.system = max_new_tokens, concurrency, system
        self.chunk = max(1, concurrency * 2)  # problems per appended chunk

    def solve(self, problems: list[Problem]) -> list[list[str]]:
        asks = [(p, k) for p in problems for k in range(self.sampling.samples)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            texts = list(pool.map(lambda ask: self.endpoint.chat(self._payload(*ask)), asks))
        n = self.sampling.samples
        return [texts[i * n:(i + 1) * n] for i in range(len(problems))]

    def _payload(self, problem: Problem, sample: int) -> dict:
        r, s = problem.record, self.sampling
        question = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": question}]
        seed = (s.seed * 1_000_003 + problem.seed_key * 31 + sample) % 2**31
        payload = {"model": self.model, "messages": messages, "temperature": s.temperature, "top_p": s.top_p,
                   "max_tokens": self.max_new_tokens, "seed": seed, "n": 1}
        return payload | ({"top_k": s.top_k} if s.top_k else {})


def is_right(text: str, problem: Problem) -> bool:
    extracted = answers.extract(text, problem.multiple_choice, strict=problem.multiple_choice)
    return answers.is_correct(extracted, problem.gold)


def distinct(texts: list[str]) -> list[str]:
    """`texts` without exact and near-exact repeats (same words and numbers, give or take a few characters)."""
    kept, seen = [], []
    for text in texts:
        normal = " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))
        if any(normal == other or difflib.SequenceMatcher(None, normal, other).ratio() >= NEAR_DUPLICATE
               for other in seen):
            continue
        kept.append(text)
        seen.append(normal)
    return kept


def make_rationales(teacher, problems: list[Problem], out: Path, settings: dict, on_done=None,
                    pairs: bool = False) -> dict:
    """Ask `teacher` for every problem not in OUT.samples.jsonl yet, then write OUT (rationales, or `pairs`)
    and its stats."""
    samples_file = out.with_suffix(".samples.jsonl")
    done = _read_samples(samples_file, settings)
    todo = [p for p in problems if p.key not in done]
    if on_done and len(todo) < len(problems):
        on_done(len(problems) - len(todo))  # asked before this call
    started = time.perf_counter()
    for start in range(0, len(todo), teacher.chunk):
        chunk = todo[start:start + teacher.chunk]
        lines = []
        for problem, texts in zip(chunk, teacher.solve(chunk)):
            lines.append({"key": problem.key, "samples": texts, "right": [is_right(t, problem) for t in texts]})
        _append(samples_file, lines)
        done.update({line["key"]: line for line in lines})
        if on_done:
            on_done(len(chunk))
    rows, stats = _kept_rows_and_stats(problems, done)
    stats |= {"settings": settings, "seconds_this_call": round(time.perf_counter() - started, 1),
              "asked_this_call": len(todo)}
    if pairs:
        rows = preference_pairs(problems, done)
        stats["pairs"] = len(rows)
    with atomic_file(out) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) if pairs
                       else json.dumps(rows, indent=1, ensure_ascii=False))
    with atomic_file(out.with_suffix(".stats.json")) as tmp:
        tmp.write_text(json.dumps(stats, indent=2))
    return stats


def preference_pairs(problems: list[Problem], done: dict) -> list[dict]:
    """Per problem with both, its first right sample (chosen) and its first wrong one (rejected)."""
    rows = []
    for problem in problems:
        line = done[problem.key]
        right = [t for t, ok in zip(line["samples"], line["right"]) if ok]
        wrong = [t for t, ok in zip(line["samples"], line["right"]) if not ok and t.strip()]
        if right and wrong:
            record = problem.record
            prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            rows.append({"prompt": prompt, "chosen": right[0], "rejected": wrong[0], "answer": record["answer"]})
    return rows


def _kept_rows_and_stats(problems: list[Problem], done: dict) -> tuple[list[dict], dict]:
    rows, per_set = [], {}
    for problem in problems:
        line = done[problem.key]
        right = [t for t, ok in zip(line["samples"], line["right"]) if ok]
        kept = distinct(right)
        record = problem.record
        gold = problem.gold if isinstance(problem.gold, str) else record["answer"]
        rows += [{"instruction": record["instruction"], "input": record.get("input", ""), "output": text,
                  "answer": gold} for text in kept]
        tally = per_set.setdefault(problem.set, {"problems": 0, "solved": 0, "samples": 0, "right": 0, "kept": 0,
                                                 "words": 0})
        tally["problems"] += 1
        tally["solved"] += bool(right)
        tally["samples"] += len(line["samples"])
        tally["right"] += len(right)
        tally["kept"] += len(kept)
        tally["words"] += sum(len(text.split()) for text in kept)
    sets = {name: _figures(t) for name, t in per_set.items()}
    total = {key: sum(t[key] for t in per_set.values()) for key in ("problems", "solved", "samples", "right",
                                                                     "kept", "words")}
    return rows, {**_figures(total), "sets": sets}


def _figures(t: dict) -> dict:
    """pass@1 (the share of right samples: the unbiased estimate), pass@K (problems solved at least once),
    each with its 95% Wilson interval, and what was kept."""
    return {"problems": t["problems"], "solved_at_least_once": t["solved"],
            "pass@1": t["right"] / t["samples"] if t["samples"] else 0.0,
            "pass@1_interval": wilson_interval(t["right"], t["samples"]),
            "pass@k": t["solved"] / t["problems"] if t["problems"] else 0.0,
            "pass@k_interval": wilson_interval(t["solved"], t["problems"]),
            "samples": t["samples"], "rationales_kept": t["kept"],
            "duplicates_dropped": t["right"] - t["kept"],
            "mean_words": t["words"] / t["kept"] if t["kept"] else 0.0}


def _read_samples(path: Path, settings: dict) -> dict:
    """The problems already asked (key -> line); a new file starts with the settings. A last line cut off by
    a kill is dropped; other settings than the file's are refused."""
    if not path.is_file():
        _append(path, [{"settings": settings}])
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):  # the line being written when the run stopped
        text = text[:text.rfind("\n") + 1]
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not lines or "settings" not in lines[0]:
        raise QadaptError(f"{path} is not a rationales samples file (its first line holds the settings)")
    earlier = lines[0]["settings"]
    changed = [f"{k}: {earlier.get(k)!r} then, {v!r} now" for k, v in settings.items() if earlier.get(k) != v]
    if changed:
        raise QadaptError(f"{path} was made with other settings ({'; '.join(changed)}); give another --out, or "
                          "the same settings to continue it")
    return {line["key"]: line for line in lines[1:]}


def _append(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())


def sampling_settings(sampling: Sampling, teacher: str, max_new_tokens: int, extra: dict) -> dict:
    """What the samples depend on (recorded, and compared when a run continues); never the API key."""
    return {"teacher": teacher, **asdict(sampling), "max_new_tokens": max_new_tokens, **extra}


@dataclass(frozen=True)
class EndpointOptions:
    """How an http(s) teacher is asked (`qadapt rationales --model ...`)."""
    model: str | None = None  # None: the first model the endpoint lists
    api_key_env: str | None = None  # the environment variable holding the API key (read, sent, never written)
    concurrency: int = 4  # requests in flight at once
    timeout: float = 120.0  # seconds to wait for one answer (retried)
    system: str | None = None  # the system prompt; None: DEFAULT_SYSTEM, '' for none


def run_rationales(teacher: str, specs: list[str], out: Path, sampling: Sampling, *, split: str = "train",
                   limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 64, quant: str = "nf4",
                   template: str | None = None, endpoint: EndpointOptions = EndpointOptions(),
                   pairs: bool = False) -> dict:
    """`qadapt rationales`: the teacher (a target `qadapt eval` takes, or an http(s) endpoint) solves every
    problem of `specs` K times; the right, distinct solutions go to `out`."""
    from tqdm import tqdm

    from qadapt.inference.loader import check_load_options, load_target

    problems = read_problems(specs, split, limit)
    extra = {"template": template}
    if teacher.startswith(("http://", "https://")):
        e = endpoint
        if e.concurrency < 1:
            raise QadaptError(f"--concurrency must be at least 1, got {e.concurrency}")
        key = os.environ.get(e.api_key_env) if e.api_key_env else None
        if e.api_key_env and key is None:
            raise QadaptError(f"--api-key-env {e.api_key_env}: no such environment variable is set")
        server = Endpoint(teacher, key, e.timeout)
        model = e.model
        if model is None:
            listed = server.models()
            if not listed:
                raise QadaptError(f"{teacher}/models lists no model; name one with --model")
            model = listed[0]
        system = DEFAULT_SYSTEM if e.system is None else e.system
        solver = EndpointTeacher(server, model, sampling, max_new_tokens, e.concurrency, system or None)
        name, extra = f"{teacher} {model}", {"system": system}
    else:
        check_load_options(quant, template, None)
        solver = LocalTeacher(lambda: load_target(teacher, quant, template), sampling, max_new_tokens, batch_size)
        name = teacher
    settings = sampling_settings(sampling, name, max_new_tokens, extra)
    with tqdm(total=len(problems), desc="rationales", unit="problem") as bar:
        stats = make_rationales(solver, problems, Path(out), settings, on_done=bar.update, pairs=pairs)
    print(f"{stats['problems']} problems, {stats['solved_at_least_once']} solved at least once "
          f"(pass@{sampling.samples} {stats['pass@k']:.1%}, pass@1 {stats['pass@1']:.1%}); "
          + (f"{stats['pairs']} preference pairs (a right and a wrong answer): {out}" if pairs else
             f"{stats['rationales_kept']} rationales kept ({stats['duplicates_dropped']} repeats dropped): {out}"))
    return stats
