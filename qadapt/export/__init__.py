"""Taking a run elsewhere: its adapter merged into the base, a PEFT adapter folder, a GGUF file."""
