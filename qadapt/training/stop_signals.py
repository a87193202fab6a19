"""Ctrl-C and SIGTERM stop a training run between steps, after a checkpoint, instead of killing it."""

from __future__ import annotations

import signal
import sys
import threading

import torch

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # the shell's convention: 128 + the signal's number


class StopSignals:
    """Inside the block, the first SIGINT / SIGTERM only records a request to stop; a second one quits at once.

    The loop asks `requested()` after each optimizer step. Signal handlers can only be set from the
    main thread; elsewhere the block changes nothing.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: finishing this step and saving a checkpoint "
              "(send it again to quit at once)", file=sys.stderr, flush=True)

    def requested(self, accelerator) -> str | None:
        """The signal that asked to stop, in any process (each process must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor(0 if self.received is None else 1 + list(EXIT_CODES).index(self.received),
                            device=accelerator.device)
        flag = int(accelerator.reduce(flag, "max"))
        return None if flag == 0 else list(EXIT_CODES)[flag - 1]
