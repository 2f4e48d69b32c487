"""The method registry: the one place a method's facts live, and what reads them."""

import re
from pathlib import Path

import pytest
import yaml

from streamkv import methods
from streamkv.analysis.grid import run_id
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import EvalParams

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "schema.yaml").read_text())


def _enums(node, path=()):
    """Every enum of the schema: (the key it constrains, where it is, its values)."""
    if isinstance(node, dict):
        if "enum" in node:
            key = next(k for k in reversed(path) if k not in ("items", "propertyNames", "properties"))
            yield key, ".".join(path), node["enum"]
        for key, value in node.items():
            yield from _enums(value, (*path, key))
    elif isinstance(node, list):
        for item in node:
            yield from _enums(item, path)


def test_the_schema_names_the_registry_methods():
    enums = {where: enum for key, where, enum in _enums(SCHEMA) if key == "method"}
    rows = {where: enum for where, enum in enums.items() if "long_stream" not in where and "peers" not in where}
    assert len(rows) >= 2  # a run's method and a named row's
    for where, enum in rows.items():
        assert tuple(enum) == methods.NAMES, where
    (peers,) = (enum for where, enum in enums.items() if "peers" in where)
    assert tuple(peers) == methods.names(peer=True)
    # the long stream takes the bounded caches the parallel evaluator serves
    (long_stream,) = (enum for where, enum in enums.items() if "long_stream" in where)
    assert set(long_stream) == set(methods.names(parallel=True)) - set(methods.names(dense=True))


def test_every_method_has_its_own_run_ids():
    seen = {}
    for m in methods.REGISTRY.values():
        for k in ((1, 32) if m.lazy else (1,)):
            rid = run_id({"method": m.name, "compress_every": k})
            assert rid not in seen, (m.name, seen.get(rid))
            seen[rid] = m.name
            assert ":" not in rid and "+" not in rid  # a file name
    assert run_id({"method": "recompute", "stride": 32}) == "recompute_s4_stride32"
    assert run_id({"method": "start_recent", "compress_every": 32, "positions": "original"}) == \
        "start_recent_s4_k32_sl0_md0_ov0_rf0_orig"


@pytest.mark.parametrize("option, value", [("compress_every", 4), ("cache_slack", 2), ("max_drop", 2),
                                           ("softlite_mode", "cooldown"), ("positions", "original"),
                                           ("overlap", 2), ("refresh", 2), ("stride", 3)])
def test_an_option_a_method_does_not_take_names_the_methods_that_do(option, value):
    for m in methods.REGISTRY.values():
        p = EvalParams("m", "t", m.name, **{option: value})
        if option in m.options:
            continue
        with pytest.raises(StreamkvError,
                           match=f"{option.replace('_', '-')} applies to .*, not to '{re.escape(m.name)}'"):
            p.resolved()


def test_defaults_come_from_the_record():
    for m in methods.REGISTRY.values():
        p = EvalParams("m", "t", m.name).resolved()
        assert p.sink == m.default_sink
        assert (p.evaluator == "decode") or m.parallel
    with pytest.raises(StreamkvError, match="unknown method 'h2o'; choose one of: dense, window"):
        methods.get("h2o")


def test_the_cli_help_lists_every_method(capsys):
    from streamkv.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for m in methods.REGISTRY.values():
        assert m.name in out


def test_the_schema_names_the_registry_probes():
    from streamkv.probes import PROBES

    assert tuple(SCHEMA["properties"]["probes"]["propertyNames"]["enum"]) == tuple(PROBES)


def test_every_schema_enum_is_its_registry():
    """Each enum of config/schema.yaml equals the library's tuple of the same values (methods: the test above), so a
    value added in one place and not the other fails here, and a new enum needs a registry named below."""
    from streamkv.analysis.grid import RUN_KEYS
    from streamkv.analysis.stats import KINDS
    from streamkv.cache.policy import SOFTLITE_MODES
    from streamkv.evaluation import params
    from streamkv.probes import PROBES

    registries = {"softlite_mode": SOFTLITE_MODES, "positions": params.POSITIONS, "weights": params.WEIGHTS,
                  "weights_compile": params.WEIGHTS, "dtype": params.DTYPES, "evaluator": params.EVALUATORS,
                  "compile_methods": params.COMPILE_METHODS, "stream_methods": params.STREAM_METHODS,
                  "sections": params.BENCH_SECTIONS, "expect": KINDS, "probes": tuple(PROBES),
                  "grid": RUN_KEYS[1:], "kvpress_methods": params.KVPRESS_METHODS, "sink_layers": params.SINK_LAYERS}
    seen = set()
    for key, where, enum in _enums(SCHEMA):
        if key == "method":
            continue
        assert key in registries, f"{where}: an enum with no registry in this test"
        assert set(enum) == set(registries[key]), where
        seen.add(key)
    assert seen == set(registries)  # (every registry named here still has its enum)


def test_run_options_are_declared_once():
    """A run option is a field of EvalParams (the CLI makes one option per field), a key of RUN_KEYS (the grid, run
    ids, the summary's columns) and a property of the schema's run_params; a key in one and not the others fails
    here, and each one changes the run id (two runs that differ in it never share a result file)."""
    from dataclasses import fields

    from streamkv.analysis.grid import RUN_DEFAULTS, RUN_KEYS

    assert set(SCHEMA["definitions"]["run_params"]["properties"]) == set(RUN_KEYS)
    assert set(RUN_KEYS) <= {f.name for f in fields(EvalParams)}
    assert set(methods.OPTIONS) - {"stride"} <= set(RUN_KEYS)  # (stride: the baseline's, set by the pipeline)
    other = {"compress_every": 4, "cache_slack": 3, "max_drop": 2, "softlite_mode": "cooldown", "positions": "original",
             "overlap": 2, "refresh": 2, "weights": "bfloat16", "profile": True, "sink": 2, "method": "mit",
             "sink_layers": "all"}
    assert set(other) == set(RUN_KEYS)
    base = {"method": "start_recent", "cache_slack": 2}  # (softlite_mode counts only under softlite)
    for key, value in other.items():
        assert value != RUN_DEFAULTS.get(key, 4)
        assert run_id({**base, key: value}) != run_id(base), key


def test_the_kvpress_worker_serves_every_kvpress_method():
    from streamkv.peers.kvpress_worker import PRESSES

    assert tuple(f"kvpress:{p}" for p in PRESSES) == methods.names(family="kvpress")


def test_no_module_imports_a_module_that_imports_it():
    """The import graph of src/streamkv and its subpackages (lazy imports included) has no cycle: module a imports
    module b when it says `import streamkv.b` or `from streamkv.b import x` (x a module of b, or a name in b)."""
    import ast

    from streamkv.provenance import PACKAGE_DIR

    def name(path):
        rel = path.relative_to(PACKAGE_DIR).with_suffix("")
        return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)

    modules = {name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("streamkv.") for a in node.names if a.name.startswith("streamkv.")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("streamkv") and not node.level:
                base = node.module.removeprefix("streamkv").removeprefix(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}".lstrip(".")
                    deps.add(sub if sub in modules else base)
        graph[module] = (deps & set(modules)) - {module, ""}
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # (the graph is the package's, not empty)

    def cycle_from(node, stack):
        if node in stack:
            return stack[stack.index(node):] + [node]
        for dep in sorted(graph.get(node, ())):
            found = cycle_from(dep, stack + [node])
            if found:
                return found
        return None

    for module in sorted(graph):
        assert cycle_from(module, []) is None, " -> ".join(cycle_from(module, []))
