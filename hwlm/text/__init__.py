"""Text in and out: loading tokenizers, incremental detokenization."""
