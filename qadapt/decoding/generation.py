"""Batched decoding with the KV cache, greedy (evaluation, trying an adapter) or sampled (qadapt.decoding.sampling).

Prompts are sorted by length (so a batch carries little padding), left-padded and decoded greedily
together. A row that has produced EOS or a stop string leaves the batch at once (its KV-cache rows are
dropped), and once a quarter of the places are free the next prompts are prefilled and join the running batch
(continuous batching), so the batch stays full and finished problems stop costing work. Columns of
the cache that no row attends to any more are trimmed. Results come back in the prompts' order.

With a `calculator` (qadapt.decoding.calculator), a row whose newest token ends in "=" is shown to it, and what it
returns (the true result of the expression before the "=") is fed to that row token by token in place of
the model's choice; the model continues from the corrected text, except that its next token may not
go on with the number (it would turn "15.5" into "15.57").

Sampled, each prompt is prefilled once and its KV cache copied into one row per sample; each row draws
from its own random stream (qadapt.decoding.sampling), so the samples do not depend on the batch.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from qadapt.decoding.memory import decode_batch_size, release_cached_memory
from qadapt.decoding.sampling import Sampling, row_generator, sample_tokens
from qadapt.errors import QadaptError


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 16,
                    stop_strings: Sequence[str] = (), add_special_tokens: bool = True,
                    on_done: Callable[[int], None] | None = None,
                    calculator: Callable[[str], str | None] | None = None) -> list[str]:
    """The greedy continuation of every prompt, cut before the first stop string."""
    if not regroupable(model):
        if calculator is not None:
            raise QadaptError(f"the calculator needs qadapt's batched decoder, which cannot regroup "
                              f"{model.config.model_type}'s sequence state (linear attention, short convolutions)")
        return _one_at_a_time(model, tokenizer, prompts, max_new_tokens, stop_strings, add_special_tokens, on_done)
    decoder = _Decoder(model, tokenizer, max_new_tokens, stop_strings, calculator)
    return [c.text for c in _run(decoder, prompts, batch_size, add_special_tokens, on_done)]


def regroupable(model) -> bool:
    """Whether every layer's cache can be regrouped row by row (attention caches can; the fixed-size state
    of a linear-attention layer, as Qwen3.5's, cannot), as the batched decoder does when rows join or leave."""
    from transformers import DynamicCache

    return all(hasattr(layer, "batch_select_indices") for layer in DynamicCache(config=model.config).layers)


def _one_at_a_time(model, tokenizer, prompts, max_new_tokens, stop_strings, add_special_tokens, on_done):
    """Greedy decoding by transformers' generate, one prompt at a time (no padding for a recurrent state to
    run through): for models whose cache the batched decoder cannot regroup."""
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids.to(model.device)
        stops = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=sorted(eos_ids(model, tokenizer)),
                                pad_token_id=tokenizer.pad_token_id, **stops)[0, ids.shape[1]:]
        outputs.append(cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop_strings))
        if on_done:
            on_done(1)
    return outputs


@dataclass(frozen=True)
class Decoded:
    """A decoded continuation: its text (cut before the first stop string) and the token ids the model chose,
    ending with the EOS token when one ended it (what a policy gradient trains on)."""

    text: str
    token_ids: tuple[int, ...]


