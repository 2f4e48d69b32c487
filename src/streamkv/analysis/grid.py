"""The experiment grid of a pipeline config, as jobs with readable, parameter-encoding paths.

A config names models and texts, one protocol (cap, tokens, prefill, ...),
the baseline's sink count, a method table (`runs`, evaluated on every model and
text), ablations (one parameter swept over `values`, or a `grid` of several) and
probes (grids with a fixed purpose and their own tables).  A model may run on some
texts only, with a ceiling on every job's tokens, and an entry on some models or
texts only.  Each distinct evaluation is
one job whose output path spells out every parameter, so editing the grid
invalidates exactly the changed configurations; two table rows with the same
parameters share one job.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from streamkv import methods, probes
from streamkv.analysis.stats import SUPERIORITY
from streamkv.cache.budget import Budget
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import LOOP_ONLY_WEIGHTS, SINK_LAYERS, WEIGHTS, BenchConfig, EvalParams

NAMED_ROWS = "rows"  # a finding's group that pairs two named rows of the method table or the peers

RUN_KEYS = ("method", "sink", "compress_every", "cache_slack", "max_drop", "softlite_mode", "overlap", "refresh",
            "positions", "weights", "profile", "sink_layers")
PROTOCOL_KEYS = ("cap", "max_tokens", "prefill", "dtype", "device", "seed")
# Methods whose cache keeps what start_recent (positions "cache") keeps, at the same in-cache distances.
SAME_SCHEDULE_AS_START_RECENT = ("mit", "ring")
RUN_DEFAULTS = {**{k: methods.OPTION_DEFAULTS[k] for k in RUN_KEYS if k in methods.OPTION_DEFAULTS},
                "weights": WEIGHTS[0], "profile": False, "sink_layers": SINK_LAYERS[0]}
PROBES = tuple(probes.PROBES)  # the probe registry's names (streamkv.probes)


def normalise_run(run: dict) -> dict:
    """The run's parameters with defaults filled in (sink: 4, or 0 for window, none for dense)."""
    out = {**RUN_DEFAULTS, **{k: run[k] for k in RUN_KEYS if k in run}}
    if not (out["cache_slack"] or out["max_drop"]):
        out["softlite_mode"] = "naive"  # the modes differ only under softlite: one job for both
    method = methods.get(out["method"])
    if method.dense:
        out["sink"] = None
    else:
        out.setdefault("sink", method.default_sink)
    return out


def quality_run(run: dict, evaluator: str = "auto") -> dict:
    """The run whose per-token NLLs this row's are: rows with the same attention schedule share one evaluation.

    Strict `mit` and `ring` (and the lazy ring) keep the keys `start_recent` keeps, at the same distances, and
    under Auto-cap `overlap` only moves tokens from the window to the overlap: the parallel evaluator gives
    such rows the same NLLs, so one evaluation serves them all.  With `evaluator: decode` every row runs its
    own loop (that is how the loops are checked against each other).
    """
    r = normalise_run(run)
    r["profile"] = False  # synchronised update timers change no NLL
    if evaluator == "decode" or r["refresh"] or r["weights"] in LOOP_ONLY_WEIGHTS:
        return r
    if r["method"] in SAME_SCHEDULE_AS_START_RECENT:
        r["method"] = "start_recent"
    if r["method"] == "start_recent":
        r["overlap"] = 0
    return r


def run_id(run: dict) -> str:
    """A readable file name holding every parameter that changes the run (the format is the method's record's)."""
    r = {**normalise_run(run), "stride": run.get("stride", 1)}
    weights = f"_w{r['weights']}" if r["weights"] != WEIGHTS[0] else ""
    # (only away from the default, so the files of runs from before the option keep their names)
    layers = f"_sinklayers-{r['sink_layers']}" if r["sink_layers"] != SINK_LAYERS[0] else ""
    return methods.get(r["method"]).run_id(r) + weights + layers + ("_prof" if r["profile"] else "")


