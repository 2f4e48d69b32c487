"""The recall probe's streams and their scoring: a passage copied after D tokens, a pass key asked for after D
tokens (the table, finding and figure: `streamkv.probes.recall`).

Perplexity can stay flat while a method forgets everything outside its
window.  This probe puts something in the stream once and asks for it D
tokens later, for D in multiples of the cap (by default cap/2, cap, 2 cap,
8 cap), over seeded instances:

* copy: a passage of `passage_tokens` tokens from another text than the
  filler, then D filler tokens, then the passage again.  The control stream
  has another passage of the same text and length in place of the first
  occurrence, so the second copy sits at the same position after the same
  filler.  Copy gain (nats) = mean NLL of the second copy (its first token
  left out: nothing announces it) in the control stream minus in the copy
  stream: what the first occurrence is still worth to the model.
* passkey: " The pass key is NNNNN. Remember it." once, D filler tokens, then
  " What is the pass key? The pass key is" and the number: the mean NLL of
  its digit tokens, and exact match (every digit token is the model's top
  guess given the ones before it, which is greedy decoding reproducing it).

D counts the tokens strictly between the end of the first occurrence (the
passage, the sentence with the key) and the start of the second (the passage,
the question).  A filler prefix of `prefix_tokens` tokens opens every stream,
so the sinks are filler, never the thing to recall; a pass key of fewer tokens
gets a longer prefix, so every stream of a batch has one length.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamkv.analysis.stats import MIN_BLOCKS
from streamkv.errors import StreamkvError
from streamkv.models.sources import encode

KEY = "recall"
TASKS = ("copy", "passkey")
DEFAULTS = {"cap": 64, "distances": [0.5, 1, 2, 8], "instances": 20, "passage_tokens": 32, "prefix_tokens": 16,
            "passages": "embedded:shakespeare/the-tempest", "reference": "Ours (strict)", "seed": 0}
NEEDLE = " The pass key is {key}. Remember it."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}."
COLUMNS = ("task", "distance", "instance", "nll", "control_nll", "gain", "exact", "n_targets")


# ----------------------------------------------------------------------------- the config key


def spec(config: dict) -> dict:
    """The `recall` key with its defaults (an error naming the key where it is absent)."""
    if not config.get(KEY):
        raise StreamkvError(f"config key {KEY} is absent; add e.g. `{KEY}: {{model: <a key of models>, filler: "
                            f"<a key of texts>, rows: [<names of runs or peers>]}}` (every key: config/README.md)")
    return {**DEFAULTS, **config[KEY]}


def distances(s: dict) -> list[int]:
    """D in tokens: each multiple of the cap, rounded."""
    return [int(round(m * s["cap"])) for m in s["distances"]]


def check(config: dict) -> None:
    """What the schema cannot say: the model, filler and rows exist, and the distances are whole and distinct."""
    if not config.get(KEY):
        return
    s = spec(config)
    for key, known in (("model", config["models"]), ("filler", config["texts"])):
        if s[key] not in known:
            raise StreamkvError(f"config key {KEY}.{key}: unknown '{s[key]}' (known: {', '.join(known)})")
    names = [r["name"] for r in config.get("runs", []) + config.get("peers", [])]
    for i, name in enumerate(s["rows"]):
        if name not in names:
            raise StreamkvError(f"config key {KEY}.rows[{i}]: '{name}' is no row of runs or peers "
                                f"(known: {', '.join(names)})")
    d = distances(s)
    if min(d) < 1 or len(set(d)) < len(d):
        raise StreamkvError(f"config key {KEY}.distances: {s['distances']} x cap {s['cap']} gives {d} tokens; "
                            "they must be distinct and at least 1")
    if s["instances"] < MIN_BLOCKS:
        raise StreamkvError(f"config key {KEY}.instances: {s['instances']} instances give no interval (it needs "
                            f"{MIN_BLOCKS}); raise it to {MIN_BLOCKS} or more")


# ----------------------------------------------------------------------------- the streams


def build(tokenizer, filler: list[int], passages: list[int], s: dict) -> list[dict]:
    """Every batch of streams: one per (task, D), each {"task", "distance", "ids" [B, L], "targets" (per stream, the
    token positions scored), "instance" [B], "control" [B] (copy: the control streams, after the copy streams)}.

    `filler`, `passages`: token ids of the two texts.  Instance i draws its passage, its control passage, its
    filler stretch and its key from a generator seeded with (seed, i), whatever D: across D only the distance
    changes.
    """
    n, p, pre = s["instances"], s["passage_tokens"], s["prefix_tokens"]
    ds = distances(s)
    if len(passages) < 3 * p:
        raise StreamkvError(f"config key {KEY}.passages: {len(passages)} tokens hold too few passages of {p}")
    drawn = []
    for i in range(n):
        rng = np.random.default_rng([s["seed"], i])
        first = other = int(rng.integers(0, len(passages) - p + 1))
        while abs(other - first) < p:  # the control passage shares no token position with the passage
            other = int(rng.integers(0, len(passages) - p + 1))
        key = int(rng.integers(10_000, 100_000))
        drawn.append((first, other, encode(tokenizer, NEEDLE.format(key=key)),
                      encode(tokenizer, ANSWER.format(key=key)), rng))
    longest = max(len(needle) + len(answer) for _, _, needle, answer, _ in drawn)
    question = encode(tokenizer, QUESTION)
    need = pre + longest + max(ds) + 2 * p
    if len(filler) <= need:
        raise StreamkvError(f"config key {KEY}.filler: the text has {len(filler)} tokens, fewer than the {need} "
                            f"a stream needs at D = {max(ds)}; lower {KEY}.distances or {KEY}.cap")
    starts = [int(rng.integers(0, len(filler) - need)) for *_, rng in drawn]
    out = []
    for d in ds:
        copy, control, keyed, key_targets = [], [], [], []
        for (first, other, needle, answer, _), f in zip(drawn, starts):
            passage, decoy = passages[first : first + p], passages[other : other + p]
            head, gap = filler[f : f + pre], filler[f + pre : f + pre + d]
            copy.append(head + passage + gap + passage)
            control.append(head + decoy + gap + passage)
            extra = longest - len(needle) - len(answer)  # a shorter key: a longer prefix, so all streams align
            head, gap = filler[f : f + pre + extra], filler[f + pre + extra : f + pre + extra + d]
            stream = head + needle + gap + question + answer
            keyed.append(stream)
            key_targets.append(np.array([len(stream) - len(answer) + j for j, tok in enumerate(answer)
                                         if any(c.isdigit() for c in tokenizer.decode([tok]))]))
        second = pre + p + d  # where the second copy starts; its first token is not scored
        out.append({"task": "copy", "distance": d, "ids": np.array(copy + control),
                    "targets": [np.arange(second + 1, second + p)] * (2 * n),
                    "instance": np.tile(np.arange(n), 2), "control": np.repeat([False, True], n)})
        out.append({"task": "passkey", "distance": d, "ids": np.array(keyed), "targets": key_targets,
                    "instance": np.arange(n), "control": np.zeros(n, dtype=bool)})
    return out


def score(batches: list[dict], scorer) -> pd.DataFrame:
    """Per instance and D: the copy's and the control's mean NLL on the second copy and the gain, or the pass key's
    digit NLL and exact match.  `scorer(ids) -> (nll [B, L-1], hit [B, L-1])`: the run's method."""
    rows = []
    for b in batches:
        nll, hit = scorer(b["ids"])
        mean = np.array([nll[r, t - 1].mean() for r, t in enumerate(b["targets"])])  # nll[j]: token j + 1
        exact = np.array([hit[r, t - 1].all() for r, t in enumerate(b["targets"])])
        n_targets = len(b["targets"][0])
        if b["task"] == "copy":
            copy, control = mean[~b["control"]], mean[b["control"]]
            for i, inst in enumerate(b["instance"][~b["control"]]):
                rows.append(("copy", b["distance"], int(inst), copy[i], control[i], control[i] - copy[i], None,
                             n_targets))
        else:
            for i, inst in enumerate(b["instance"]):
                rows.append(("passkey", b["distance"], int(inst), mean[i], None, None, bool(exact[i]),
                             len(b["targets"][i])))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def evaluate_recall(loaded, params, s: dict, filler_source: str, progress: bool = False) -> tuple[dict, pd.DataFrame]:
    """One row of the probe: its method (`params`, at the probe's cap) over every batch of streams.

    Returns the record (status, parameters, seconds, provenance) and the per-instance frame (`COLUMNS`).
    """
    import time

    from streamkv.evaluation.streams import score_streams
    from streamkv.models.texts import load_text
    from streamkv.provenance import collect

    tok = loaded.tokenizer
    batches = build(tok, encode(tok, load_text(filler_source)), encode(tok, load_text(s["passages"])), s)
    started = time.perf_counter()
    p = params.resolved()
    frame = score(batches, lambda ids: score_streams(loaded, ids, p, progress, f"recall: {p.method}"))
    model = loaded.model
    record = {"status": "ok", "error": None, "params": p.record(), KEY: s, "seconds": time.perf_counter() - started,
              "streams": int(sum(b["ids"].shape[0] for b in batches)),
              "tokens": int(sum(b["ids"].size for b in batches)),
              "meta": collect(next(model.parameters()).device, next(model.parameters()).dtype, p.seed)}
    return record, frame
