"""Messages for the user, printed once however many processes `accelerate launch` started."""

from __future__ import annotations

import os
import sys


def say(message: str, warning: bool = False) -> None:
    """Print `message` (to stderr as a warning) on the first process only (torchrun sets RANK)."""
    if os.environ.get("RANK", "0") != "0":
        return
    if warning:
        print(f"warning: {message}", file=sys.stderr)
    else:
        print(message)