def text_source(config: dict, text: str) -> str:
    spec = config["texts"][text]
    return spec if isinstance(spec, str) else spec["source"]


def model_source(config: dict, model: str) -> str:
    """The source of model key `model`: the entry itself, or its `source`."""
    spec = config["models"][model]
    return spec if isinstance(spec, str) else spec["source"]


def model_texts(config: dict, model: str) -> list[str]:
    """The text keys `model` runs on: its `texts`, else every text."""
    spec = config["models"][model]
    return list(spec["texts"]) if isinstance(spec, dict) and "texts" in spec else list(config["texts"])


def model_ceiling(config: dict, model: str) -> int | None:
    """The most tokens any job of `model` evaluates (its `max_tokens`), or None."""
    spec = config["models"][model]
    return spec.get("max_tokens") if isinstance(spec, dict) else None


def max_tokens(config: dict, text: str, model: str | None = None) -> int:
    """Tokens evaluated on `text`: its own `max_tokens` if it sets one, else the protocol's; with `model`, at most
    that model's ceiling."""
    spec = config["texts"][text]
    n = (spec.get("max_tokens", config["protocol"]["max_tokens"]) if isinstance(spec, dict)
         else config["protocol"]["max_tokens"])
    return job_tokens(config, model, n) if model else n


def job_tokens(config: dict, model: str, n: int) -> int:
    """`n` tokens, or the model's ceiling where that is lower."""
    ceiling = model_ceiling(config, model)
    return min(n, ceiling) if ceiling else n


def row_tokens(row_n, text: str) -> int | None:
    """A row's own `max_tokens` on `text`: one number for every text, or a text key -> number mapping (None: the
    text's own)."""
    return row_n.get(text) if isinstance(row_n, dict) else row_n


def setting_id(config: dict, text: str, n: int | None = None, cap: int | None = None) -> str:
    p = config["protocol"]
    n, cap = n or max_tokens(config, text), cap or p["cap"]
    return f"cap{cap}_n{n}_p{min(p['prefill'], cap)}_{p['dtype']}_{p['device']}_seed{p['seed']}"


@dataclass
class Job:
    model: str  # config key
    text: str  # config key
    setting: str
    run: str  # run id
    params: dict  # run parameters (normalised)
    kind: str = "runs"  # "baselines", "runs" (a report row: its timing part) or "quality" (its NLLs)
    labels: list = field(default_factory=list)  # (group, name, order) rows of the report this job fills
    n: int = 0  # tokens evaluated (max_tokens)
    cap: int = 0  # the KV budget (the protocol's, or a sweep's own)
    quality: "Job | None" = None  # for a run: the evaluation that gives its NLLs

    def path(self, suffix: str = "json") -> str:
        return f"results/{self.kind}/{self.model}/{self.text}/{self.setting}/{self.run}.{suffix}"


def eval_params(config: dict, job: Job) -> EvalParams:
    """The job's parameters: a quality job times nothing; a run job times its step; the baseline does both."""
    proto = config["protocol"]
    r = job.params
    timing = 0 if job.kind == "quality" else proto["timing_steps"]
    return EvalParams(
        model=model_source(config, job.model), text=text_source(config, job.text), method=r["method"], cap=job.cap,
        sink=r["sink"], compress_every=r["compress_every"], cache_slack=r["cache_slack"], max_drop=r["max_drop"],
        softlite_mode=r["softlite_mode"], overlap=r["overlap"], refresh=r["refresh"], positions=r["positions"],
        sink_layers=r["sink_layers"],
        max_tokens=job.n, prefill=min(proto["prefill"], job.cap), dtype=proto["dtype"], weights=r["weights"],
        device=proto["device"],
        seed=proto["seed"], profile=r["profile"], evaluator=proto["evaluator"], timing_steps=timing,
        timing_batch=proto["timing_batch"] if timing else 1,
        stride=config["baseline"]["stride"] if job.kind == "baselines" else 1,
    )


