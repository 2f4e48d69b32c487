"""The long stream: one cache configuration over a whole long text, PPL per segment against position.

StreamingLLM's claim is that Start+Recent keeps its quality flat however long
the stream grows (millions of tokens).  The pipeline tests it on every
embedded play end to end (`embedded:shakespeare/*`, about 1.7M SmolLM2
tokens) with the exact parallel evaluator (`streamkv.evaluation.parallel`): the decode
loop, at about 55 ms a token on a CPU, would take a day.  This module holds what the pipeline does
with the config key `long_stream` and with the per-token trace: the job's
parameters, the table of PPL per segment of `segment` positions, the trend
across segments with a bootstrap interval, the finding in a sentence, the
figure and the markdown page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from streamkv.analysis.grid import model_source, run_id
from streamkv.analysis.stats import ABOVE, BELOW, bootstrap, side
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import SINKLESS_METHODS, EvalParams
from streamkv.jobio import write_text

KEY = "long_stream"
DEFAULTS = {"text": "embedded:shakespeare/*", "method": "start_recent", "cap": 256, "compress_every": 1,
            "segment": 16384, "max_tokens": None, "margin": 5.0}  # and sink: 4, or 0 for a method that keeps none
# "Flat" is an equivalence claim: the last quarter's PPL within +-margin % of the first quarter's (the whole
# interval of their ratio).  The quarters hold different plays, whose PPL differs by more than eviction's effects
# (0.1-3 %): 5 % is the smallest change the stream's texts let a flatness claim mean (docs/pipeline.md).
PREFILL = 1  # one token per step from the first: the stream never gets a head start
BOOTSTRAP = 2000  # resamples for the intervals of the trend
MIN_SEGMENTS = 8  # a trend needs quarters of two segments at least: one segment resampled has no spread
SEGMENT_COLUMNS = ("segment", "first", "last", "n", "nll_mean", "ppl", "kv_len_mean")


# ----------------------------------------------------------------------------- the job, from the config


def spec(config: dict) -> dict:
    """The `long_stream` key with its defaults, or an error saying the key is needed."""
    if not config.get(KEY):
        raise StreamkvError(f"config key {KEY} is absent, and report/long_stream.md needs it: add e.g. "
                            f"`{KEY}: {{model: <a key of models>}}` (every key: config/README.md)")
    s = {**DEFAULTS, **config[KEY]}
    s.setdefault("sink", 0 if s["method"] in SINKLESS_METHODS else 4)
    return s


def eval_params(config: dict) -> dict:
    """Every parameter of the evaluation, as a dict (`max_tokens` None: the whole text)."""
    s, proto = spec(config), config["protocol"]
    return dict(model=model_source(config, s["model"]), text=s["text"], method=s["method"], cap=s["cap"],
                sink=s["sink"],
                compress_every=s["compress_every"], max_tokens=s["max_tokens"], prefill=PREFILL, dtype=proto["dtype"],
                device=proto["device"], seed=proto["seed"], evaluator="parallel")


def result_stem(config: dict) -> str:
    """results/long_stream/<model>/<setting>/<run>: the path spells out what changes the run (the text: params)."""
    s, proto = spec(config), config["protocol"]
    n = "all" if s["max_tokens"] is None else s["max_tokens"]
    setting = f"cap{s['cap']}_n{n}_p{PREFILL}_{proto['dtype']}_{proto['device']}_seed{proto['seed']}"
    run = run_id({"method": s["method"], "sink": s["sink"], "compress_every": s["compress_every"]})
    return f"results/{KEY}/{s['model']}/{setting}/{run}"


def check(config: dict) -> None:
    """What the schema cannot say: the model is a key of `models`, and the parallel evaluator serves the run."""
    if not config.get(KEY):
        return  # optional: only report/long_stream.md needs it
    s = spec(config)
    if s["model"] not in config["models"]:
        raise StreamkvError(f"config key {KEY}.model: unknown model '{s['model']}' "
                            f"(known: {', '.join(config['models'])})")
    params = eval_params(config)
    try:
        EvalParams(**{**params, "max_tokens": s["max_tokens"] or PREFILL + 1}).resolved()
    except StreamkvError as exc:
        raise StreamkvError(f"config key {KEY}: {exc}") from None


def stream_length(n_available: int, max_tokens: int | None, text: str) -> int:
    """Tokens to evaluate: the whole text, or its first `max_tokens` (an error if the text is shorter)."""
    if max_tokens is None:
        return n_available
    if n_available < max_tokens:
        raise StreamkvError(f"config key {KEY}.max_tokens: text '{text}' has {n_available} tokens, fewer than "
                            f"{max_tokens}; lower it, or set it to null for the whole text")
    return max_tokens


# ----------------------------------------------------------------------------- segments and trend


def segment_table(trace: pd.DataFrame, segment: int) -> pd.DataFrame:
    """PPL per segment of `segment` input positions (the last one may be shorter), and its mean KV length."""
    if segment < 1:
        raise StreamkvError(f"config key {KEY}.segment must be >= 1, got {segment}")
    seg = trace.position.to_numpy() // segment
    table = (trace.assign(segment=seg).groupby("segment", sort=True)
             .agg(first=("position", "min"), last=("position", "max"), n=("nll", "size"), nll_mean=("nll", "mean"),
                  kv_len_mean=("kv_len", "mean"))
             .reset_index())
    table["ppl"] = np.exp(table.nll_mean)
    return table[list(SEGMENT_COLUMNS)]


def _read(table: pd.DataFrame, segment: int) -> pd.DataFrame:
    """The segments the trend reads: a last segment under half a segment is a noisy point, left out."""
    if len(table) > 2 and table.n.iloc[-1] < segment / 2:
        return table.iloc[:-1]
    return table


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def trend(table: pd.DataFrame, segment: int, seed: int = 0, n_boot: int = BOOTSTRAP) -> dict:
    """How segment PPL moves with position, with 95 % intervals from a bootstrap over whole segments.

    Two summaries: the slope of segment log-PPL (its mean NLL) against log position (the segment's middle),
    and the ratio of mean PPL of the last quarter of the segments to the first quarter's.  Consecutive tokens
    are correlated, so whole segments are resampled, not tokens (a block bootstrap with blocks of `segment`
    tokens); the quarters are resampled each within itself.
    """
    t = _read(table, segment)
    out = {"segments": len(t), "left_out": int(table.n.iloc[-1]) if len(t) < len(table) else 0,
           "first_segment": int(t.segment.iloc[0]), "last_segment": int(t.segment.iloc[-1]),
           "first_ppl": float(t.ppl.iloc[0]), "last_ppl": float(t.ppl.iloc[-1])}
    if len(t) < MIN_SEGMENTS:
        return out
    rng = np.random.default_rng(seed)  # one seeded stream for both intervals
    x = np.log((t["first"].to_numpy() + t["last"].to_numpy()) / 2 + 1)
    y = t.nll_mean.to_numpy()
    slope_ci = bootstrap(lambda picks: np.array([_slope(x[i], y[i]) if np.ptp(x[i]) > 0 else np.nan for i in picks]),
                         len(t), n_boot=n_boot, seed=rng)
    q = len(t) // 4
    head, tail = y[:q], y[-q:]
    # mean PPL of a quarter: exp of the mean of its segments' mean NLLs (each segment weighs the same)
    ratio_ci = bootstrap(lambda t_draws, h_draws: np.exp(tail[t_draws].mean(1) - head[h_draws].mean(1)), q, q,
                         n_boot=n_boot, seed=rng)
    out.update(slope=_slope(x, y), slope_ci=slope_ci, quarter=q, head_ppl=math.exp(head.mean()),
               tail_ppl=math.exp(tail.mean()), ratio=math.exp(tail.mean() - head.mean()), ratio_ci=ratio_ci)
    return out


def verdict(tr: dict, margin: float = DEFAULTS["margin"]) -> str:
    """"flat" when the last quarter's PPL over the first's lies within +-margin % (the whole interval: an
    equivalence claim, never "the interval contains no change"); else "rising" or "falling" when both summaries
    exclude no change that way; else "unclear"."""
    if "slope" not in tr:
        return "too few segments for a trend"
    lo, hi = tr["ratio_ci"]
    if 1 - margin / 100 < lo and hi < 1 + margin / 100:
        return "flat"
    where = {side(*tr["slope_ci"], 0.0), side(*tr["ratio_ci"], 1.0)}
    return {ABOVE: "rising", BELOW: "falling"}.get(where.pop(), "unclear") if len(where) == 1 else "unclear"


def finding(table: pd.DataFrame, segment: int, tr: dict, margin: float = DEFAULTS["margin"]) -> str:
    """One sentence in numbers: first vs last segment, the trend with its intervals, and the verdict."""
    first = table[table.segment == tr["first_segment"]].iloc[0]
    last = table[table.segment == tr["last_segment"]].iloc[0]
    text = (f"PPL {tr['first_ppl']:.2f} on the first segment "
            f"(positions {int(first['first']):,}–{int(first['last']):,}) "
            f"and {tr['last_ppl']:.2f} on the last ({int(last['first']):,}–{int(last['last']):,}"
            + (f"; the {tr['left_out']:,} positions after it, under half a segment, are left out)" if tr["left_out"]
               else ")"))
    if "slope" not in tr:
        return text + f"; {tr['segments']} segments are too few for a trend (it needs {MIN_SEGMENTS})."
    change = {"flat": f"quality stays flat within ±{margin:g} % over the stream (the ratio's whole interval), as "
                      "StreamingLLM claims",
              "rising": "PPL rises along the stream: quality does not stay flat",
              "falling": "PPL falls along the stream: no degradation, but not flat either",
              "unclear": f"neither flatness within ±{margin:g} % (the ratio's interval reaches beyond it) nor a "
                         "trend is shown"}[verdict(tr, margin)]
    return (text + f"; the last quarter of the segments has mean PPL {tr['tail_ppl']:.2f} against {tr['head_ppl']:.2f} "
            f"for the first ({tr['quarter']} segments each: ratio {tr['ratio']:.3f}, 95 % CI "
            f"{tr['ratio_ci'][0]:.3f}–{tr['ratio_ci'][1]:.3f}) and segment log-PPL moves by {tr['slope']:+.4f} "
            f"per unit of log position (95 % CI {tr['slope_ci'][0]:+.4f} to {tr['slope_ci'][1]:+.4f}; block "
            f"bootstrap over {tr['segments']} segments of {segment:,} tokens): {change}.")


# ----------------------------------------------------------------------------- figure and page


def figure(table: pd.DataFrame, path: str | Path, title: str) -> None:
    """Segment PPL against the segment's middle position (log x), the PPL of all targets as a dashed line."""
    from streamkv.analysis.figures import _plt, _save

    plt, sns = _plt()
    data = table.assign(middle=(table["first"] + table["last"]) / 2)
    fig, ax = plt.subplots(figsize=(8, 4))
    sns.lineplot(data=data, x="middle", y="ppl", marker="o", markersize=4, ax=ax, label="segment PPL")
    overall = math.exp((table.nll_mean * table.n).sum() / table.n.sum())
    ax.axhline(overall, color="black", lw=0.8, ls="--", label=f"all targets ({overall:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("token position (segment middle, log scale)")
    ax.set_ylabel("PPL")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def write_report(result: str | Path, trace: str | Path, template: str | Path, segment: int, page: str | Path,
                 figure_path: str | Path, margin: float = DEFAULTS["margin"]) -> pd.DataFrame:
    """report/long_stream.md and its figure from the run's record and trace; returns the segment table."""
    record = json.loads(Path(result).read_text())
    table = segment_table(pd.read_parquet(trace, columns=["position", "nll", "kv_len"]), segment)
    p = record["params"]
    figure(table, figure_path, f"{p['method']}, cap {p['cap']}: PPL per {segment:,}-token segment")
    link = Path(figure_path).relative_to(Path(page).parent).as_posix()
    write_text(render(record, table, segment, template, link, margin), page)
    return table


def render(record: dict, table: pd.DataFrame, segment: int, template: str | Path, figure_path: str,
           margin: float = DEFAULTS["margin"]) -> str:
    """The page report/long_stream.md from the run's record and its segment table."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(template).parent)),
                             undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    tr = trend(table, segment, seed=record["params"]["seed"])
    rows = [{"segment": int(r.segment), "first": f"{int(r.first):,}", "last": f"{int(r.last):,}", "n": f"{int(r.n):,}",
             "ppl": f"{r.ppl:.3f}", "kv": f"{r.kv_len_mean:.1f}"} for r in table.itertuples()]
    return env.get_template(Path(template).name).render(
        status=record["status"], error=record["error"], params=record["params"], metrics=record["metrics"],
        stream=record[KEY], meta=record["meta"], segment=segment,
        rows=rows, finding=finding(table, segment, tr, margin), verdict=verdict(tr, margin), figure=figure_path)
