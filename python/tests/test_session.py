"""shotdb.Session (the C++ model runtime from Python) answers exactly as `shotdb query`. Needs the
package built with libtorch (pip install . --config-settings=cmake.define.SHOTDB_WITH_TORCH=ON),
the default model (tools/fetch-model.sh) and the shotdb CLI (SHOTDB_CLI); skips without them."""
import json
import os
import subprocess

import pytest

import shotdb

MODEL = os.environ.get("SHOTDB_MODEL") or os.path.expanduser(
    "~/.cache/shotdb/models/SmolLM2-135M-Instruct.Q4_1.gguf")
CLI = os.environ.get("SHOTDB_CLI", "")
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "intents_demos.csv")


def runtime_available():
    try:
        import shotdb._runtime  # noqa: F401
        return True
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(
    not (runtime_available() and os.path.exists(MODEL) and os.path.exists(CLI)),
    reason="needs shotdb._runtime (built with libtorch), the default model and SHOTDB_CLI")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("session") / "store")
    subprocess.run([CLI, "--store", path, "build", "--task", "t", "--demos", EXAMPLES, "--limit",
                    "30", "--model", MODEL, "--threads", "2"], check=True, capture_output=True)
    return path


@pytest.mark.parametrize("method", ["dbsa", "reticl", "fixedicl"])
def test_session_answers_as_the_cli(store_dir, method):
    store = shotdb.Store(store_dir, readonly=True)
    session = shotdb.Session(store, "t", MODEL, threads=2)
    assert session.max_context == 8192
    for query in ["wake me up at seven", "is it going to rain tomorrow"]:
        a = session.ask(query, method=method, ratio=1.0)
        cli = json.loads(subprocess.run(
            [CLI, "--store", store_dir, "query", "--task", "t", query, "--method", method,
             "--ratio", "1", "--json", "--model", MODEL, "--threads", "2"],
            check=True, capture_output=True, text=True).stdout)
        assert a["label"] == cli["label"] and a["label"] in session.labels
        assert a["score"] == pytest.approx(cli["score"], rel=1e-9)
        for key in ("blocks", "demos", "context_tokens", "prompt_tokens", "budget",
                    "budget_bound"):
            assert a[key] == cli[key], key
        assert a["timing_ms"]["total"] > 0


def test_session_errors(store_dir):
    store = shotdb.Store(store_dir, readonly=True)
    with pytest.raises(KeyError):
        shotdb.Session(store, "missing", MODEL)
    session = shotdb.Session(store, "t", MODEL, threads=2, max_context=12)
    with pytest.raises(ValueError, match="no room"):
        session.ask("wake me up at seven")
    with pytest.raises(ValueError, match="method"):
        session.ask("x", method="oracle")


def test_ask_batch_answers_each_query_as_ask(store_dir):
    store = shotdb.Store(store_dir, readonly=True)
    session = shotdb.Session(store, "t", MODEL, threads=2)
    queries = ["wake me up at seven", "is it going to rain tomorrow", "play some jazz",
               "wake me up at seven"]
    batch = session.ask_batch(queries, ratio=0.5)
    assert len(batch) == len(queries)
    for query, b in zip(queries, batch):
        a = session.ask(query, ratio=0.5)
        assert b["label"] == a["label"] and b["blocks"] == a["blocks"]
        assert b["label_scores"] == pytest.approx(a["label_scores"], rel=1e-4)
    assert session.ask_batch([]) == []


def test_fp8_pool_answers_as_the_cli_and_load_kv_refuses_it(tmp_path):
    # --kv-dtype f8e4m3: scaled fp8 K/V (docs/format.md). The session reads them dequantised and
    # answers exactly as the CLI; load_kv, which returns arrays of stored elements, refuses them.
    path = str(tmp_path / "fp8")
    subprocess.run([CLI, "--store", path, "build", "--task", "t", "--demos", EXAMPLES, "--limit",
                    "30", "--model", MODEL, "--threads", "2", "--kv-dtype", "f8e4m3"],
                   check=True, capture_output=True)
    # append_block cannot write fp8 records (the pool encoder chooses their scales); arrays of
    # their element width are refused too, before any byte is read.
    import numpy as np
    writable = shotdb.Store(path)
    m = writable.task("t")["model"]
    zeros = [np.zeros((m["kv_heads"], 3, m["head_dim"]), np.uint8)] * m["num_layers"]
    with pytest.raises(shotdb.NotSupportedError, match="f8e4m3"):
        writable.append_block("t", zeros, zeros, [(999999, "x", "set alarm")])
    writable.close()
    store = shotdb.Store(path, readonly=True)
    assert store.task("t")["num_blocks"] == 30 // 5
    session = shotdb.Session(store, "t", MODEL, threads=2)
    query = "wake me up at seven"
    a = session.ask(query, ratio=1.0)
    cli = json.loads(subprocess.run(
        [CLI, "--store", path, "query", "--task", "t", query, "--ratio", "1", "--json",
         "--model", MODEL, "--threads", "2"], check=True, capture_output=True, text=True).stdout)
    assert a["label"] == cli["label"]
    assert a["score"] == pytest.approx(cli["score"], rel=1e-9)
    with pytest.raises(shotdb.NotSupportedError, match="f8e4m3"):
        store.load_kv("t", [0])
    # shotdb show reads the records' values (dequantised) for its statistics.
    shown = json.loads(subprocess.run([CLI, "--store", path, "show", "t", "0", "--layers", "0",
                                       "--json"], check=True, capture_output=True,
                                      text=True).stdout)
    for t in shown["tensors"]:
        assert t["dtype"] == "f8e4m3"
        assert t["min"] < 0 < t["max"] and abs(t["mean"]) < max(-t["min"], t["max"])