def grid_points(spec: dict, key: str) -> list[tuple[str, dict, str]]:
    """(row name, swept values, config location) of a sweep: `values` of the parameter named `key`, or a `grid`."""
    if "grid" in spec:
        params = list(spec["grid"])
        points = itertools.product(*(spec["grid"][p] for p in params))
        return [(", ".join(f"{p}={v}" for p, v in zip(params, values)), dict(zip(params, values)), f"{key}.grid")
                for values in points]
    return [(f"{key}={v}", {key: v}, f"{key}.values[{j}]") for j, v in enumerate(spec["values"])]


def _rows(config: dict):
    """(group, name, order, models, texts, run, where, max_tokens, cap) for the method table, every ablation and
    probe point.

    `models` and `texts` are the entry's own (`models:`, `texts:`), else every model and text (`pairs`: where it
    runs); `max_tokens` is the row's own (a `runs`/`peers` entry or a sweep may set one below its text's), or None;
    `cap` a sweep's own budget (its rows are compared with each other, not with the baseline), or None.
    """
    all_models, all_texts = list(config["models"]), list(config["texts"])
    for section, group in (("runs", "methods"), ("peers", "peers")):
        for i, run in enumerate(config.get(section) or []):
            yield (group, run["name"], i, run.get("models", all_models), run.get("texts", all_texts), run,
                   f"{section}[{i}]", run.get("max_tokens"), None)
    for section in ("ablations", "probes"):
        for key, spec in (config.get(section) or {}).items():
            for j, (name, swept, where) in enumerate(grid_points(spec, key)):
                run = {**spec.get("base", {}), **swept}
                yield (f"{section[:-1]}:{key}", name, j, spec.get("models", all_models), spec.get("texts", all_texts),
                       run, f"{section}.{where}", spec.get("max_tokens"), spec.get("cap"))


def pairs(config: dict, models: list[str], texts: list[str]) -> list[tuple[str, str]]:
    """(model, text) an entry runs on: each of its models on each of its texts that the model runs on."""
    return [(model, text) for model in models for text in texts if text in model_texts(config, model)]


def jobs(config: dict) -> list[Job]:
    """Every evaluation the config asks for: baselines, report rows, shared quality jobs; deduplicated by path.

    A row's job evaluates its NLLs and times its step.  A row whose attention schedule is another run's
    (`quality_run`) only times its step and takes the NLLs of that run: the row of that run where the grid has
    one, else a quality job of its own.  A (model, text) gets its recompute baseline only where some row runs.
    """
    found: dict[tuple, Job] = {}  # by (kind, model, text, setting, run id)
    stride = config["baseline"]["stride"]
    baseline_run = normalise_run({"method": "recompute", "sink": config["baseline"]["sink"]})
    evaluator = config["protocol"]["evaluator"]
    rows = list(_rows(config))
    used = {pair for _, _, _, models, texts, *_ in rows for pair in pairs(config, models, texts)}
    for model in config["models"]:
        for text in config["texts"]:
            if (model, text) not in used:
                continue
            n = max_tokens(config, text, model)
            rid = run_id({**baseline_run, "stride": stride})
            found["baselines", model, text, rid] = Job(model, text, setting_id(config, text, n), rid, baseline_run,
                                                       "baselines", [("baseline", "Baseline (recompute)", -1)], n=n,
                                                       cap=config["protocol"]["cap"])
        shared = []
        for group, name, order, models, texts, run, _, row_n, row_cap in rows:
            if model not in models:
                continue
            params = normalise_run(run)
            cap = row_cap or config["protocol"]["cap"]
            for _, text in pairs(config, [model], texts):
                n = job_tokens(config, model, row_tokens(row_n, text) or max_tokens(config, text))
                setting = setting_id(config, text, n, cap)
                rid = run_id(params)
                job = found.setdefault(("runs", model, text, setting, rid),
                                       Job(model, text, setting, rid, params, n=n, cap=cap))
                job.labels.append((group, name, order))
                quality = quality_run(run, evaluator)
                if run_id(quality) != rid:
                    shared.append((job, quality))
        for job, quality in shared:
            qid = run_id(quality)
            job.quality = found.get(("runs", model, job.text, job.setting, qid)) or found.setdefault(
                ("quality", model, job.text, job.setting, qid),
                Job(model, job.text, job.setting, qid, quality, "quality", n=job.n, cap=job.cap))
    # A row scored by the decode loop gets its NLLs from a quality job of its own: the loop's step uses one core
    # (measured: a float32 step takes as long on two threads as on one), so two such jobs share a 2-core
    # machine, while the row's timed job keeps the machine to itself for its timing part alone.
    for job in [job for job in found.values() if job.kind == "runs" and job.quality is None]:
        if decode_loop_nlls(config, job):
            job.quality = found.setdefault(
                ("quality", job.model, job.text, job.setting, job.run),
                Job(job.model, job.text, job.setting, job.run, job.params, "quality", n=job.n, cap=job.cap))
    return list(found.values())


