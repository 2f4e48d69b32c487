"""The Pareto figure and its key (`figures.pareto_figure`, `figures.pareto_numbers`) on a synthetic summary slice."""

import numpy as np
import pandas as pd

from streamkv.analysis.figures import pareto_figure, pareto_numbers

METHODS = ["MIT StreamingLLM", "Ours (strict)", "Ours (lazy K=32)", "Ours (best)", "Ours (ring)",
           "Ours (ring lazy K=32)", "Dense (no eviction)", "Window (no sinks)", "Ours (original positions)"]
PEERS = ["kvpress StreamingLLM", "kvpress StreamingLLM K=32", "kvpress StreamingLLM K=32 (upstream, unsorted)",
         "kvpress KnormPress", "llama.cpp context shift", "llama.cpp dense"]


def pareto_part(seed: int = 0) -> pd.DataFrame:
    """One (model, text) slice as the pipeline summary gives it: method, peer, ablation and probe rows, the
    strided baseline (no ΔPPL against the reference), a run filling a method, an ablation and a probe row, a
    failed row, rows without intervals and a sweep at its own cap (no ΔPPL either)."""
    rng = np.random.default_rng(seed)
    rows = [{"group": "baseline", "name": "Recompute baseline", "order": 0, "file": "base.json", "x": 40.0,
             "y": float("nan")}]
    special = {"Ours (strict)": ("strict.json", 1.2, 0.0), "Dense (no eviction)": ("dense.json", 1.0, -2.5),
               "Window (no sinks)": ("window.json", 1.1, 240.0), "Ours (original positions)": ("orig.json", 1.2, 18.0)}
    for i, name in enumerate(METHODS):
        file, x, y = special.get(name, (f"m{i}.json", rng.uniform(0.9, 1.3), rng.uniform(0.2, 2.5)))
        rows.append({"group": "methods", "name": name, "order": i, "file": file, "x": x, "y": y})
    for i, name in enumerate(PEERS):
        x, y = (rng.uniform(2, 6), 45.0) if "unsorted" in name else (rng.uniform(1.5, 8), rng.uniform(-0.5, 3))
        rows.append({"group": "peers", "name": name, "order": i, "file": f"p{i}.json", "x": x, "y": y})
    rows[-1].update(status="error")  # llama.cpp dense: its worker died
    for j, k in enumerate([1, 4, 8, 16, 32, 64]):
        # K=1 is the strict run; the probe repeats the ablation's runs
        file, x, y = ("strict.json", 1.2, 0.0) if k == 1 else (f"k{k}.json", 1.2 / k ** 0.3, 0.3 * np.log2(k))
        for group in ("ablation:compress_every", "probe:summarize_k_quality"):
            rows.append({"group": group, "name": f"compress_every={k}", "order": j, "file": file, "x": x, "y": y})
    for j, s in enumerate([1, 4, 8, 16]):
        rows.append({"group": "ablation:sink", "name": f"sink={s}", "order": j, "file": f"s{s}.json",
                     "x": rng.uniform(0.55, 0.7), "y": rng.uniform(1, 3)})
    j = 0
    for k in (8, 32):
        for sl in (0, 2, 4):
            for md in (0, 4):
                rows.append({"group": "ablation:softlite", "name": f"compress_every={k}, cache_slack={sl}, "
                             f"max_drop={md}", "order": j, "file": f"sl{k}_{sl}_{md}.json",
                             "x": rng.uniform(0.55, 0.8), "y": rng.uniform(0.5, 2.5)})
                j += 1
    for j, s in enumerate([0, 1, 4]):
        rows.append({"group": "ablation:sink_cap1024", "name": f"sink={s}", "order": j, "file": f"c{s}.json",
                     "x": 1.5, "y": float("nan")})
    for j, (sl, md) in enumerate((sl, md) for sl in (0, 2, 4, 8) for md in (0, 4)):
        rows.append({"group": "probe:verify_slack_effect", "name": f"cache_slack={sl}, max_drop={md}", "order": j,
                     "file": f"v{sl}_{md}.json", "x": rng.uniform(0.6, 0.75), "y": rng.uniform(0.8, 2)})
    part = pd.DataFrame(rows)
    part["status"] = part.get("status", pd.Series(index=part.index, dtype=object)).fillna("ok")
    part["cap"] = np.where(part.group == "ablation:sink_cap1024", 1024, 256)
    part["reference"] = "Ours (strict)"
    width = rng.uniform(0.2, 1.5, len(part))
    part = part.assign(delta_ref_pct=part.y, delta_ref_lo=part.y - width, delta_ref_hi=part.y + width * 1.2,
                       tpot_ratio=part.x, tpot_ratio_lo=part.x * 0.96, tpot_ratio_hi=part.x * 1.05,
                       tpot_ms=part.x * 9.0)
    strict = part.file == "strict.json"
    part.loc[strict, ["delta_ref_lo", "delta_ref_hi"]] = 0.0
    part["delta_ref_status"] = np.where(strict, "identical", "ok")
    # peers on 768 tokens: no ΔPPL interval; llama.cpp's shift has no timing interval either
    part.loc[part.name.str.startswith("llama.cpp"), ["delta_ref_lo", "delta_ref_hi", "tpot_ratio_lo",
                                                     "tpot_ratio_hi"]] = float("nan")
    part.loc[part.name == "kvpress KnormPress", ["delta_ref_lo", "delta_ref_hi"]] = float("nan")
    return part.drop(columns=["x", "y"])


def test_pareto_figure_numbers_each_drawn_run_once(tmp_path):
    part = pareto_part()
    out = tmp_path / "pareto.png"
    pareto_figure(part, out, "tiny · synthetic: speed vs quality")
    assert out.exists() and out.stat().st_size > 50_000

    numbers = pareto_numbers(part)
    assert list(numbers.columns) == ["number", "name", "file"]
    assert list(numbers.number) == list(range(1, len(numbers) + 1))
    assert numbers.file.is_unique
    drawn = part[(part.status == "ok") & part.delta_ref_pct.notna()]
    assert set(numbers.file) == set(drawn.file)
    # not drawn: the failed peer, the strided baseline, the sweep at its own cap
    assert not set(numbers.file) & {"base.json", "p5.json", "c0.json", "c1.json", "c4.json"}
    # methods first, in their order, then peers; a run shared with sweep rows keeps its method name
    assert list(numbers.name[:len(METHODS)]) == METHODS
    assert list(numbers.name[len(METHODS):len(METHODS) + len(PEERS) - 1]) == PEERS[:-1]
    assert numbers.set_index("file").name["strict.json"] == "Ours (strict)"
    # sweep rows under their sweep's key, short names; ablations before probes
    names = list(numbers.name)
    assert "compress_every: K=4" in names and "summarize_k_quality: K=4" not in names
    assert names.index("softlite: K=32, σ=4, δ=4") < names.index("verify_slack_effect: σ=0, δ=0")


def test_pareto_figure_from_an_older_summary(tmp_path):
    """No step-time ratio, no intervals and no reference column: TPOT in ms, points without bars."""
    part = pareto_part().drop(columns=["tpot_ratio", "tpot_ratio_lo", "tpot_ratio_hi", "delta_ref_lo",
                                       "delta_ref_hi", "reference"])
    out = tmp_path / "pareto.png"
    pareto_figure(part[part.group.isin(["baseline", "methods", "peers"])], out, "older")
    assert out.exists() and out.stat().st_size > 20_000
    assert len(pareto_numbers(part)) == len(pareto_numbers(pareto_part()))
