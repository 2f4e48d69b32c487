"""The measurement harness: run parameters, the decode loop (the reference for every method), the exact parallel
evaluator, step timing, the recompute baseline and the per-token result format."""
