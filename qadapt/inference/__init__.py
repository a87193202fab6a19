"""Using a trained run: the one loader, `qadapt eval`, and many adapters on one loaded base."""
