"""KV caches with attention sinks: eviction policies, budgets, RoPE re-rotation, the streaming and ring caches,
their compiled step, and `make_cache`, which builds one from a method name."""
