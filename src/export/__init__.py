"""Exports of our checkpoints to other runtimes' formats (src/export/hf.py: Hugging Face / fla)."""
