"""Store.load_kv(device="cuda"): K/V staged through gpu::Stager into the store's device page cache,
as DLPack arrays on the GPU. The GPU tests need torch with CUDA, a device, and the package built
with SHOTDB_WITH_CUDA=ON; they skip otherwise. The refusal and import tests run everywhere.
"""
import concurrent.futures
import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import shotdb
from shotdb import _shotdb

LABELS = ["alarm set", "weather query", "play music"]


def cuda_unavailable_reason():
    if not _shotdb.WITH_CUDA:
        return "shotdb was built without CUDA (pip install . -C cmake.define.SHOTDB_WITH_CUDA=ON)"
    try:
        import torch
    except ImportError:
        return "needs torch"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if _shotdb.cuda_device_count() == 0:
        return "no CUDA device visible to shotdb"
    return None


_REASON = cuda_unavailable_reason()
gpu = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def test_import_initialises_no_cuda_and_loads_no_libtorch():
    code = ("import shotdb; maps = open('/proc/self/maps').read(); "
            "print('libcuda.so' in maps, 'libtorch' in maps)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == ["False", "False"]


def test_device_strings_and_builds_without_cuda(tmp_path):
    path = str(tmp_path / "s")
    rng = np.random.default_rng(1)
    with shotdb.Store(path) as store:
        store.create_task("t", architecture="llama@test", dtype="f32", tokenizer_hash="tok",
                          num_layers=2, kv_heads=2, head_dim=8, labels=LABELS)
        kv = [rng.standard_normal((2, 4, 8)).astype(np.float32) for _ in range(2)]
        store.append_block("t", kv, kv, [(1, "wake me up", "alarm set")])
    with pytest.raises(shotdb.InvalidArgumentError, match="cuda_cache_gb"):
        shotdb.Store(path, cuda_cache_gb=0)
    store = shotdb.Store(path, readonly=True)
    for bad in ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda0", " cuda"]:
        with pytest.raises(shotdb.InvalidArgumentError, match="expected 'cpu', 'cuda' or"):
            store.load_kv("t", [0], device=bad)
    if not _shotdb.WITH_CUDA:
        for device in ["cuda", "cuda:0"]:
            with pytest.raises(shotdb.NotSupportedError, match="SHOTDB_WITH_CUDA=ON"):
                store.load_kv("t", [0], device=device)
        assert _shotdb.cuda_device_count() == 0
    elif _shotdb.cuda_device_count() == 0:
        with pytest.raises(shotdb.NotSupportedError, match="no CUDA device"):
            store.load_kv("t", [0], device="cuda")
    else:
        with pytest.raises(shotdb.InvalidArgumentError, match="cuda:99: no such device"):
            store.load_kv("t", [0], device="cuda:99")
    # The CPU path is unaffected.
    kv_cpu = store.load_kv("t", [0], device="cpu")
    assert kv_cpu.device == "cpu"
    np.testing.assert_array_equal(np.from_dlpack(kv_cpu.key(1, 0)), kv[1])


# ---- on a GPU ------------------------------------------------------------------------------------

TORCH_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
BITS = {"f32": "int32", "bf16": "int16", "f16": "int16"}


def build(path, dtype="bf16", codec="raw", layers=4, heads=4, dim=64, tokens=(3, 40, 256, 17, 128),
          seed=0):
    """A task "t" whose blocks have the given token counts (small records inside LMDB pages and
    large ones on overflow pages); returns {(block, layer): (K, V)} as CPU torch tensors."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    tdtype = getattr(torch, TORCH_DTYPES[dtype])
    written = {}
    with shotdb.Store(path, sync=False) as store:
        store.create_task("t", architecture="llama@test", dtype=dtype, tokenizer_hash="tok",
                          num_layers=layers, kv_heads=heads, head_dim=dim, labels=LABELS,
                          codec=codec)
        for b, n in enumerate(tokens):
            keys = [torch.randn(heads, n, dim, generator=gen).to(tdtype) for _ in range(layers)]
            values = [torch.randn(heads, n, dim, generator=gen).to(tdtype) for _ in range(layers)]
            store.append_block("t", keys, values, [(b, f"demo {b} wake me up", LABELS[b % 3])])
            for layer in range(layers):
                written[b, layer] = (keys[layer], values[layer])
    return written


def bits(t, dtype):
    import torch
    return t.view(getattr(torch, BITS[dtype]))


@gpu
@pytest.mark.parametrize("dtype,codec", [("f32", "raw"), ("bf16", "raw"), ("f16", "raw"),
                                         ("bf16", "lz4"), ("f16", "shuffle-lz4")])
def test_cuda_arrays_equal_the_cpu_ones_bit_for_bit(tmp_path, dtype, codec):
    import torch
    path = str(tmp_path / "s")
    written = build(path, dtype, codec)
    store = shotdb.Store(path, readonly=True)
    blocks, layers = [4, 0, 2, 0, 3, 1], [3, 1, 1, 0]  # repeats allowed, as on the CPU
    gpu_kv = store.load_kv("t", blocks, layers=layers, device="cuda")
    cpu_kv = store.load_kv("t", blocks, layers=layers)
    assert gpu_kv.device == "cuda:%d" % torch.cuda.current_device()
    assert (gpu_kv.blocks, gpu_kv.layers, gpu_kv.tokens, gpu_kv.dtype) == (
        cpu_kv.blocks, cpu_kv.layers, cpu_kv.tokens, dtype)
    for li, layer in enumerate(layers):
        for bi, block in enumerate(blocks):
            for which, kind in ((gpu_kv.key, 0), (gpu_kv.value, 1)):
                t = torch.from_dlpack(which(li, bi))
                assert t.is_cuda and t.dtype == getattr(torch, TORCH_DTYPES[dtype])
                assert t.shape == written[block, layer][kind].shape
                cpu = torch.from_dlpack((cpu_kv.key if kind == 0 else cpu_kv.value)(li, bi))
                assert torch.equal(bits(t.cpu(), dtype), bits(cpu, dtype))
                assert torch.equal(bits(t.cpu(), dtype), bits(written[block, layer][kind], dtype))
        pairs = gpu_kv.layer(li)
        assert torch.equal(torch.from_dlpack(pairs[-1][1]).cpu(), written[blocks[-1], layer][1])
    stats = store._cuda_stats("cuda")
    assert stats["misses"] == 5 * 3 and stats["pinned_pages"] == 5 * 3
    if codec == "raw" and not stats["map_status"]:
        assert stats["bytes_from_map"] == stats["bytes_copied"] > 0  # straight from the map
    # Kernels on the arrays see the data (the copies were complete when load_kv returned).
    total = sum(torch.from_dlpack(gpu_kv.key(li, bi)).float().sum().item()
                for li in range(len(layers)) for bi in range(len(blocks)))
    want = sum(written[b, layer][0].float().sum().item() for layer in layers for b in blocks)
    assert total == pytest.approx(want, rel=1e-4, abs=1e-2)
    del gpu_kv, pairs, t, which
    gc.collect()
    assert store._cuda_stats()["pinned_pages"] == 0


@gpu
def test_many_blocks_and_layers(tmp_path):
    import torch
    path = str(tmp_path / "s")
    tokens = [int(n) for n in np.random.default_rng(3).integers(1, 300, 48)]
    written = build(path, "bf16", layers=16, heads=8, dim=128, tokens=tokens)
    store = shotdb.Store(path, readonly=True)
    blocks = list(np.random.default_rng(4).permutation(len(tokens))[:40])
    kv = store.load_kv("t", [int(b) for b in blocks], device="cuda:0")
    assert kv.layers == list(range(16)) and kv.tokens == [tokens[b] for b in blocks]
    for li in range(16):
        for bi, b in enumerate(blocks):
            assert torch.equal(torch.from_dlpack(kv.key(li, bi)).cpu(), written[b, li][0])
            assert torch.equal(torch.from_dlpack(kv.value(li, bi)).cpu(), written[b, li][1])


def flip_payload_byte(path, tensor):
    """Flips one byte of `tensor`'s stored bytes (every copy of them) in data.mdb."""
    import torch
    as_ints = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    needle = tensor.contiguous().view(as_ints).numpy().tobytes()[:32]
    data_file = os.path.join(path, "data.mdb")
    raw = open(data_file, "rb").read()
    at = raw.find(needle)
    assert at >= 0
    with open(data_file, "r+b") as f:
        while at >= 0:
            f.seek(at + 5)
            f.write(bytes([raw[at + 5] ^ 0x10]))
            at = raw.find(needle, at + 1)


@gpu
@pytest.mark.parametrize("tokens", [5, 256])  # a record inside an LMDB page, one on overflow pages
def test_a_corrupt_record_raises_and_returns_nothing(tmp_path, tokens):
    import torch
    path = str(tmp_path / "s")
    written = build(path, "bf16", layers=3, heads=2, dim=16,
                    tokens=(tokens, tokens + 1, tokens + 2))
    flip_payload_byte(path, written[1, 2][1])  # block 1, V of layer 2
    store = shotdb.Store(path, readonly=True)
    for _ in range(2):  # the damaged page is never cached
        with pytest.raises(shotdb.CorruptionError, match="block 1 layer 2 V"):
            store.load_kv("t", [0, 1, 2], device="cuda")
    assert store._cuda_stats()["pinned_pages"] == 0
    # The other records still load, on the GPU and on the CPU.
    kv = store.load_kv("t", [0, 1], layers=[0, 1], device="cuda")
    assert torch.equal(torch.from_dlpack(kv.key(1, 1)).cpu(), written[1, 1][0])
    with pytest.raises(shotdb.CorruptionError, match="block 1 layer 2 V"):
        store.load_kv("t", [1])
    del kv


@gpu
def test_handles_outlive_the_store(tmp_path):
    import torch
    path = str(tmp_path / "s")
    written = build(path, "f16", layers=2)
    store = shotdb.Store(path, readonly=True)
    kv = store.load_kv("t", [2, 0], device="cuda")
    array = kv.key(1, 0)
    tensor = torch.from_dlpack(kv.value(0, 1))
    store.close()
    with pytest.raises(shotdb.FailedPreconditionError, match="was closed"):
        kv.key(0, 0)
    with pytest.raises(shotdb.FailedPreconditionError, match="closed"):
        store.load_kv("t", [0], device="cuda")
    del kv, store
    gc.collect()
    # The arrays keep their pages, the Stager and the engine store alive.
    assert torch.equal(torch.from_dlpack(array).cpu(), written[2, 1][0])
    assert torch.equal((tensor * 1).cpu(), written[0, 0][1])
    with pytest.raises(shotdb.FailedPreconditionError, match="read-only"):
        shotdb.Store(path)  # still open read-only under the arrays
    torch.cuda.synchronize()
    del array, tensor
    gc.collect()
    # Everything released: the directory opens for writing and loads again.
    with shotdb.Store(path) as writable:
        kv = writable.load_kv("t", [1], device="cuda")
        assert torch.equal(torch.from_dlpack(kv.key(0, 0)).cpu(), written[1, 0][0])
        del kv


@gpu
def test_loads_share_cached_pages(tmp_path):
    import torch
    path = str(tmp_path / "s")
    written = build(path, "bf16", layers=2)
    store = shotdb.Store(path, readonly=True)
    a = torch.from_dlpack(store.load_kv("t", [1, 3], device="cuda").key(1, 0))
    b = torch.from_dlpack(store.load_kv("t", [3, 1], device="cuda").key(1, 1))
    assert a.data_ptr() == b.data_ptr()
    # Another Store object of the directory shares the engine store, and so the cache.
    other = shotdb.Store(path, readonly=True)
    c = torch.from_dlpack(other.load_kv("t", [1], layers=[1], device="cuda").key(0, 0))
    assert c.data_ptr() == a.data_ptr()
    assert torch.equal(c.cpu(), written[1, 1][0])
    stats = store._cuda_stats()
    assert stats["hits"] == 4 + 1 and stats["misses"] == 4
    del a, b, c


@gpu
def test_a_small_cache_evicts_and_refuses_when_pinned(tmp_path):
    import torch
    path = str(tmp_path / "s")
    tokens = (256,) * 6
    written = build(path, "f32", layers=2, heads=4, dim=64, tokens=tokens)
    page = 2 * 4 * 256 * 64 * 4  # K and V of one block and layer
    store = shotdb.Store(path, readonly=True, cuda_cache_gb=4 * page / 2**30)  # 4 pages
    for first in range(0, 6, 2):  # each load fills the cache; the next evicts its pages
        kv = store.load_kv("t", [first, first + 1], device="cuda")
        y = torch.from_dlpack(kv.key(1, 1)) * 2  # queued on torch's stream, then dropped
        del kv
        assert torch.equal(y.cpu(), written[first + 1, 1][0] * 2)
    assert store._cuda_stats()["evictions"] >= 8
    held = store.load_kv("t", [0, 1], device="cuda")
    with pytest.raises(shotdb.FailedPreconditionError, match="cuda_cache_gb"):
        store.load_kv("t", [2, 3], device="cuda")
    # The held pages are intact and the cache still works for what fits.
    assert torch.equal(torch.from_dlpack(held.value(0, 1)).cpu(), written[1, 0][1])
    del held
    kv = store.load_kv("t", [2, 3], device="cuda")
    assert torch.equal(torch.from_dlpack(kv.value(1, 0)).cpu(), written[2, 1][1])
    with pytest.raises(shotdb.FailedPreconditionError, match="page cache exhausted"):
        store.load_kv("t", [0, 1, 2, 3, 4], device="cuda")  # larger than the whole budget
    del kv


@gpu
def test_threads_load_concurrently(tmp_path):
    import torch
    path = str(tmp_path / "s")
    written = build(path, "bf16", layers=3, tokens=(8, 64, 200, 33))
    store = shotdb.Store(path, readonly=True)

    def reader(seed):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            b = [int(x) for x in rng.permutation(4)[:2]]
            layer = int(rng.integers(0, 3))
            kv = store.load_kv("t", b, layers=[layer], device="cuda")
            if not torch.equal(torch.from_dlpack(kv.value(0, 1)).cpu(), written[b[1], layer][1]):
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert all(pool.map(reader, range(12)))
