"""The shotdb Python package against what was written through it, the `shotdb` CLI and the
engine's checks. Needs numpy; torch (Debian's python3-torch on the CI machine) where a test says so.
"""
import concurrent.futures
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import shotdb

LAYERS, HEADS, DIM = 3, 2, 8
LABELS = ["alarm set", "weather query", "play music"]
WORDS = ["wake", "me", "up", "at", "seven", "rain", "tomorrow", "play", "jazz", "loud", "city"]


def fingerprint(dtype="f32"):
    return dict(architecture="llama@test", dtype=dtype, tokenizer_hash="tok-test",
                num_layers=LAYERS, kv_heads=HEADS, head_dim=DIM)


def make_block(rng, index, tokens, dtype=np.float32):
    keys = [rng.standard_normal((HEADS, tokens, DIM)).astype(dtype) for _ in range(LAYERS)]
    values = [rng.standard_normal((HEADS, tokens, DIM)).astype(dtype) for _ in range(LAYERS)]
    demos = []
    for i in range(3):
        text = " ".join(rng.choice(WORDS, size=4))
        demos.append((index * 100 + i, text, LABELS[(index + i) % 3]))
    return keys, values, demos


@pytest.fixture
def filled(tmp_path):
    """A store with task "t": 4 blocks of 5..8 tokens, float32 K/V; returns (path, blocks)."""
    path = str(tmp_path / "store")
    rng = np.random.default_rng(7)
    blocks = []
    with shotdb.Store(path) as store:
        store.create_task("t", labels=LABELS, **fingerprint())
        for b in range(4):
            keys, values, demos = make_block(rng, b, 5 + b)
            assert store.append_block("t", keys, values, demos) == b
            blocks.append((keys, values, demos))
    return path, blocks


def test_round_trip_of_every_call(filled, tmp_path):
    path, blocks = filled
    with shotdb.Store(path, readonly=True) as store:
        assert [t["name"] for t in store.tasks()] == ["t"]
        t = store.task("t")
        assert t["model"] == fingerprint()
        assert (t["num_blocks"], t["num_demos"], t["num_tokens"]) == (4, 12, 5 + 6 + 7 + 8)
        assert (t["positions"], t["bm25"], t["demos_per_block"]) == ("windowed", "retriv", 5)
        assert t["bm25_params"]["idf"] == "lucene"
        infos = store.blocks("t")
        assert [b["tokens"] for b in infos] == [5, 6, 7, 8]
        assert [b["position_offset"] for b in infos] == [0, 5, 11, 18]
        for b, (_, _, demos) in zip(infos, blocks):
            assert b["demo_ids"] == [d[0] for d in demos]
            for demo_id, text, label in demos:
                assert store.demonstration("t", demo_id) == (demo_id, text, label)
                assert f"utterance: {text}\nintent: {label}" in b["text"]
        # Demonstrations are numbered in pool order.
        flat = [d for _, _, demos in blocks for d in demos]
        assert [store.demonstration_at("t", n) for n in range(12)] == flat

        kv = store.load_kv("t", [3, 1], layers=[2, 0])
        assert (kv.blocks, kv.layers, kv.tokens, kv.dtype, len(kv)) == ([3, 1], [2, 0], [8, 6],
                                                                          "f32", 2)
        for li, layer in enumerate(kv.layers):
            for bi, block in enumerate(kv.blocks):
                np.testing.assert_array_equal(np.from_dlpack(kv.key(li, bi)),
                                              blocks[block][0][layer])
                np.testing.assert_array_equal(np.from_dlpack(kv.value(li, bi)),
                                              blocks[block][1][layer])
            pairs = kv.layer(li)
            np.testing.assert_array_equal(np.from_dlpack(pairs[0][1]), blocks[3][1][layer])
        report = store.verify()
        assert report["ok"] and report["records"] == 4 * LAYERS * 2 and not report["problems"]

        export = str(tmp_path / "t.shotdb")
        store.export_task("t", export)
    with shotdb.Store(str(tmp_path / "copy")) as copy:
        assert copy.import_task(export) == "t"
        kv = copy.load_kv("t", [0])
        np.testing.assert_array_equal(np.from_dlpack(kv.key(1, 0)), blocks[0][0][1])
        assert copy.search("t", "wake me up", 4) == shotdb.Store(path, readonly=True).search(
            "t", "wake me up", 4)
        del kv
        copy.delete_task("t")
        with pytest.raises(KeyError):
            copy.task("t")