def sample_generate(model, tokenizer, prompts: Sequence[str], sampling: Sampling, max_new_tokens: int = 256,
                    batch_size: int = 16, stop_strings: Sequence[str] = (), add_special_tokens: bool = True,
                    on_done: Callable[[int], None] | None = None,
                    prompt_keys: Sequence[int] | None = None) -> list[list[str]]:
    """`sampling.samples` sampled continuations of every prompt, cut before the first stop string.

    `prompt_keys` (default: the prompts' positions) seed each prompt's samples: give a problem the same
    key on every call (its index in its data set) and it gets the same samples, whatever else is asked.
    `batch_size` counts rows, one per sample; `on_done` is told of finished samples.
    """
    completions = sample_completions(model, tokenizer, prompts, sampling, max_new_tokens, batch_size, stop_strings,
                                     add_special_tokens, on_done, prompt_keys)
    return [[c.text for c in row] for row in completions]


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], sampling: Sampling, max_new_tokens: int = 256,
                       batch_size: int = 16, stop_strings: Sequence[str] = (), add_special_tokens: bool = True,
                       on_done: Callable[[int], None] | None = None,
                       prompt_keys: Sequence[int] | None = None) -> list[list[Decoded]]:
    """As `sample_generate`, with each sample's token ids beside its text."""
    if not regroupable(model):
        raise QadaptError(f"sampling runs in qadapt's batched decoder, which cannot regroup "
                          f"{model.config.model_type}'s sequence state (linear attention, short convolutions); "
                          "decode greedily")
    keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
    decoder = _Decoder(model, tokenizer, max_new_tokens, stop_strings, sampling=sampling, prompt_keys=keys)
    flat = _run(decoder, prompts, batch_size, add_special_tokens, on_done)
    n = sampling.samples
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def _run(decoder: "_Decoder", prompts: Sequence[str], batch_size: int, add_special_tokens: bool,
         on_done: Callable[[int], None] | None) -> list[Decoded]:
    """Every row's completion, rows numbered prompt × samples + sample: longest prompts first, new ones admitted
    once a quarter of the places are free. The batch is no larger than the KV cache fits in memory
    (qadapt.decoding.memory); on an out-of-memory error it is halved, and the prompts in flight start again
    (greedy and seeded samples give the same text again: nothing is lost)."""
    tokenizer, per_prompt = decoder.tokenizer, decoder.per_prompt
    ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    queue = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    batch_size = decode_batch_size(decoder.model, batch_size, max(map(len, ids), default=0) + decoder.max_new_tokens,
                                   measure=decoder.cache_bytes_of_one_token)
    outputs: list[Decoded] = [Decoded("", ())] * (len(ids) * per_prompt)
    done: set[int] = set()
    while queue or decoder.rows:
        free, admitted = batch_size - len(decoder.rows), []
        try:
            if queue and (free >= max(per_prompt, batch_size // 4) or not decoder.rows):
                take = max(1, free // per_prompt)
                admitted, queue = queue[:take], queue[take:]
                finished = decoder.admit(admitted, [ids[i] for i in admitted])
            else:
                finished = decoder.step()
        except torch.OutOfMemoryError:
            if batch_size <= per_prompt:
                raise
            again = sorted(set(decoder.abandon()) | set(admitted), key=lambda i: len(ids[i]), reverse=True)
            queue, batch_size = again + queue, max(per_prompt, batch_size // 2)
            release_cached_memory(decoder.model.device)
            print(f"out of memory while decoding: {batch_size} rows at a time from now on, "
                  f"{len(again)} prompts started again", file=sys.stderr)
            continue
        finished = [(row, tokens, end) for row, tokens, end in finished if row not in done]
        for row, tokens, end in finished:
            text = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), decoder.stop_strings)
            outputs[row] = Decoded(text, tuple(tokens) + ((end,) if end is not None else ()))
            done.add(row)
        if on_done and finished:
            on_done(len(finished))
    return outputs


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first stop string."""
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | {tokenizer.eos_token_id} - {None}


class _Decoder:
    """The running batch: one KV cache, an attention mask and the tokens generated per row.

    A row is one continuation, numbered prompt index × samples per prompt + sample number.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int, stop_strings: Sequence[str],
                 calculator: Callable[[str], str | None] | None = None, sampling: Sampling | None = None,
                 prompt_keys: Sequence[int] = ()):
        from transformers import DynamicCache

        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.sampling, self.prompt_keys = sampling, prompt_keys
        self.per_prompt = sampling.samples if sampling else 1
        self.generators: dict[int, torch.Generator] = {}  # row -> its random stream, when sampling
        self.calculator = calculator
        self.forced: dict[int, list[int]] = {}  # prompt index -> tokens the calculator writes next
        self.after_result: set[int] = set()  # rows whose last token ended a calculator's result
        self.number_tokens = _number_tokens(tokenizer, model.device) if calculator else None
        self.stop_strings = list(stop_strings)
        self.stop_ids = eos_ids(model, tokenizer)
        self.longest_stop = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop_strings),
                                default=0)
        parameters = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in parameters
        # Only the last position's logits are read: on a prefill the full (rows, width, vocab) logits
        # would be a fifth of the work and gigabytes of memory.
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.cache_name = cache_keyword(model)
        self.new_cache = lambda: _with_room(DynamicCache(config=model.config))
        self.cache = None
        self.rows: list[int] = []  # prompt index of each row
        self.generated: dict[int, list[int]] = {}
        self.mask = self.next_tokens = self.next_positions = None

    def admit(self, indices: list[int], prompts: list[list[int]]) -> list[tuple[int, list[int], int | None]]:
        """Prefill new prompts (left-padded among themselves), decode their first token, join the batch."""
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = self.new_cache()
        logits = self._forward(input_ids, mask, positions, cache)
        n = self.per_prompt
        rows = [index * n + sample for index in indices for sample in range(n)]
        if n > 1:  # every sample of a prompt starts from its one prefill
            copies = torch.arange(len(indices), device=device).repeat_interleave(n)
            cache.batch_select_indices(copies)
            logits, mask, positions = logits[copies], mask[copies], positions[copies]
        for row in rows:
            self.generated[row] = []
            if self.sampling:
                self.generators[row] = row_generator(self.sampling.seed, self.prompt_keys[row // n], row % n)
        next_tokens = self._choose(logits, rows)
        finished, keep = self._record(rows, next_tokens)
        if keep:
            kept = torch.tensor(keep, device=device)
            cache.batch_select_indices(kept)
            joining = ([rows[r] for r in keep], mask[kept], next_tokens[kept], positions[kept, -1:] + 1)
            if self.rows:
                self._join(cache, *joining)
            else:
                self.cache, (self.rows, self.mask, self.next_tokens, self.next_positions) = cache, joining
        return finished

    def step(self) -> list[tuple[int, list[int], int | None]]:
        """Decode one more token for every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self._forward(self.next_tokens[:, None], self.mask, self.next_positions, self.cache)
        self.next_tokens = self._choose(logits, self.rows)
        self.next_positions = self.next_positions + 1
        finished, keep = self._record(self.rows, self.next_tokens)
        if finished:
            self._keep_rows(keep)
        return finished

    def cache_bytes_of_one_token(self) -> int:
        """The KV cache one token takes, measured by prefilling one token."""
        cache = self.new_cache()
        token = torch.full((1, 1), self.tokenizer.pad_token_id, device=self.model.device)
        self._forward(token, torch.ones_like(token), torch.zeros_like(token), cache)
        return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)
                   if isinstance(t, torch.Tensor))

    def abandon(self) -> list[int]:
        """Drop every row in flight and its cache (after an out-of-memory error); return their prompts."""
        prompts = list(dict.fromkeys(row // self.per_prompt for row in self.rows))
        self.cache, self.rows, self.mask, self.next_tokens, self.next_positions = None, [], None, None, None
        self.generated.clear()
        self.generators.clear()
        self.forced.clear()
        self.after_result.clear()
        return prompts

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        """The last position's logits of each row."""
        kwargs = {self.cache_name: cache, **({"position_ids": positions} if self.takes_positions else {}),
                  **self.last_logits_only}
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=True, **kwargs).logits[:, -1]

    def _pick(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if self.sampling is None:
            return logits.argmax(-1)
        return sample_tokens(logits, self.sampling, [self.generators[row] for row in rows]).to(logits.device)

    def _choose(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The next token of each row: the greedy or sampled choice, or what the calculator writes."""
        if not self.calculator:
            return self._pick(logits, rows)
        for position, index in enumerate(rows):
            if index in self.after_result:
                logits[position, self.number_tokens] = float("-inf")
                self.after_result.discard(index)
        next_tokens = self._pick(logits, rows)
        for position, index in enumerate(rows):
            if self.forced.get(index):
                next_tokens[position] = self.forced[index].pop(0)
                if not self.forced[index]:
                    self.after_result.add(index)
        return next_tokens

    def _record(self, rows: list[int], next_tokens: torch.Tensor
                ) -> tuple[list[tuple[int, list[int], int | None]], list[int]]:
        """Append each row's new token: (row, tokens, the EOS token that ended it or None) of the rows that
        ended, positions of the rest."""
        finished, keep = [], []
        for position, (index, token) in enumerate(zip(rows, next_tokens.tolist())):
            tokens = self.generated[index]
            if token not in self.stop_ids:
                tokens.append(token)
                self._calculate(index, tokens)
            if token in self.stop_ids or len(tokens) >= self.max_new_tokens or self._stopped(tokens):
                finished.append((index, self.generated.pop(index), token if token in self.stop_ids else None))
                self.generators.pop(index, None)
                self.forced.pop(index, None)
                self.after_result.discard(index)
            else:
                keep.append(position)
        return finished, keep

    def _calculate(self, index: int, tokens: list[int]) -> None:
        """After a token ending in "=", queue the calculator's result for the row (unless one is pending)."""
        if not self.calculator or self.forced.get(index) or not self.tokenizer.decode(tokens[-1:]).endswith("="):
            return
        result = self.calculator(self.tokenizer.decode(tokens, skip_special_tokens=True))
        if result:
            self.forced[index] = self.tokenizer(result, add_special_tokens=False)["input_ids"]

    def _stopped(self, tokens: list[int]) -> bool:
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(tokens[-(self.longest_stop + 2):])
        return any(s in tail for s in self.stop_strings)

    def _keep_rows(self, keep: list[int]) -> None:
        self.rows = [self.rows[r] for r in keep]
        if not keep:
            return
        rows = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(rows)
        self.mask, self.next_tokens = self.mask[rows], self.next_tokens[rows]
        self.next_positions = self.next_positions[rows]
        # Trim the cache columns on the left that no remaining row attends to (padding of rows that left).
        first = int(self.mask.any(dim=0).float().argmax())
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def _join(self, cache, indices, mask, next_tokens, next_positions) -> None:
        """Append prefilled rows to the running batch, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], mask.shape[1])
        running_pad, new_pad = width - self.mask.shape[1], width - mask.shape[1]
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([F.pad(old.keys, (0, 0, running_pad, 0)), F.pad(new.keys, (0, 0, new_pad, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, running_pad, 0)), F.pad(new.values, (0, 0, new_pad, 0))])
        self.mask = torch.cat([F.pad(self.mask, (running_pad, 0)), F.pad(mask, (new_pad, 0))])
        self.rows += list(indices)
        self.next_tokens = torch.cat([self.next_tokens, next_tokens])
        self.next_positions = torch.cat([self.next_positions, next_positions])


def _number_tokens(tokenizer, device) -> torch.Tensor:
    """Ids of the tokens that would go on with a number just written: "7", "57", ".5", ",000"."""
    vocabulary = range(len(tokenizer))
    return torch.tensor([i for i in vocabulary if re.match(r"[.,]?\d", tokenizer.decode([i]))], device=device)


def cache_keyword(model) -> str:
    """The keyword the model's forward takes its KV cache by: `cache` since transformers 5 renamed it
    (`past_key_values` still works there but prints a deprecation warning on the user's screen)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _with_room(cache):
    """`cache` with its layers swapped for ones that keep every column and append into spare room.

    Sliding-window layers (Mistral's) become full ones too: the attention mask still applies the
    window, and the decoder, which selects, trims and joins rows itself, cannot keep their bookkeeping
    of dropped columns right (a 2-row batch of 3 prompts failed with a mask of the wrong width).
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    roomy = _roomy_layer_class()
    replaced = (DynamicLayer, DynamicSlidingWindowLayer)
    cache.layers = [roomy() if type(layer) in replaced else layer for layer in cache.layers]
    return cache


@functools.cache
def _roomy_layer_class():
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A KV-cache layer that writes each new token into room left at the end of its buffer.

        transformers' DynamicLayer concatenates, copying the whole cache at every decoded token (what
        that cost: docs/benchmarks/decoding.md). `keys` / `values` are views of the filled part; assigning
        them (selecting rows, trimming columns, joining batches) replaces the buffer, and the next token makes
        room again. Each remembers its own filled width, so assigning one never changes what the other reads.
        """

        @property
        def keys(self):
            return _filled(self._keys, self._keys_filled)

        @keys.setter
        def keys(self, tensor):
            self._keys, self._keys_filled = tensor, _columns(tensor)

        @property
        def values(self):
            return _filled(self._values, self._values_filled)

        @values.setter
        def values(self, tensor):
            self._values, self._values_filled = tensor, _columns(tensor)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self._keys_filled, self._keys_filled + key_states.shape[-2]
            if self._keys.dim() != 4 or end > self._keys.shape[-2]:
                room = end + max(64, end // 2)  # grows by half: a copy every few dozen tokens, not every one
                self._keys = _grown(self.keys, key_states, room)
                self._values = _grown(self.values, value_states, room)
            self._keys[..., start:end, :] = key_states
            self._values[..., start:end, :] = value_states
            self._keys_filled = self._values_filled = end
            return self.keys, self.values

    return RoomyLayer


def _columns(tensor: torch.Tensor | None) -> int:
    return tensor.shape[-2] if tensor is not None and tensor.dim() == 4 else 0


def _filled(buffer: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The first `length` columns of a (batch, heads, columns, dim) buffer; an empty or absent one as it is."""
    return buffer[..., :length, :] if buffer is not None and buffer.dim() == 4 else buffer


def _grown(filled: torch.Tensor | None, new: torch.Tensor, room: int) -> torch.Tensor:
    """A buffer of `room` columns holding the `filled` ones first."""
    buffer = new.new_empty(*new.shape[:2], room, new.shape[-1])
    if filled is not None and filled.dim() == 4 and filled.shape[-2]:
        buffer[..., :filled.shape[-2], :] = filled
    return buffer
