"""recall: what eviction forgets, in a table, a finding and a figure (the streams and their scoring:
`streamkv.evaluation.recall`, whose docstring defines copy gain and exact match)."""

from __future__ import annotations

import math

import pandas as pd

from streamkv.analysis import fmt
from streamkv.analysis.stats import block_bootstrap, interval_text, proportion_interval

# ----------------------------------------------------------------------------- table, finding, figure


def table(frame: pd.DataFrame, cap: int, reference: str | None = None) -> pd.DataFrame:
    """Per row and D: copy gain [95 % CI over instances], pass-key exact matches k of n [Wilson CI] and digit NLL;
    and against the row `reference` on the same instances (every row scores the same seeded streams): the paired
    copy-gain difference [95 % CI over instance pairs] and the pass key's discordant pairs with McNemar's exact p.

    `frame`: the instances of every row, with its `name` and `status` (a failed row keeps one line, with its error).
    """
    out = []
    ok = frame[frame.status == "ok"]
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
            ref = ok[(ok.name == reference) & (ok.distance == d)]
            if reference is not None and name != reference and len(ref):
                row.update(versus(g, ref))
        out.append(row)
    return pd.DataFrame(out)


def versus(g: pd.DataFrame, ref: pd.DataFrame) -> dict:
    """A row's instances against the reference's at one D, paired by instance: copy gain's difference (a bootstrap
    over instance pairs: instances are independent, seeded streams) and the pass key's discordant pairs (`keeps`:
    the row right where the reference is wrong; `loses`: the converse) with McNemar's exact two-sided p."""
    copy = g[g.task == "copy"].merge(ref[ref.task == "copy"], on="instance", suffixes=("", "_ref"))
    diff = block_bootstrap((copy.gain - copy.gain_ref).to_numpy(float), copy.instance.to_numpy(), block=1)
    key = g[g.task == "passkey"].merge(ref[ref.task == "passkey"], on="instance", suffixes=("", "_ref"))
    keeps = int((key.exact.astype(bool) & ~key.exact_ref.astype(bool)).sum())
    loses = int((~key.exact.astype(bool) & key.exact_ref.astype(bool)).sum())
    return {"vs_ref_gain": diff.mean, "vs_ref_gain_lo": diff.lo, "vs_ref_gain_hi": diff.hi,
            "vs_ref_gain_status": diff.status, "vs_ref_n": diff.n, "key_keeps": keeps, "key_loses": loses,
            "key_pairs": len(key), "key_p": mcnemar_exact(keeps, loses)}


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact test of b against c discordant pairs: two-sided binomial p at one half (1 with none)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


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
    """At D = `at` cap: every row's copy gain, and each row against `reference` on the same instances (paired copy
    gain with its interval; the pass key's discordant pairs with McNemar's exact p, Holm over the rows)."""
    from streamkv.analysis.stats import holm

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
    others = here[(here.name != reference) & here.get("key_p", pd.Series(index=here.index, dtype=float)).notna()]
    if others.empty:
        return text
    paired = "; ".join(f"{r.name} " + interval_text(r.vs_ref_gain, r.vs_ref_gain_lo, r.vs_ref_gain_hi,
                                                    r.vs_ref_gain_status, r.vs_ref_n)
                       for r in others.itertuples())
    text += f" Against {reference} on the same {int(ref.n)} instances, copy gain differs by: {paired}."
    shown = holm(others.key_p.to_numpy(float), 0.05)
    keys = "; ".join(f"{r.name} keeps {int(r.key_keeps)}, loses {int(r.key_loses)} (p = {r.key_p:.2g})"
                     for r in others.itertuples())
    verdict = [r.name for r, s in zip(others.itertuples(), shown) if s]
    return text + (f" Pass key against {reference} ({exact_text(ref)}), discordant pairs with McNemar's exact p: "
                   f"{keys}; " + (f"a difference shown for {', '.join(verdict)} (Holm at 5 % over "
                                  f"{len(others)} rows)." if verdict else
                                  f"no row differs from it (Holm at 5 % over {len(others)} rows)."))


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