def mapping_of(path):
    """(start, end) of this process's mapping of `path`, from /proc/self/maps."""
    st = os.stat(path)
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and int(parts[4]) == st.st_ino and parts[5].endswith("data.mdb"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            return start, end
    return None


def test_raw_payloads_are_zero_copy_views_of_the_map(tmp_path):
    path = str(tmp_path / "z")
    rng = np.random.default_rng(5)
    keys, values, demos = make_block(rng, 0, 256)  # 16 KiB records: on their own pages
    with shotdb.Store(path) as store:
        store.create_task("t", labels=LABELS, **fingerprint())
        store.append_block("t", keys, values, demos)
    store = shotdb.Store(path, readonly=True)
    a = np.from_dlpack(store.load_kv("t", [0]).key(1, 0))
    b = np.from_dlpack(store.load_kv("t", [0]).key(1, 0))
    np.testing.assert_array_equal(a, keys[1])
    # Two handles, two snapshots: the same bytes, inside the store's memory map.
    assert a.ctypes.data == b.ctypes.data
    start, end = mapping_of(os.path.join(path, "data.mdb"))
    assert start <= a.ctypes.data and a.ctypes.data + a.nbytes <= end


def test_bf16_through_torch(tmp_path):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(3)
    with shotdb.Store(str(tmp_path / "s")) as store:
        store.create_task("b", labels=LABELS, **fingerprint("bf16"))
        keys = [torch.randn(HEADS, 9, DIM, generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
        values = [torch.randn(HEADS, 9, DIM, generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
        store.append_block("b", keys, values, [(1, "wake me up", "alarm set")])
        kv = store.load_kv("b", [0])
        for layer in range(LAYERS):
            k = torch.from_dlpack(kv.key(layer, 0))
            assert k.dtype == torch.bfloat16 and k.shape == (HEADS, 9, DIM)
            assert torch.equal(k, keys[layer])
            assert torch.equal(torch.from_dlpack(kv.value(layer, 0)), values[layer])
        # Raw bits as uint16 are accepted for a bf16 task.
        bits = [k.view(torch.int16).numpy().view(np.uint16) for k in keys]
        store.append_block("b", bits, bits, [(2, "rain", "weather query")])
        kv2 = store.load_kv("b", [1], layers=[0])
        assert torch.equal(torch.from_dlpack(kv2.key(0, 0)), keys[0])
        del kv, kv2


def test_values_equal_what_the_cli_shows(filled):
    cli = os.environ.get("SHOTDB_CLI") or shutil.which("shotdb")
    if not cli or not os.path.exists(cli):
        pytest.skip("no shotdb CLI (set SHOTDB_CLI)")
    path, _ = filled
    shown = json.loads(subprocess.run([cli, "--store", path, "show", "t", "2", "--json"],
                                      check=True, capture_output=True, text=True).stdout)
    store = shotdb.Store(path, readonly=True)
    kv = store.load_kv("t", [2])
    for tensor in shown["tensors"]:
        which = kv.key if tensor["kind"] == "K" else kv.value
        a = np.from_dlpack(which(tensor["layer"], 0)).astype(np.float64)
        assert list(a.shape) == tensor["shape"]
        assert a.min() == tensor["min"] and a.max() == tensor["max"]
        assert a.mean() == pytest.approx(tensor["mean"], rel=1e-12)
    hits = json.loads(subprocess.run([cli, "--store", path, "search", "t", "rain jazz", "-k", "4",
                                      "--json"], check=True, capture_output=True,
                                     text=True).stdout)
    assert [(h["block"], h["score"]) for h in hits] == store.search("t", "rain jazz", 4)


def flip_payload_byte(path, array):
    """Flips one byte of `array`'s stored bytes (every copy of them) in data.mdb."""
    data_file = os.path.join(path, "data.mdb")
    raw = open(data_file, "rb").read()
    needle = array.tobytes()[:32]
    at = raw.find(needle)
    assert at >= 0
    with open(data_file, "r+b") as f:
        while at >= 0:
            f.seek(at + 5)
            f.write(bytes([raw[at + 5] ^ 0x10]))
            at = raw.find(needle, at + 1)


def test_a_corrupt_record_raises_and_returns_nothing(filled):
    path, blocks = filled
    flip_payload_byte(path, blocks[1][1][2])  # block 1, V of layer 2
    store = shotdb.Store(path, readonly=True)
    with pytest.raises(shotdb.CorruptionError, match="block 1 layer 2 V"):
        store.load_kv("t", [0, 1])
    # The other records still read; verify names the damage.
    kv = store.load_kv("t", [0, 1], layers=[0, 1])
    np.testing.assert_array_equal(np.from_dlpack(kv.key(0, 1)), blocks[1][0][0])
    report = store.verify("t")
    assert not report["ok"] and "block 1 layer 2 V" in report["problems"][0]
    del kv


def test_a_handle_outliving_its_store_is_refused(filled):
    path, blocks = filled
    store = shotdb.Store(path, readonly=True)
    kv = store.load_kv("t", [0])
    array = kv.key(0, 0)
    store.close()
    assert store.closed
    # The handle refuses to make arrays from a closed store; arrays made before stay valid.
    with pytest.raises(shotdb.FailedPreconditionError, match="was closed"):
        kv.key(0, 0)
    with pytest.raises(shotdb.FailedPreconditionError, match="closed"):
        store.load_kv("t", [0])
    del kv
    np.testing.assert_array_equal(np.from_dlpack(array), blocks[0][0][0])
    # Dropping the Python Store while arrays live keeps the engine store open under them.
    store = shotdb.Store(path, readonly=True)
    values = np.from_dlpack(store.load_kv("t", [3]).value(2, 0))
    del store
    np.testing.assert_array_equal(values, blocks[3][1][2])
    # While it is open read-only in this process (the arrays hold it), it cannot be opened for
    # writing: LMDB must not open one environment twice in a process.
    with pytest.raises(shotdb.FailedPreconditionError, match="read-only"):
        shotdb.Store(path)
    del array, values
    with shotdb.Store(path) as writable:
        assert writable.task("t")["num_blocks"] == 4


def test_bad_input_is_refused_and_nothing_is_written(filled):
    path, blocks = filled
    with shotdb.Store(path) as store:
        keys, values, demos = blocks[0]
        with pytest.raises(shotdb.InvalidArgumentError, match=r"shape \[2, 5, 4\], expected"):
            store.append_block("t", [k[:, :, :4].copy() for k in keys], values, [(900, "x", "y")])
        with pytest.raises(shotdb.InvalidArgumentError, match="dtype"):
            store.append_block("t", [k.astype(np.float64) for k in keys], values, [(901, "x", "y")])
        with pytest.raises(shotdb.InvalidArgumentError, match="one per layer"):
            store.append_block("t", keys[:2], values, [(902, "x", "y")])
        with pytest.raises(shotdb.InvalidArgumentError, match="already stored"):
            store.append_block("t", keys, values, [(0, "again", "alarm set")])
        assert store.task("t")["num_blocks"] == 4
        with pytest.raises(KeyError, match="no such task"):
            store.load_kv("missing", [0])
        with pytest.raises(KeyError, match="block 9"):
            store.load_kv("t", [9])
        with pytest.raises(ValueError, match="layer 7"):
            store.load_kv("t", [0], layers=[7])
        with pytest.raises(ValueError, match="device 'tpu'"):
            store.load_kv("t", [0], device="tpu")
        with pytest.raises(shotdb.AlreadyExistsError):
            store.create_task("t", labels=LABELS, **fingerprint())
        with pytest.raises(ValueError, match="positions"):
            store.create_task("u", labels=LABELS, positions="diagonal", **fingerprint())
        with pytest.raises(ValueError, match="template"):
            store.create_task("u", labels=LABELS, prompt_template="{label}", **fingerprint())
        assert [t["name"] for t in store.tasks()] == ["t"]
    with pytest.raises(shotdb.StoreIOError):
        shotdb.Store(path, readonly=True).create_task("v", labels=LABELS, **fingerprint())
    with pytest.raises(KeyError):
        shotdb.Store(os.path.join(path, "nowhere"), readonly=True)


def test_concurrent_readers_in_threads(filled):
    path, blocks = filled
    store = shotdb.Store(path, readonly=True)
    want_hits = store.search("t", "play jazz tomorrow", 4)

    def reader(seed):
        rng = np.random.default_rng(seed)
        for _ in range(50):
            b = int(rng.integers(0, 4))
            layer = int(rng.integers(0, LAYERS))
            kv = store.load_kv("t", [b], layers=[layer])
            if not np.array_equal(np.from_dlpack(kv.value(0, 0)), blocks[b][1][layer]):
                return False
            if store.search("t", "play jazz tomorrow", 4) != want_hits:
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(reader, range(16)))


def test_a_writer_thread_and_readers(tmp_path):
    path = str(tmp_path / "w")
    rng = np.random.default_rng(11)
    written = [make_block(rng, b, 6) for b in range(12)]
    with shotdb.Store(path, sync=False) as store:
        store.create_task("t", labels=LABELS, **fingerprint())

        def writer():
            for b, (k, v, d) in enumerate(written):
                assert store.append_block("t", k, v, d) == b

        def reader(_):
            seen = 0
            while seen < len(written):
                seen = store.task("t")["num_blocks"]
                if seen:
                    kv = store.load_kv("t", [seen - 1], layers=[1])
                    # Never a partial block: what is visible is exactly what was written.
                    assert np.array_equal(np.from_dlpack(kv.key(0, 0)), written[seen - 1][0][1])
                    del kv
            return seen

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            readers = [pool.submit(reader, i) for i in range(4)]
            pool.submit(writer).result()
            assert [r.result() for r in readers] == [12] * 4


def test_python_m_shotdb_runs_the_cli(tmp_path):
    """`python -m shotdb ARGS` is the CLI with ARGS (its output and exit code), or a clear error."""
    import sys
    cli = os.environ.get("SHOTDB_CLI") or shutil.which("shotdb")
    if not cli:
        pytest.skip("no shotdb CLI (set SHOTDB_CLI)")
    path = str(tmp_path / "st")
    with shotdb.Store(path) as store:
        store.create_task("t", labels=LABELS, **fingerprint())
    env = dict(os.environ, SHOTDB_CLI=cli)
    direct = subprocess.run([cli, "--store", path, "ls"], capture_output=True, text=True)
    via = subprocess.run([sys.executable, "-m", "shotdb", "--store", path, "ls"],
                         capture_output=True, text=True, env=env)
    assert via.returncode == direct.returncode == 0
    assert via.stdout == direct.stdout and "t" in via.stdout
    bad = subprocess.run([sys.executable, "-m", "shotdb", "--store", path, "info", "nope"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "nope" in bad.stderr
    env.pop("SHOTDB_CLI")
    env["PATH"] = str(tmp_path)  # no shotdb there
    missing = subprocess.run([sys.executable, "-m", "shotdb", "ls"], capture_output=True,
                             text=True, env=env)
    assert missing.returncode == 2 and "SHOTDB_CLI" in missing.stderr
