"""The recall probe's jobs: which rows it runs, with which parameters, under which path (the streams:
`streamkv.evaluation.recall`; the table, finding and figure: `streamkv.probes.recall`)."""

from __future__ import annotations

from streamkv.analysis.grid import RUN_KEYS, model_source, normalise_run, run_id, text_source
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import EvalParams
from streamkv.evaluation.recall import KEY, check, spec


def jobs(config: dict) -> dict[str, dict]:
    """run id -> {"name": the row's name, "eval": its EvalParams as a dict}: every row of `recall.rows` at the
    probe's cap, with its own parameters (the protocol's dtype, device and seed; the evaluator chosen per method)."""
    check(config)
    s, proto = spec(config), config["protocol"]
    rows = {r["name"]: r for r in config.get("runs", []) + config.get("peers", [])}
    out = {}
    for i, name in enumerate(s["rows"]):
        r = normalise_run(rows[name])
        if (r["sink"] or 0) > s["prefix_tokens"]:
            raise StreamkvError(f"config key {KEY}.rows[{i}]: '{name}' keeps {r['sink']} sinks, more than "
                                f"{KEY}.prefix_tokens ({s['prefix_tokens']}): its sinks would hold what it must recall")
        params = EvalParams(model=model_source(config, s["model"]), text=text_source(config, s["filler"]), cap=s["cap"],
                            max_tokens=s["cap"] + 1, prefill=1, dtype=proto["dtype"], device=proto["device"],
                            seed=proto["seed"], evaluator="auto", **{k: r[k] for k in RUN_KEYS})
        try:
            params.resolved()
        except StreamkvError as exc:
            raise StreamkvError(f"config key {KEY}.rows[{i}] ('{name}') at cap {s['cap']}: {exc}") from None
        out[run_id(r)] = {"name": name, "eval": vars(params)}
    return out


def setting(config: dict) -> str:
    """results/recall/<model>/<setting>/: the path spells out what changes every row's streams."""
    s, proto = spec(config), config["protocol"]
    dist = "-".join(f"{d:g}" for d in s["distances"])
    return (f"{s['filler']}_cap{s['cap']}_d{dist}_i{s['instances']}_p{s['passage_tokens']}_{proto['dtype']}_"
            f"{proto['device']}_seed{s['seed']}")
