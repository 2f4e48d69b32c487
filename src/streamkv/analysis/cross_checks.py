"""The peers' cross-checks: each peer row against our row of the same semantics, NLL by NLL on the targets both
scored, the sentences they support, and what the llama.cpp rows ran."""

from __future__ import annotations

import json

import pandas as pd

from streamkv.analysis.rows import NOT_INSTALLED, not_installed_text
from streamkv.analysis.stats import block_bootstrap, paired
from streamkv.analysis.summary import ROW_GROUPS, trace_path
from streamkv.methods import REGISTRY as METHODS


def _peer_meta(row) -> dict:
    """What a peer recorded about itself (`meta.peer_versions`): a dict, whichever way the frame stored it."""
    meta = getattr(row, "meta_peer_versions", None)
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    return {k: v for k, v in meta.items() if v is not None} if isinstance(meta, dict) else {}


def llamacpp_engine(peers: pd.DataFrame, dtype: str) -> str:
    """What the llama.cpp rows ran, as their results record it: the GGUF file's weight type, the KV cache's type,
    the cells allocated for the budget; "" without a llama.cpp row."""
    rows = [r for r in peers.itertuples() if METHODS.get(r.method) is not None
            and METHODS[r.method].family == "llamacpp"]
    if not rows:
        return ""
    metas = [(r, _peer_meta(r)) for r in rows if r.status == "ok"]
    weights = sorted({str(m["gguf_type"]) for _, m in metas if m.get("gguf_type")})
    caches = sorted({str(m["kv_cache"]).upper() for _, m in metas if m.get("kv_cache")})
    kernels = (f"its own kernels, {' / '.join(weights)} weights (the GGUF file's type)" if weights
               else "its own kernels and its own weight format")
    kernels += f" and a KV cache in {' / '.join(caches)}" if caches else ""
    cells = [f"{r.name}: {int(m['kv_cells'])} cells for a budget of {int(m['kv_budget'])}" for r, m in metas
             if m.get("kv_cells") is not None and m.get("kv_budget") is not None]
    allocated = f"the cells it allocates ({'; '.join(cells)})" if cells else "the cells it allocates"
    return (f"llama.cpp runs the model's GGUF file with {kernels}, so its PPL, TPOT and speedup (against our "
            f"{dtype} recompute) are those of another engine; its KV MiB is computed from {allocated}")


def cross_checks(part: pd.DataFrame, config: dict, bootstrap: dict | None = None) -> list[dict]:
    """Each peer row with a `cross_check` against the row it names: per-token NLL and PPL, side by side, on the
    targets both scored (the PPL difference paired, with its interval: `stats.block_bootstrap`).

    A peer's `noise_floor` names another peer row whose own cross-check differs only in what the two
    implementations do anyway (llama.cpp dense against our dense, say): its PPL difference is shown beside.
    """
    checks = {}
    by_name = {r.name: r for r in part.itertuples() if r.group in ROW_GROUPS}
    for spec in config.get("peers") or []:
        peer, ours = by_name.get(spec["name"]), by_name.get(spec.get("cross_check"))
        if peer is None or ours is None:
            continue  # not run on this text, or no cross-check asked for
        check = {"peer": peer.name, "ours": ours.name, "max_dnll": "–", "mean_dnll": "–", "dppl": "–", "first": "–",
                 "floor": "–", "differing": "–", "method": peer.method, "prefill": _int(getattr(peer, "prefill", None)),
                 "cap": _int(getattr(peer, "cap", None)), "max_abs": None, "n_above": None, "n": None,
                 "half_width": None}
        if peer.status == "ok" and ours.status == "ok":
            # both PPLs over the targets both scored, and their paired difference with its interval
            a, b = (pd.read_parquet(trace_path(r.file), columns=["position", "nll"]) for r in (peer, ours))
            both = paired(a, b)
            d = block_bootstrap((both.nll_a - both.nll_b).to_numpy(), both.position.to_numpy(), **(bootstrap or {}))
            diff = (both.nll_a - both.nll_b).abs()
            above = both.position[diff > CROSS_CHECK_TOL]
            check.update(max_dnll=f"{diff.max():.1e}", mean_dnll=f"{diff.mean():.1e}", dppl=d.text(),
                         first=str(int(above.iloc[0])) if len(above) else "none",
                         differing=f"{len(above)} of {len(diff)}", max_abs=float(diff.max()), n_above=len(above),
                         n=len(diff), half_width=d.half_width_pct)
        elif peer.status == NOT_INSTALLED:
            check["dppl"] = not_installed_text(peer.method)
        checks[peer.name] = check
    for spec in config.get("peers") or []:
        floor = checks.get(spec.get("noise_floor"))
        if spec["name"] in checks and floor is not None:
            checks[spec["name"]]["floor"] = f"{floor['dppl']} ({floor['peer']} vs {floor['ours']})"
    return list(checks.values())


CROSS_CHECK_TOL = 1e-4  # |dNLL| at which two implementations of the same semantics are said to differ


def _int(v) -> int | None:
    return int(v) if v is not None and v == v else None


def _family(method: str) -> str | None:
    record = METHODS.get(method)
    return record.family if record is not None else None


def cross_check_notes(checks: list[dict], dtype: str) -> list[str]:
    """What the cross-checks of this run show, in sentences computed from them (measured ones only)."""
    notes = []
    measured = [c for c in checks if c["max_abs"] is not None]
    kvpress = [c for c in measured if _family(c["method"]) == "kvpress"]
    full = [c for c in kvpress if c["prefill"] is not None and c["cap"] is not None and c["prefill"] >= c["cap"]]
    below = [c for c in kvpress if c["prefill"] is not None and c["cap"] is not None and c["prefill"] < c["cap"]]
    if full:
        worst = max(c["max_abs"] for c in full)
        notes.append("kvpress compresses after the attention, from the first decode step on: after a prefill that "
                     "fills the cap its first decode step attends cap + 1 keys, and the states that step leaves in "
                     f"the cache {'differ from' if worst > CROSS_CHECK_TOL else 'still agree within 1e-4 with'} "
                     f"ours until the cross-check ends (max |ΔNLL| {worst:.1e} over "
                     f"{len(full)} such cross-check{'s' if len(full) > 1 else ''}).")
    if below:
        worst = max(c["max_abs"] for c in below)
        where = ", ".join(f"{c['peer']} (prefill {c['prefill']}, cap {c['cap']})" for c in below)
        notes.append(f"With a prefill below the cap, kvpress and our row differ by at most {worst:.1e} in NLL "
                     f"({'within' if worst <= CROSS_CHECK_TOL else 'above'} the 1e-4 tolerance): {where}.")
    elif kvpress:
        notes.append("With a prefill below the cap (a multiple of K) the test suite checks that kvpress and our "
                     "rows agree within 1e-4 in NLL (`tests/test_peers.py`, on a tiny model); no cross-check of this "
                     "run has such a prefill, so it is not measured here.")
    llama = [c for c in measured if _family(c["method"]) == "llamacpp"]
    dense = [c for c in llama if METHODS[c["method"]].dense]
    if dense:
        c = dense[0]
        notes.append(f"llama.cpp's NLLs differ from our {dtype} forward's by more than 1e-4 at {c['n_above']} of "
                     f"{c['n']} targets without eviction ({c['peer']} vs {c['ours']}); that difference is the noise "
                     "floor, so a shift row's difference beyond it is what the two evictions do differently.")
    elif llama:
        notes.append(f"llama.cpp runs another forward than our {dtype} one, and no dense cross-check of this run "
                     "measures that difference alone: a shift row's difference holds both.")
    return notes
