"""Snakemake: tokenise the text once, so every evaluation scores the very same tokens."""

import json
from pathlib import Path

from streamkv.jobio import log_to, write_text
from streamkv.models.sources import encode, load_tokenizer, start_tokens
from streamkv.models.texts import load_text

with log_to(snakemake.log[0]):
    folder = Path(snakemake.input.model).parent
    n = snakemake.params.max_tokens
    text = load_text(snakemake.params.source, min_chars=16 * n)
    tokenizer = load_tokenizer(folder)
    ids = start_tokens(tokenizer) + encode(tokenizer, text)  # (Gemma's BOS first; nothing for SmolLM2)
    write_text(json.dumps({"source": snakemake.params.source, "n_available": len(ids), "ids": ids[:n]}) + "\n",
               snakemake.output[0])
    print(f"{snakemake.params.source}: {len(ids)} tokens, kept {min(n, len(ids))}")
