"""qadapt: quantized, low-resource fine-tuning with the LLM-Adapters family (arXiv 2304.01933).

Importing qadapt is cheap: torch, transformers and bitsandbytes load only when a command needs them.
"""

from qadapt.console import quiet_known_noise

__version__ = "0.1.0"
quiet_known_noise()
