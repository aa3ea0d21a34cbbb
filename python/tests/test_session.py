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


def _e4m3_quantised(x):
    """Independent reference for one head of scaled fp8 (docs/format.md): scale = max|x| / 448,
    each x / scale rounded to the nearest e4m3 value (ties to the even code), times the scale, all
    in float32."""
    import numpy as np
    x = np.asarray(x, np.float32)
    amax = np.float32(np.abs(x).max())
    if amax == 0:
        return x.copy()
    scale = amax / np.float32(448)
    # The 127 non-negative finite e4m3 values, in code order: subnormals m * 2^-9, then
    # (1 + m / 8) * 2^(e - 7); code 127 is NaN.
    grid = [m * 2.0 ** -9 for m in range(8)]
    grid += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8)][:127 - 8]
    grid = np.array(grid, np.float64)
    y = np.abs(x / scale).astype(np.float64)
    hi = np.clip(np.searchsorted(grid, y), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = y - grid[lo], grid[hi] - y
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(y >= grid[-1], len(grid) - 1, code)
    return (np.sign(x) * grid[code].astype(np.float32) * scale).astype(np.float32)


def _assert_sink_block_is_quantised(kv, ref, quantised):
    """Block 0 (the first in both handles) of every layer of `kv`, a scaled task's float32 values,
    equals `quantised` (a numpy reference of the dtype's rounding) of the f32 pool's `ref`."""
    import numpy as np
    for li in range(len(kv.layers)):
        for got_of, want_of in ((kv.key, ref.key), (kv.value, ref.value)):
            got = np.from_dlpack(got_of(li, 0))
            want = np.from_dlpack(want_of(li, 0))
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, quantised(want))


def test_fp8_pool_answers_as_the_cli_and_load_kv_dequantises(tmp_path):
    # --kv-dtype f8e4m3: scaled fp8 K/V (docs/format.md). The session reads them dequantised and
    # answers exactly as the CLI; load_kv returns their values dequantised, as float32.
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
    # The sink block (block 0) attends to nothing before it, so its K/V before quantisation are
    # those of an f32 pool built the same way: quantising them here must give load_kv's values.
    kv = store.load_kv("t", [0, 2], layers=[1, 0])
    assert kv.dtype == "f32" and kv.layers == [1, 0] and kv.blocks == [0, 2]
    f32_path = str(tmp_path / "f32")
    subprocess.run([CLI, "--store", f32_path, "build", "--task", "t", "--demos", EXAMPLES,
                    "--limit", "30", "--model", MODEL, "--threads", "2", "--kv-dtype", "f32"],
                   check=True, capture_output=True)
    ref = shotdb.Store(f32_path, readonly=True).load_kv("t", [0], layers=[1, 0])
    assert ref.dtype == "f32"
    _assert_sink_block_is_quantised(
        kv, ref, lambda x: np.stack([_e4m3_quantised(head) for head in x]))
    for li in range(2):
        assert np.from_dlpack(kv.key(li, 1)).shape[1] == kv.tokens[1]
    if not shotdb._shotdb.WITH_CUDA or shotdb._shotdb.cuda_device_count() == 0:
        with pytest.raises(shotdb.NotSupportedError):  # on CUDA: test_hf.py's scaled CUDA test
            store.load_kv("t", [0], device="cuda")
    # shotdb show reads the records' values (dequantised) for its statistics.
    shown = json.loads(subprocess.run([CLI, "--store", path, "show", "t", "0", "--layers", "0",
                                       "--json"], check=True, capture_output=True,
                                      text=True).stdout)
    for t in shown["tensors"]:
        assert t["dtype"] == "f8e4m3"
        assert t["min"] < 0 < t["max"] and abs(t["mean"]) < max(-t["min"], t["max"])


def _i8_quantised(x, group=128):
    """docs/format.md's i8 rounding of one record [kv_heads, tokens, head_dim], written apart from
    the C++: per (head, group of 128 tokens, channel) the smallest bfloat16 >= max|x| / 127 (1 for
    zeros), then round-half-even(x / scale) clipped to +-127, times the scale."""
    import numpy as np
    out = np.empty_like(x)
    for first in range(0, x.shape[1], group):
        xs = x[:, first:first + group, :]
        amax = np.max(np.abs(xs), axis=1)  # [heads, channels]
        want = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        bits = want.view(np.uint32).astype(np.uint64)
        b = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even bfloat16
        b = np.where((b << 16).astype(np.uint32).view(np.float32) < want, b + 1, b)
        scale = (b << 16).astype(np.uint32).view(np.float32)[:, None, :]
        out[:, first:first + group, :] = np.clip(np.rint(xs / scale), -127, 127) * scale
    return out


def test_i8_pool_answers_as_the_cli_and_load_kv_dequantises(tmp_path):
    # --kv-dtype i8: int8 codes with a scale per head and channel (docs/format.md).
    import numpy as np
    paths = {}
    for kv_dtype in ("i8", "f32"):
        paths[kv_dtype] = str(tmp_path / kv_dtype)
        subprocess.run([CLI, "--store", paths[kv_dtype], "build", "--task", "t", "--demos",
                        EXAMPLES, "--limit", "30", "--model", MODEL, "--threads", "2",
                        "--kv-dtype", kv_dtype], check=True, capture_output=True)
    writable = shotdb.Store(paths["i8"])
    m = writable.task("t")["model"]
    assert m["dtype"] == "i8"
    zeros = [np.zeros((m["kv_heads"], 3, m["head_dim"]), np.int8)] * m["num_layers"]
    with pytest.raises(shotdb.NotSupportedError, match="i8"):
        writable.append_block("t", zeros, zeros, [(999999, "x", "set alarm")])
    writable.close()
    store = shotdb.Store(paths["i8"], readonly=True)
    session = shotdb.Session(store, "t", MODEL, threads=2)
    query = "wake me up at seven"
    a = session.ask(query, ratio=1.0)
    cli = json.loads(subprocess.run(
        [CLI, "--store", paths["i8"], "query", "--task", "t", query, "--ratio", "1", "--json",
         "--model", MODEL, "--threads", "2"], check=True, capture_output=True, text=True).stdout)
    assert a["label"] == cli["label"]
    assert a["score"] == pytest.approx(cli["score"], rel=1e-9)
    # The sink block's K/V before quantisation are the f32 pool's (it attends to nothing before
    # it): quantising those here must give load_kv's float32 values exactly.
    kv = store.load_kv("t", [0], layers=[1, 0])
    ref = shotdb.Store(paths["f32"], readonly=True).load_kv("t", [0], layers=[1, 0])
    assert kv.dtype == "f32"
    _assert_sink_block_is_quantised(kv, ref, _i8_quantised)
    shown = json.loads(subprocess.run([CLI, "--store", paths["i8"], "show", "t", "0", "--layers",
                                       "0", "--json"], check=True, capture_output=True,
                                      text=True).stdout)
    assert {t["dtype"] for t in shown["tensors"]} == {"i8"}
