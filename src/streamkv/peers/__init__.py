"""The peers: other implementations run on the same tokens (kvpress and llama.cpp, each in a worker process),
and whether this machine has them."""