def decode_loop_nlls(config: dict, job: Job) -> bool:
    """Whether the job's NLLs come from the decode loop (a method, option or weights variant the parallel
    evaluator cannot serve, or `protocol.evaluator: decode`)."""
    p = eval_params(config, job)
    return p.evaluator == "decode" or p.parallel_reason() is not None


def job_threads(config: dict, job: Job, cores: int) -> int:
    """Cores a job takes: one for a quality job of the decode loop (its step runs on one core), else all."""
    return 1 if job.kind == "quality" and decode_loop_nlls(config, job) else cores


def controls(config: dict) -> dict:
    """Sweep group -> the swept values of its control: an ablation's `control` (default: its first point), a
    probe's `control` (default: none).  Every other point of the sweep is compared with the control row that
    differs from it only in these values."""
    out = {}
    for key, spec in (config.get("ablations") or {}).items():
        out[f"ablation:{key}"] = spec.get("control") or grid_points(spec, key)[0][1]
    for key, spec in (config.get("probes") or {}).items():
        if spec.get("control"):
            out[f"probe:{key}"] = spec["control"]
    return out


def check(config: dict) -> None:
    """Checks the JSON schema cannot express: models and texts named by entries exist and meet, budgets fit,
    options suit methods."""
    proto = config["protocol"]
    for probe, spec in (config.get("probes") or {}).items():
        swept = set(spec.get("grid", {})) or {probe}
        missing = [p for p in probes.PROBES[probe].sweeps if p not in swept]
        if missing:
            raise StreamkvError(f"config key probes.{probe}.grid: the probe needs {' and '.join(missing)} in its grid "
                                f"(it compares rows that differ in {', '.join(probes.PROBES[probe].sweeps)})")
    for key, spec in (config.get("ablations") or {}).items():
        if "values" in spec and key not in RUN_KEYS:
            raise StreamkvError(f"config key ablations.{key}: '{key}' is not a run parameter, so `values` cannot "
                                f"sweep it; name a parameter ({', '.join(RUN_KEYS[1:])}) or use a `grid`")
    _check_models(config)
    for group, name, order, models, texts, run, where, row_n, row_cap in _rows(config):
        place = where if where.startswith(("runs", "peers")) else where.rsplit(".", 1)[0]
        unknown = sorted(set(row_n) - set(config["texts"])) if isinstance(row_n, dict) else []
        if unknown:
            raise StreamkvError(f"config key {place}.max_tokens: unknown text '{unknown[0]}' "
                                f"(known: {', '.join(config['texts'])})")
        for text in texts:
            n = row_tokens(row_n, text)
            if n and n > max_tokens(config, text):
                raise StreamkvError(f"config key {place}.max_tokens: {n} is more than text '{text}' "
                                    f"is evaluated on ({max_tokens(config, text)}); "
                                    "a row may use fewer tokens than its text, not more")
        here = pairs(config, models, texts)
        if not here:
            raise StreamkvError(f"config key {place}: no model runs on its texts ({', '.join(texts)}); models run "
                                f"on: {_model_text_list(config, models)}; name a text one of them runs on")
        params = normalise_run(run)
        try:
            for model, text in here:
                fixed = {k: proto[k] for k in PROTOCOL_KEYS if k not in ("max_tokens", "cap", "prefill")}
                cap = row_cap or proto["cap"]
                EvalParams(model="-", text="-", **params, **fixed, cap=cap, prefill=min(proto["prefill"], cap),
                           max_tokens=job_tokens(config, model, row_tokens(row_n, text) or max_tokens(config, text)),
                           evaluator=proto["evaluator"]).resolved()
        except (StreamkvError, TypeError) as exc:
            raise StreamkvError(f"config key {where} ('{name}'): {exc}") from None
    rows = [r["name"] for r in config.get("runs", [])] + [r["name"] for r in config.get("peers") or []]
    runs = [r["name"] for r in config.get("runs", [])]
    if config.get("reference") and config["reference"] not in runs:
        raise StreamkvError(f"config key reference: no row of `runs` is named '{config['reference']}' (runs: "
                            f"{', '.join(runs) or 'none'}); name a row scored on every target, e.g. strict "
                            "start_recent")
    for i, peer in enumerate(config.get("peers") or []):
        if peer.get("cross_check") and peer["cross_check"] not in rows:
            raise StreamkvError(f"config key peers[{i}].cross_check: no row is named '{peer['cross_check']}' "
                                f"(rows: {', '.join(rows)})")
        checked = [p["name"] for p in config.get("peers") or [] if p.get("cross_check")]
        if peer.get("noise_floor") and peer["noise_floor"] not in checked:
            raise StreamkvError(f"config key peers[{i}].noise_floor: no peer row with a cross_check is named "
                                f"'{peer['noise_floor']}' (peer rows with one: {', '.join(checked) or 'none'})")
    for section in ("ablations", "probes"):
        for key, spec in (config.get(section) or {}).items():
            swept = set(spec["grid"]) if "grid" in spec else {key}
            bad = [k for k in spec.get("control", {}) if k not in swept]
            if bad:
                raise StreamkvError(f"config key {section}.{key}.control: {', '.join(bad)} is not swept here "
                                    f"(swept: {', '.join(sorted(swept))})")
    groups = ({f"ablation:{k}" for k in config.get("ablations") or {}}
              | {f"probe:{k}" for k in config.get("probes") or {}})
    named = {r["name"] for r in config.get("runs", []) + (config.get("peers") or [])}
    for i, finding in enumerate(config.get("findings") or []):
        if "margin" in finding and finding["expect"] in SUPERIORITY:
            raise StreamkvError(f"config key findings[{i}].margin: a margin belongs to a noninferior or equivalent "
                                f"claim, not to expect '{finding['expect']}' (superiority: the interval excludes "
                                "zero); drop it, or say expect: noninferior")
        if finding["group"] == NAMED_ROWS:
            for side in ("a", "b"):
                if set(finding[side]) != {"name"} or finding[side]["name"] not in named:
                    raise StreamkvError(f"config key findings[{i}].{side}: a finding of group '{NAMED_ROWS}' takes "
                                        f"{{name: <a row of runs or peers>}}, got {finding[side]} "
                                        f"(rows: {', '.join(sorted(named))})")
        elif finding["group"] not in groups:
            raise StreamkvError(f"config key findings[{i}].group: no sweep '{finding['group']}' "
                                f"(sweeps: {', '.join(sorted(groups)) or 'none'}; or '{NAMED_ROWS}')")
        else:
            kind, key = finding["group"].split(":", 1)
            swept = config[f"{kind}s"][key].get("models", list(config["models"]))
            if finding.get("models") and not set(finding["models"]) & set(swept):
                raise StreamkvError(f"config key findings[{i}].models: the sweep '{finding['group']}' runs on "
                                    f"{', '.join(swept)} only, none of {', '.join(finding['models'])}; name one of "
                                    "its models or leave `models` out")
    try:
        Budget.derive(proto["cap"], sink=config["baseline"]["sink"])
    except StreamkvError as exc:
        raise StreamkvError(f"config key baseline.sink: {exc}") from None
    _check_bench(config)


