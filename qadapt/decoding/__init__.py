"""Batched greedy decoding with a KV cache, and the calculator it can consult; tasks and tools build on it."""
