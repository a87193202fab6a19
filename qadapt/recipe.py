"""Recipes: typed data loaded strictly from YAML, with `section.key=value` overrides.

Every problem in a recipe (an unknown key, a value of the wrong type or out of range) is collected and
raised once, each naming the key and what is allowed. The docs of each field live next to it.
"""

from __future__ import annotations

import difflib
import math
import re
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from qadapt.adapters.spec import SPECS, AdapterSpec, BottleneckSpec, LowRankSpec, spec_class
from qadapt.errors import QadaptError

Quant = Literal["nf4", "fp4", "int8", "none"]
DType = Literal["auto", "bf16", "fp16", "fp32"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
Template = Literal["alpaca", "llm-adapters", "chat"]
DataFormat = Literal["auto", "instruction", "messages", "sharegpt", "prompt_completion", "pairs"]
Task = Literal["causal-lm", "token-classification", "grpo", "preference"]
PolicyLossKind = Literal["grpo", "dr_grpo", "dapo"]
PreferenceLossKind = Literal["dpo", "ipo", "orpo", "simpo"]
BuiltInReward = Literal["correct", "format", "length"]  # qadapt.tasks.rewards computes each
USER_REWARD = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # module:function
# The experiment trackers accelerate reports to (qadapt.training.trackers).
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """`smollm2-135m` or (an encoder) `all-minilm-l6-v2`, both embedded and offline; a hub id, a local
    model folder or a `.gguf` file."""
    quant: Quant = "nf4"
    """How the frozen base is stored: 4-bit `nf4`/`fp4`, 8-bit `int8`, or `none` (compute dtype)."""
    double_quant: bool = True
    """4-bit only: quantize the quantization constants too (QLoRA), ~0.4 bit/parameter saved."""
    compute_dtype: DType = "auto"
    """dtype of the base's matmuls. `auto`: bf16 on a GPU from Ampere on (compute capability 8.0) or a CPU with
    AVX512-BF16 or AMX; fp16, with loss scaling, on older GPUs; else fp32."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of a hub id."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code. Only when you trust it."""


@dataclass
class DataConfig:
    path: Union[str, list[str]] = "builtin:arithmetic"
    """`builtin:arithmetic`, `builtin:word-problems`, `builtin:conversations`, a GSM8K .jsonl, an LLM-Adapters
    .json, a file of conversations (see `format`), or a datasets-hub id; for token classification a CoNLL file
    (word ... tag per line) or a hub id with `tokens` and `ner_tags`. A list of them is read in turn and mixed
    into one training set."""
    split: str = "train"
    """Split of a hub dataset or of the built-in problems."""
    template: Template = "alpaca"
    """Prompt template: the Alpaca text, `llm-adapters` (the LLM-Adapters code's exact training and answering
    texts, indented, and its tokenization: for reproducing its runs), or a chat template (`chat_template`)."""
    chat_template: Optional[str] = None
    """With `template: chat`: null for the tokenizer's own, a name (`chatml`, `llama3`, `gemma`, `phi3`,
    `alpaca`) or a Jinja file. The run keeps the text it trained with (chat_template.jinja)."""
    thinking: Optional[bool] = None
    """With `template: chat`, for templates with a thinking switch (Qwen3, SmolLM3: `enable_thinking`):
    true or false fixes it in the run's template; null leaves the template's default."""
    format: DataFormat = "auto"
    """The rows' format: `auto` reads it off each file's first row; `instruction` (LLM-Adapters / Alpaca, or
    GSM8K), or a conversation: `messages` (OpenAI roles), `sharegpt` (`conversations` with `from` / `value`),
    `prompt_completion` (strings or message lists), or preference `pairs` (`chosen`, `rejected`, and a `prompt`
    or a shared beginning; task preference)."""
    train_on: Literal["assistant", "last"] = "assistant"
    """Of a conversation, the loss goes on every assistant turn and its end-of-turn marks, or on the last one."""
    packing: bool = False
    """Pack several training examples into each row of up to `cutoff_len` tokens (causal LM), each example
    masked apart from the others, instead of padding every row to the longest of its micro-batch."""
    cutoff_len: int = 256
    """Longest example in tokens; longer ones are cut (and counted)."""
    train_on_inputs: bool = False
    """Also compute the loss on the prompt, not only on the response."""
    max_examples: Optional[int] = None
    """Use only the first N examples (after the held-out slice is taken)."""
    val_size: int = 64
    """Examples held out for the periodic eval loss (0: none)."""
    exclude_eval_overlap: bool = False
    """Drop training examples whose question (lower case, words and numbers only) is also in one of
    `eval.sets`; the count per set is reported either way."""
    multiple_choice: float = 0.0
    """Share of the numeric problems also given as a five-option copy in AQuA's format (their answer among
    four wrong ones: the rationale's intermediate results and near misses, as "Answer Choices: (A) 18 (B) 72 ...";
    the rationale ending "The answer is (C)."), so that the model learns to answer with a letter."""
    bad_rows: Literal["fail", "skip"] = "fail"
    """A malformed row (bad JSON, unknown fields): `fail` names its file and line; `skip` counts and drops it."""

    @property
    def sources(self) -> list[str]:
        """`path` as a list: the one source, or each of several."""
        return [self.path] if isinstance(self.path, str) else list(self.path)


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None
    """Optimizer steps; null: as many as `epochs` takes."""
    epochs: float = 1.0
    """Passes over the data when max_steps is null."""
    micro_batch_size: int = 4
    """Examples per forward/backward."""
    grad_accum: int = 4
    """Micro-batches per optimizer step (batch = micro_batch_size x grad_accum)."""
    lr: float = 3e-4
    """Peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to 0 (constant: no decay)."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr: step s gets s/W of the rate (the first step 0), as transformers' schedules."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    max_grad_norm: float = 1.0
    """Clip the adapter gradients' global norm (0: off)."""
    optimizer: Optimizer = "adamw"
    """torch AdamW, or bitsandbytes 8-bit / paged AdamW (paged falls back to unpaged on a CPU)."""
    group_by_length: bool = True
    """Within each optimizer step, put rows of similar length in the same micro-batch: less padding, and
    the same step (its loss is normalised over all the step's tokens). Helps when grad_accum > 1 (GSM8K at 4 x 4:
    21 % padding becomes 7 %)."""
    gradient_checkpointing: Union[bool, Literal["auto"]] = True
    """Recompute activations in backward (non-reentrant): much less memory, ~30% more compute. `auto`:
    only when `qadapt plan` says the run would not fit in half the memory there is without it."""
    shared_dropout_masks: bool = False
    """CPU only, a speed trick that changes the math: the adapters that read one input (q, k, v; gate, up)
    drop the same elements, one mask drawn instead of three (what it saves: docs/benchmarks/training.md). Off:
    one mask per adapted layer, as PEFT draws them."""
    seed: int = 42
    """Seeds adapter init, dropout and data order."""
    log_every: int = 1
    """Steps between metrics.jsonl rows."""
    eval_every: int = 50
    """Steps between eval-loss measurements on the held-out slice (0: only at the end)."""
    save_every: int = 100
    """Steps between full checkpoints (adapter, optimizer, RNG and data position; 0: none, only the
    final adapter). A run resumes from its latest with `qadapt train RECIPE --resume`."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep; older ones are deleted once a newer one is complete."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get every logged row too, through accelerate: `tensorboard` (into the run's
    tensorboard/), `wandb`, `mlflow`, `comet_ml`, `aim`, `clearml`, `dvclive`, `swanlab`, `trackio`; each reads
    its usual environment (WANDB_MODE, MLFLOW_TRACKING_URI, ...). metrics.jsonl is written either way."""
    tensorboard: bool = False
    """The older spelling of `report_to: [tensorboard]`."""


@dataclass
class EvalConfig:
    sets: list[str] = field(default_factory=list)
    """Sets to score when training ends, as for `qadapt eval --data` (math sets, or CoNLL files for
    token classification; `PATH@N`: its first N problems); empty: none. Results go to the run's eval/, the
    accuracy (or entity F1) into summary.json."""
    limit: Optional[int] = None
    """Only the first N problems of each set."""
    batch_size: int = 64
    """Problems decoded together (lower it if memory runs short)."""
    max_new_tokens: int = 256
    """Longest answer in tokens."""
    strict: bool = False
    """Read only the number (or letter) after "The answer is" instead of the paper's last number."""


@dataclass
class GRPOConfig:
    group_size: int = 8
    """task grpo: completions sampled per prompt (G); each one's advantage is its reward against its group's.
    A step samples train.micro_batch_size × train.grad_accum prompts, a micro-batch holds micro_batch_size × G
    completions."""
    loss: PolicyLossKind = "grpo"
    """task grpo: `grpo` (each completion's mean token loss, advantages divided by the group's reward std),
    `dr_grpo` (no std scaling; token sums over completions × max_new_tokens: no length bias) or `dapo` (no std
    scaling; the mean over every token of the step)."""
    beta: float = 0.0
    """task grpo: weight of the KL penalty to the reference policy, the same quantized base with the adapters
    switched off (0: none, and no reference pass)."""
    rewards: list[str] = field(default_factory=lambda: ["correct"])
    """task grpo: what a completion earns, summed: `correct` (1 when the answer the evaluation reads is right),
    `format` (1 when it says "The answer is ..."), `length` (−tokens / max_new_tokens), or a function of yours
    as `module:function`, called with (prompts, completions, answers) and returning one number per completion."""
    reward_weights: Optional[list[float]] = None
    """task grpo: one weight per reward, in order; null: 1 each."""
    max_new_tokens: int = 256
    """task grpo: longest sampled completion in tokens."""
    temperature: float = 1.0
    """task grpo: sampling temperature (the log-probabilities trained are of the tempered distribution)."""
    top_p: float = 1.0
    """task grpo: sample among the most likely tokens whose probabilities sum to top_p (1: all)."""
    top_k: int = 0
    """task grpo: sample among the k most likely tokens (0: all)."""
    iterations: int = 1
    """task grpo: optimizer steps per rollout (μ): a step that samples is followed by iterations − 1 more on
    the same completions, whose importance ratio to the sampling policy is clipped (grpo.epsilon)."""
    epsilon: float = 0.2
    """task grpo: the clip below (and, without epsilon_high, above) an importance ratio of 1; matters only
    when iterations > 1."""
    epsilon_high: Optional[float] = None
    """task grpo: the clip above a ratio of 1 (DAPO's clip-higher: 0.28); null: epsilon."""
    sampling_rounds: Optional[int] = None
    """task grpo: DAPO's dynamic sampling: groups whose completions all earned one reward teach nothing, so a
    step samples fresh problems in their place, up to this many rounds in all, then trains on the groups that
    differ (topped up with uniform ones if still short). null: 3 with loss dapo, else 1 (no refill)."""

    def rounds(self) -> int:
        """Sampling rounds a step may take."""
        if self.sampling_rounds is not None:
            return self.sampling_rounds
        return 3 if self.loss == "dapo" else 1


@dataclass
class PreferenceConfig:
    loss: PreferenceLossKind = "dpo"
    """task preference: `dpo` (the chosen answer's log-probability ratio to the reference's, against the
    rejected one's), `ipo` (the same per token, squared toward 1/(2β)), `orpo` (no reference: the chosen
    answer's own loss plus an odds-ratio term) or `simpo` (no reference: mean log-probabilities per token,
    with a target margin)."""
    beta: float = 0.1
    """task preference: how strongly the pair's margin is pushed (dpo, ipo: the KL strength toward the
    reference; orpo: the odds-ratio term's weight; simpo: the reward scale, 2 to 10 in its paper)."""
    label_smoothing: float = 0.0
    """task preference: with dpo and simpo, the share of pairs taken as possibly flipped (conservative DPO)."""
    simpo_gamma: float = 0.5
    """task preference: with simpo, the target reward margin γ."""
    sft_weight: float = 0.0
    """task preference: with dpo, ipo or simpo, the weight α of the chosen answer's own loss (its mean NLL per
    token) added to each pair's: RPO, which keeps DPO from lowering the chosen answers with the rejected ones
    (Pang et al. 2024; 1.0 in its paper). orpo has this term already."""


@dataclass
class Recipe:
    task: Task = "causal-lm"
    """`causal-lm` (instruction tuning a decoder), `token-classification` (tagging words, e.g. NER, with an
    encoder such as BERT; the head is trained with the adapters), `grpo` (a decoder learning from rewards on
    its own sampled answers to math problems; see the `grpo` keys) or `preference` (a decoder learning from
    pairs of a preferred and a rejected answer; see the `preference` keys)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterSpec = field(default_factory=LowRankSpec)
    """Which adapter to train, and where: its `kind` decides which of the keys below apply."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    output_dir: str = "runs/run"
    """Run directory: resolved recipe, adapter, checkpoints, metrics."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `section.key=value` overrides, check everything, return a Recipe."""
    path = Path(path)
    if not path.is_file():
        raise QadaptError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise QadaptError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise QadaptError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    return recipe_from_dict(raw, overrides, source=str(path))


def recipe_from_dict(raw: dict, overrides: list[str] = (), source: str = "recipe") -> Recipe:
    problems: list[str] = []
    raw = _apply_overrides(raw, overrides, problems)
    recipe = _build(Recipe, raw, "", problems)
    problems += _range_problems(recipe)
    if problems:
        if len(problems) == 1:
            raise QadaptError(f"{source}: {problems[0]}")
        raise QadaptError(f"{source} has {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return recipe


def adapter_section(saved: dict, source: str) -> AdapterSpec:
    """The adapter section kept in an adapter_config.json (beside its other keys), checked as a recipe's is."""
    names = {f.name for spec in SPECS for f in fields(spec)}
    return recipe_from_dict({"adapter": {k: v for k, v in saved.items() if k in names}}, source=source).adapter


# Keys that change how a run is logged, saved or scored, not what it trains.
NEUTRAL_KEYS = {"output_dir", "data.bad_rows", "train.log_every", "train.eval_every", "train.save_every",
                "train.keep_checkpoints", "train.tensorboard", "train.report_to"}


def training_differences(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """The differences that train another model: every one but the neutral keys and the eval section."""
    return [(key, before, after) for key, before, after in recipe_differences(old, new)
            if key not in NEUTRAL_KEYS and not key.startswith("eval.")]


def recipe_differences(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """(section.key, old value, new value) for every key whose value differs."""
    def flat(recipe: Recipe) -> dict[str, Any]:
        rows = {}
        for section, value in recipe.to_dict().items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            rows.update({f"{section}.{key}" if key else section: inner for key, inner in items})
        return rows

    before, after = flat(old), flat(new)
    keys = [*before, *(key for key in after if key not in before)]  # another adapter kind has other keys
    return [(key, before.get(key), after.get(key)) for key in keys if before.get(key) != after.get(key)]


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe resolved, as YAML: what `qadapt check` prints and a run keeps."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(recipe_yaml(recipe))


def _apply_overrides(raw: dict, overrides: list[str], problems: list[str]) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not of the form section.key=value")
            continue
        *sections, leaf = key.strip().split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {section!r} is not a section")
                break
        else:
            try:
                value = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError:
                problems.append(f"override {item!r}: the value is not valid YAML")
                continue
            # A mapping given for a section (`adapter={kind: series, placement: mlp}`) sets those keys in it.
            both_mappings = isinstance(value, dict) and isinstance(node.get(leaf), dict)
            node[leaf] = {**node[leaf], **value} if both_mappings else value
    return raw


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, recording every unknown key and bad value."""
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a mapping, got {raw!r}")
        return cls()
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in raw:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            problems.append(f"unknown key '{prefix}{key}'{hint}; valid keys in {where}: {', '.join(known)}")
    values = {}
    for name in known:
        if name not in raw:
            continue
        hint = hints[name]
        if _is_tagged_union(hint):
            values[name] = _build_tagged(hint, raw[name], f"{prefix}{name}.", problems)
            continue
        if is_dataclass(hint):
            values[name] = _build(hint, raw[name], f"{prefix}{name}.", problems)
            continue
        value, problem = _coerce(raw[name], hint)
        if problem:
            problems.append(f"{prefix}{name}: {problem}")
        else:
            values[name] = value
    return cls(**values)


def _is_tagged_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType) and all(is_dataclass(a) for a in get_args(hint))


# A saved run lists every adapter key of the flat section earlier versions wrote; a sweep's grid may switch
# the kind of a recipe that sets the other kinds' keys. Those keys are read past, as they always were,
# except one that would silently change training.
REFUSED_FOR_OTHER_KINDS = {"lr_ratio": 1.0}


def _build_tagged(hint: Any, raw: Any, prefix: str, problems: list[str]) -> Any:
    """One member of a union of dataclasses, chosen by the mapping's `kind` (the adapter section)."""
    where = prefix.rstrip(".")
    members = get_args(hint)
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a mapping, got {raw!r}")
        return members[0]()
    kind = raw.get("kind", members[0]().kind)  # the first member's default kind: lora
    try:
        cls = spec_class(kind)
    except QadaptError as error:
        problems.append(f"{prefix}kind: {error}")
        return members[0]()
    own = {f.name for f in fields(cls)}
    others = {f.name: member for member in members for f in fields(member) if f.name not in own}
    for key in others.keys() & raw.keys():  # read past, but a value of the wrong type is still named
        _, problem = _coerce(raw[key], get_type_hints(others[key])[key])
        if problem:
            problems.append(f"{prefix}{key}: {problem}")
    for key, default in REFUSED_FOR_OTHER_KINDS.items():
        if key in others and raw.get(key, default) != default:
            problems.append(f"{prefix}{key} applies to {_kinds_with(members, key)} adapters, not to a {kind} adapter")
    return _build(cls, {k: v for k, v in raw.items() if k not in others}, prefix, problems)


def _kinds_with(members: tuple, key: str) -> str:
    kinds = [k for member in members if key in {f.name for f in fields(member)}
             for k in get_args(get_type_hints(member)["kind"])]
    return " and ".join(kinds)


def _coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """Return (value, None) if `value` fits type `hint`, else (None, what is allowed)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        allowed = []
        for inner in (a for a in args if a is not type(None)):
            fitted, problem = _coerce(value, inner)
            if problem is None:
                return fitted, None
            literal = get_origin(inner) is Literal
            allowed.append(f"one of {', '.join(map(str, get_args(inner)))}" if literal else problem.partition(", got")[0])
        return None, f"{' or '.join(allowed)}, got {value!r}"
    if origin is Literal:
        if value in args:
            return value, None
        return None, f"{value!r} is not one of {', '.join(map(str, args))}"
    if origin is list and args == (float,):
        value = value if isinstance(value, list) else [value]
        fitted = [_coerce(v, float) for v in value]
        if any(problem for _, problem in fitted):
            return None, f"expected a list of numbers, got {value!r}"
        return [v for v, _ in fitted], None
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, f"expected a list of names, got {value!r}"
        return value, None
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, f"expected true or false, got {value!r}")
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (None, f"expected a whole number, got {value!r}")
    if hint is float:
        # YAML 1.1 reads `3e-4` (no dot) as a string: accept any text that is a number.
        try:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value), None
        except (TypeError, ValueError, OverflowError):
            return None, f"expected a finite number, got {value!r}"
    if hint is str:
        ok = isinstance(value, str) and value != ""
        return (value, None) if ok else (None, f"expected text, got {value!r}")
    raise TypeError(f"recipe field type {hint} has no checker")


def _range_problems(r: Recipe) -> list[str]:
    checks = [
        *_adapter_problems(r.adapter),
        ("data.path", len(r.data.sources) > 0, "must name a data source, or a list of them"),
        ("data.cutoff_len", r.data.cutoff_len >= 8, "must be at least 8 tokens"),
        ("data.chat_template", r.data.chat_template is None or r.data.template == "chat",
         "applies with data.template: chat"),
        ("data.thinking", r.data.thinking is None or r.data.template == "chat", "applies with data.template: chat"),
        ("data.multiple_choice", 0 <= r.data.multiple_choice <= 1, "must be in [0, 1]"),
        ("data.max_examples", r.data.max_examples is None or r.data.max_examples >= 1, "must be at least 1"),
        ("data.val_size", r.data.val_size >= 0, "must be 0 or more"),
        ("train.max_steps", r.train.max_steps is None or r.train.max_steps >= 1, "must be at least 1, or null"),
        ("train.epochs", r.train.epochs > 0, "must be positive"),
        ("train.micro_batch_size", r.train.micro_batch_size >= 1, "must be at least 1"),
        ("train.grad_accum", r.train.grad_accum >= 1, "must be at least 1"),
        ("train.lr", r.train.lr > 0, "must be positive"),
        ("train.warmup_steps", r.train.warmup_steps >= 0, "must be 0 or more"),
        ("train.weight_decay", r.train.weight_decay >= 0, "must be 0 or more"),
        ("train.max_grad_norm", r.train.max_grad_norm >= 0, "must be 0 (off) or more"),
        ("train.log_every", r.train.log_every >= 1, "must be at least 1"),
        ("train.eval_every", r.train.eval_every >= 0, "must be 0 (end only) or more"),
        ("train.save_every", r.train.save_every >= 0, "must be 0 (end only) or more"),
        ("train.keep_checkpoints", r.train.keep_checkpoints >= 1, "must be at least 1"),
        *[("train.report_to", name in TRACKERS, f"{name!r} is not one of {', '.join(TRACKERS)}")
          for name in r.train.report_to],
        ("eval.limit", r.eval.limit is None or r.eval.limit >= 1, "must be at least 1, or null"),
        ("eval.batch_size", r.eval.batch_size >= 1, "must be at least 1"),
        ("eval.max_new_tokens", r.eval.max_new_tokens >= 1, "must be at least 1"),
        *_grpo_problems(r),
        *_preference_problems(r),
    ]
    return [f"{key} {message}" for key, ok, message in checks if not ok]


def _adapter_problems(a: AdapterSpec) -> list[tuple[str, bool, str]]:
    checks = [("adapter.dropout", 0 <= a.dropout < 1, "must be in [0, 1)"),
              ("adapter.targets", a.targets is None or len(a.targets) > 0, "must name a module, or be null")]
    if isinstance(a, LowRankSpec):
        return checks + [("adapter.rank", a.rank >= 1, "must be at least 1"),
                         ("adapter.alpha", a.alpha > 0, "must be positive"),
                         ("adapter.lr_ratio", a.lr_ratio > 0, "must be positive")]
    assert isinstance(a, BottleneckSpec)
    return checks + [
        ("adapter.targets", a.targets is None or a.placement == "linears",
         f"apply to lora, dora and placement: linears, not to a {a.kind} adapter with placement: {a.placement}"),
        ("adapter.bottleneck_size", a.bottleneck_size >= 1, "must be at least 1"),
        ("adapter.scale", a.scale == "learned" or a.scale > 0, "must be positive, or learned"),
    ]


def _untouched_section(r: Recipe, task: str) -> list[tuple[str, bool, str]]:
    """A task's own section (named as the task) keeps its defaults in a recipe of another task."""
    section = getattr(r, task)
    default = type(section)()
    return [(f"{task}.{f.name}", getattr(section, f.name) == getattr(default, f.name), f"applies with task: {task}")
            for f in fields(section)]


def _preference_problems(r: Recipe) -> list[tuple[str, bool, str]]:
    p = r.preference
    if r.task != "preference":
        return _untouched_section(r, "preference")
    return [
        ("preference.beta", p.beta > 0, "must be positive"),
        ("preference.label_smoothing", 0 <= p.label_smoothing < 0.5, "must be in [0, 0.5)"),
        ("preference.label_smoothing", p.label_smoothing == 0 or p.loss in ("dpo", "simpo"),
         f"applies with loss dpo or simpo, not {p.loss}"),
        ("preference.sft_weight", p.sft_weight >= 0, "must be 0 or more"),
        ("preference.sft_weight", p.sft_weight == 0 or p.loss != "orpo",
         "applies with loss dpo, ipo or simpo: orpo holds the chosen answer's own loss already"),
        ("data.packing", not r.data.packing, "does not apply to task: preference (each pair's sides are scored whole)"),
        ("data.train_on_inputs", not r.data.train_on_inputs,
         "does not apply to task: preference (the pair's answers are compared, not its prompt)"),
    ]


def _grpo_problems(r: Recipe) -> list[tuple[str, bool, str]]:
    g = r.grpo
    if r.task != "grpo":
        return _untouched_section(r, "grpo")
    weights = g.reward_weights
    return [
        ("grpo.group_size", g.group_size >= 2, "must be at least 2 (advantages compare a completion with its group)"),
        ("grpo.beta", g.beta >= 0, "must be 0 (no reference) or more"),
        ("grpo.rewards", len(g.rewards) > 0, "must name at least one reward"),
        *[("grpo.rewards", name in get_args(BuiltInReward) or USER_REWARD.fullmatch(name) is not None,
           f"{name!r} is not one of {', '.join(get_args(BuiltInReward))}, nor a function of yours as module:function")
          for name in g.rewards],
        ("grpo.rewards", len(set(g.rewards)) == len(g.rewards), "names a reward twice"),
        ("grpo.reward_weights", weights is None or len(weights) == len(g.rewards),
         f"must give one weight per reward ({len(g.rewards)}), got {len(weights or [])}"),
        ("grpo.max_new_tokens", g.max_new_tokens >= 1, "must be at least 1"),
        ("grpo.temperature", g.temperature > 0, "must be positive"),
        ("grpo.top_p", 0 < g.top_p <= 1, "must be in (0, 1]"),
        ("grpo.top_k", g.top_k >= 0, "must be 0 (off) or more"),
        ("grpo.iterations", g.iterations >= 1, "must be at least 1"),
        ("grpo.epsilon", 0 < g.epsilon < 1, "must be in (0, 1)"),
        ("grpo.epsilon_high", g.epsilon_high is None or g.epsilon_high > 0, "must be positive, or null"),
        ("grpo.sampling_rounds", g.sampling_rounds is None or g.sampling_rounds >= 1, "must be at least 1, or null"),
        ("data.packing", not r.data.packing, "does not apply to task: grpo (its rows are sampled, not read)"),
    ]
