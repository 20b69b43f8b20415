"""The training wing: warm-up and final LoRA training on the Hugging Face Trainer, and the
checkpoint format the other stages read (see docs/DESIGN.md)."""