def _entries(config: dict):
    """(config key, entry) of every entry that may name `models` and `texts`."""
    for section in ("runs", "peers", "findings"):
        for i, spec in enumerate(config.get(section) or []):
            yield f"{section}[{i}]", spec
    for section in ("ablations", "probes"):
        for key, spec in (config.get(section) or {}).items():
            yield f"{section}.{key}", spec


def _model_text_list(config: dict, models: list[str]) -> str:
    return "; ".join(f"{m}: {', '.join(model_texts(config, m))}" for m in models)


def _check_models(config: dict) -> None:
    """The model and text keys that models and entries name exist, and a model an entry names runs on one of its
    texts."""
    for model, spec in config["models"].items():
        for text in spec.get("texts", []) if isinstance(spec, dict) else []:
            if text not in config["texts"]:
                raise StreamkvError(f"config key models.{model}.texts: unknown text '{text}' "
                                    f"(known: {', '.join(config['texts'])})")
    for place, spec in _entries(config):
        for key, what in (("models", "model"), ("texts", "text")):
            for name in spec.get(key, []):
                if name not in config[key]:
                    raise StreamkvError(f"config key {place}.{key}: unknown {what} '{name}' "
                                        f"(known: {', '.join(config[key])})")
        for model in spec.get("models", []):
            if not pairs(config, [model], spec.get("texts", list(config["texts"]))):
                raise StreamkvError(f"config key {place}.models: model '{model}' runs on "
                                    f"{', '.join(model_texts(config, model))} only (models.{model}.texts), none of "
                                    f"this entry's texts ({', '.join(spec['texts'])}); add one of its texts or "
                                    "leave the model out")


