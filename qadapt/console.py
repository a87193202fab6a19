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


def quiet_known_noise() -> None:
    """Silence what libraries print that is known and harmless here, so a screen shows qadapt's own lines.

    The one place for it: called when qadapt is imported. Real warnings stay.
    """
    import logging
    import warnings

    # On a CPU bitsandbytes looks for an optional hub kernel (`kernels`) at import and warns when it is
    # absent; its built-in CPU kernels are used instead.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # A paged optimizer on a CPU runs unpaged; training says so once in its own line (quant.unpaged_here).
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)
