"""`streamkv bench`: side-by-side step timings (overhead, compile, weights, memory, evaluator) and their tables."""