def bench_models(config: dict) -> list[str]:
    """The models the bench runs on: `bench.model`, then those of `bench.also`."""
    spec = config.get("bench")
    return [spec["model"], *[m for m in spec.get("also") or {} if m != spec["model"]]] if spec else []


def bench_settings(config: dict, model: str) -> dict:
    """`streamkv bench`'s settings on `model`: the bench's own, with that model's changes from `bench.also`."""
    spec = config["bench"]
    own = {k: v for k, v in spec.items() if k not in ("model", "text", "also")}
    if model != spec["model"]:
        own.update((spec.get("also") or {}).get(model) or {})
    return own


def _check_bench(config: dict) -> None:
    spec = config.get("bench")
    if not spec:
        return
    for key, known in (("model", "models"), ("text", "texts")):
        if spec[key] not in config[known]:
            raise StreamkvError(f"config key bench.{key}: unknown {key} '{spec[key]}' "
                                f"(known: {', '.join(config[known])})")
    for model in spec.get("also") or {}:
        if model not in config["models"]:
            raise StreamkvError(f"config key bench.also: unknown model '{model}' "
                                f"(known: {', '.join(config['models'])})")
    for model in bench_models(config):
        where = "bench" if model == spec["model"] else f"bench.also.{model}"
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in bench_settings(config, model).items()}
        try:
            BenchConfig(**settings).check()
        except (StreamkvError, TypeError) as exc:
            raise StreamkvError(f"config key {where}: {exc}") from None
