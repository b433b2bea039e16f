"""The recipe's data: binidx files and the magic-prime sample order, streamed jsonl shards, the tokenizer."""


class DataError(ValueError):
    """Bad training data or data flags; the message names the file or value and the fix."""
