"""recall: what eviction forgets, in a table, a finding and a figure (the streams and their scoring:
`streamkv.evaluation.recall`, whose docstring defines copy gain and exact match)."""

from __future__ import annotations

import math

import pandas as pd

from streamkv.analysis import fmt
from streamkv.analysis.stats import block_bootstrap, interval_text, proportion_interval

# ----------------------------------------------------------------------------- table, finding, figure


def table(frame: pd.DataFrame, cap: int) -> pd.DataFrame:
    """Per row and D: copy gain [95 % CI over instances], pass-key exact matches k of n [Wilson CI] and digit NLL.

    `frame`: the instances of every row, with its `name` and `status` (a failed row keeps one line, with its error).
    """
    out = []
    for (name, d), g in frame.groupby(["name", "distance"], sort=False, dropna=False):
        row = {"name": name, "distance": d, "d_cap": d / cap, "status": g.status.iloc[0], "error": g.error.iloc[0]}
        if row["status"] == "ok":
            copy, pk = g[g.task == "copy"], g[g.task == "passkey"]
            gain = block_bootstrap(copy.gain.to_numpy(float), copy.instance.to_numpy(), block=1)
            k, n = int(pk.exact.sum()), len(pk)
            lo, hi = proportion_interval(k, n)
            row.update(gain=gain.mean, gain_lo=gain.lo, gain_hi=gain.hi, gain_status=gain.status, gain_n=gain.n,
                       exact=k, n=n, rate=k / n if n else math.nan, rate_lo=lo, rate_hi=hi,
                       key_nll=float(pk.nll.mean()))
        out.append(row)
    return pd.DataFrame(out)


def gain_text(r) -> str:
    if r.status != "ok":
        return "failed"
    return interval_text(r.gain, r.gain_lo, r.gain_hi, r.gain_status, r.gain_n)


def exact_text(r) -> str:
    if r.status != "ok":
        return "failed"
    return f"{int(r.exact)}/{int(r.n)} [{r.rate_lo:.2f}, {r.rate_hi:.2f}]"


def markdown(t: pd.DataFrame) -> str:
    """Rows: methods; columns: copy gain and pass-key exact match at each D."""
    if t.empty:
        return "No row finished."
    ds = sorted(int(d) for d in t.distance.unique())
    caps = {d: t[t.distance == d].d_cap.iloc[0] for d in ds}
    rows = []
    for name, g in t.groupby("name", sort=False):
        by = {int(r.distance): r for r in g.itertuples()}
        rows.append({"method": name,
                     **{f"copy gain, D={d} ({caps[d]:g} cap)": gain_text(by[d]) if d in by else "–" for d in ds},
                     **{f"pass key, D={d}": exact_text(by[d]) if d in by else "–" for d in ds}})
    return fmt.to_markdown(pd.DataFrame(rows))


def finding(t: pd.DataFrame, reference: str, at: float = 2.0) -> str:
    """Copy gain at D = `at` cap for every row, and which rows keep the pass key there where `reference` loses it
    (exact-match intervals apart)."""
    here = t[(t.d_cap == at) & (t.status == "ok")]
    if here.empty:
        return f"No finished run at D = {at:g} cap."
    d = int(here.distance.iloc[0])  # (a float where a failed row's line has none)
    gains = "; ".join(f"{r.name} {gain_text(r)}" for r in here.itertuples())
    text = f"At D = {d} tokens ({at:g} × cap), copy gain (nats): {gains}."
    ref = here[here.name == reference]
    if ref.empty:
        return text + f" The reference row '{reference}' did not finish."
    ref = ref.iloc[0]
    keeps = [r for r in here.itertuples() if r.name != reference and r.rate_lo > ref.rate_hi]
    keys = ", ".join(f"{r.name} {exact_text(r)}" for r in keeps)
    return text + (f" Pass key kept where {reference} ({exact_text(ref)}) loses it: {keys}." if keeps else
                   f" No row keeps the pass key with an exact-match interval above {reference}'s ({exact_text(ref)}).")


def figure(t: pd.DataFrame, axes, sns) -> None:
    """Copy gain and pass-key exact match against D / cap, one line per row, with their intervals."""
    ok = t[t.status == "ok"]
    for ax, (col, lo, hi, label) in zip(axes, (("gain", "gain_lo", "gain_hi", "copy gain (nats)"),
                                               ("rate", "rate_lo", "rate_hi", "pass key exact match"))):
        for name, g in ok.groupby("name", sort=False):
            g = g.sort_values("d_cap")
            line = ax.plot(g.d_cap, g[col], marker="o", label=name)[0]
            ax.fill_between(g.d_cap, g[lo], g[hi], color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("D / cap")
        ax.set_ylabel(label)
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    axes[0].axhline(0.0, color="black", lw=0.6)
    axes[1].legend(fontsize=7, loc="best")
