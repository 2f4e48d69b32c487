"""The peers: other implementations run on the same tokens (kvpress in a worker process, llama.cpp in process),
and whether this machine has them."""
