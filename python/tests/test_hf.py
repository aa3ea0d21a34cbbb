"""shotdb.hf (the HF transformers path) against the C++ runtime and an independent float64 reference.

Checkpoints are tiny randomly initialised Llama (GQA), Llama with llama3 RoPE scaling and tied
embeddings, and Qwen2 (q/k/v biases) whose vocabulary is the SmolLM2 tokenizer's (committed under
tests/fixtures/tokenizer/), written to a temporary directory with save_pretrained, so that
transformers and the C++ runtime load the same files. Needs torch and transformers >= 4.45; the
parity tests also need shotdb._runtime (the package built with libtorch) and the CLI (SHOTDB_CLI).
"""
import csv
import json
import math
import os
import shutil
import subprocess

import pytest

torch = pytest.importorskip(
    "torch", reason="shotdb.hf tests need torch and transformers (run on the GPU machine: torch "
    "2.11 + transformers 5.17)")
transformers = pytest.importorskip(
    "transformers", minversion="4.45",
    reason="shotdb.hf tests need transformers >= 4.45: the test command installs 4.46 into its venv "
    "over Debian's torch 1.13 (pip install 'transformers>=4.45,<4.47'; this skip means that "
    "install failed, e.g. offline); the GPU machine has torch 2.11 + transformers 5.17")

import shotdb  # noqa: E402
import shotdb.hf as hf  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "smollm2_tokenizer.json")
DEMOS = os.path.join(ROOT, "examples", "intents_demos.csv")
QUERIES = os.path.join(ROOT, "examples", "intents_test.csv")
CLI = os.environ.get("SHOTDB_CLI", "")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def runtime_available():
    try:
        import shotdb._runtime  # noqa: F401
        return True
    except ImportError:
        return False


needs_runtime = pytest.mark.skipif(not runtime_available(),
                                   reason="needs shotdb._runtime (pip install . -C "
                                   "cmake.define.SHOTDB_WITH_TORCH=ON)")
needs_cli = pytest.mark.skipif(not (runtime_available() and CLI and os.path.exists(CLI)),
                               reason="needs shotdb._runtime and the shotdb CLI (SHOTDB_CLI)")


def read_rows(path, n):
    with open(path, newline="") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f)][:n]


def randomize(model, seed):
    # Larger than HF's init (std 0.02), so that every weight, norm and bias matters.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[-1] ** 0.5))


def set_rope(cfg, theta, scaling):
    params = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        params.update(scaling)
    if hasattr(cfg, "rope_parameters"):  # transformers 5
        cfg.rope_parameters = params
    else:
        cfg.rope_theta = theta
        cfg.rope_scaling = scaling


def make_checkpoint(kind, path, max_positions=4096):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=max_positions, rms_norm_eps=1e-5, hidden_act="silu")
    if kind == "llama":
        cfg, cls = LlamaConfig(tie_word_embeddings=False, **common), LlamaForCausalLM
        set_rope(cfg, 10000.0, None)
    elif kind == "llama3":
        cfg, cls = LlamaConfig(tie_word_embeddings=True, **common), LlamaForCausalLM
        set_rope(cfg, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    else:
        cfg, cls = Qwen2Config(tie_word_embeddings=False, **common), Qwen2ForCausalLM
        set_rope(cfg, 1000000.0, None)
    torch.manual_seed(0)
    model = cls(cfg)
    randomize(model, {"llama": 1, "llama3": 2, "qwen2": 3}[kind])
    model.save_pretrained(path, safe_serialization=True)
    shutil.copy(TOKENIZER, os.path.join(path, "tokenizer.json"))
    return path


def load(path, device="cpu", dtype=torch.float32):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    model = model.to(device=device, dtype=dtype).eval()
    return model, PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: make_checkpoint(k, str(root / k)) for k in ("llama", "llama3", "qwen2")}


def cli(*args):
    return subprocess.run([CLI] + [str(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


def cli_build(store, task, model_dir, positions="windowed", n=30, extra=()):
    cli("--store", store, "build", "--task", task, "--demos", DEMOS, "--limit", n, "--model",
        model_dir, "--kv-dtype", "f32", "--positions", positions, "--threads", 1, *extra)


def assert_kv_close(a_store, a_task, b_store, b_task, rel=1e-4):
    info = a_store.task(a_task)
    n = info["num_blocks"]
    ka, kb = a_store.load_kv(a_task, list(range(n))), b_store.load_kv(b_task, list(range(n)))
    for layer in range(info["model"]["num_layers"]):
        for b in range(n):
            for part in ("key", "value"):
                x = torch.from_dlpack(getattr(ka, part)(layer, b)).double()
                y = torch.from_dlpack(getattr(kb, part)(layer, b)).double()
                assert x.shape == y.shape
                err = ((x - y).abs().max() / y.abs().max()).item()
                assert err < rel, (layer, b, part, err)


# ---- (a) stored K/V equal the C++ encoder's ---------------------------------------------------

@needs_cli
@pytest.mark.parametrize("kind,positions", [("llama", "windowed"), ("llama3", "windowed"),
                                            ("qwen2", "windowed"), ("llama", "sequential")])
def test_stored_kv_equal_the_cpp_encoder(tmp_path, checkpoints, kind, positions):
    path = checkpoints[kind]
    cli_build(tmp_path / "cli", "t", path, positions)
    model, tok = load(path)
    store = shotdb.Store(str(tmp_path / "hf"))
    report = hf.encode_pool(store, "t", model, tok, read_rows(DEMOS, 30), positions=positions,
                            kv_dtype="f32")
    ref = shotdb.Store(str(tmp_path / "cli"), readonly=True)
    mine, theirs = store.task("t"), ref.task("t")
    # The same fingerprint (so either runtime accepts either store) and the same options.
    for key in ("model", "labels", "demos_per_block", "window", "sink_blocks", "positions",
                "prompt_template", "separator", "bm25", "num_blocks", "num_demos", "num_tokens"):
        assert mine[key] == theirs[key], key
    assert report["blocks"] == list(range(theirs["num_blocks"])) and report["skipped"] == 0
    assert report["tokens"] == theirs["num_tokens"]
    # The same plan, texts and tokens (HF's tokenizer agrees with the C++ one on these texts).
    for a, b in zip(store.blocks("t"), ref.blocks("t")):
        assert a == b
    assert_kv_close(store, "t", ref, "t")
    # Running again adds nothing: every demonstration is stored.
    again = hf.encode_pool(store, "t", model, tok, read_rows(DEMOS, 30))
    assert again["blocks"] == [] and again["skipped"] == 30
    assert store.task("t")["version"] == mine["version"]


# ---- (b) the block-sparse mask against a dense float64 reference -------------------------------

def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, positions, theta):
    # x [heads, T, d]; rotate-half with float64 angles.
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def dense_reference(model, theta, block_ids, window, sinks, scheme):
    """Every layer's pre-RoPE K and V of the whole pool, computed layer by layer over all tokens at
    once (the opposite order of the block-by-block encoder): at each layer, block i's queries
    attend to the sink blocks, the previous `window` blocks and themselves causally, every key
    rotated at the position block i's layout gives it (windowed: its context laid out from 0;
    sequential: pool offsets). float64, from the state dict alone."""
    cfg = model.config
    sd = {k: v.detach().cpu().double() for k, v in model.state_dict().items()}
    heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    ids = torch.tensor([t for b in block_ids for t in b])
    starts = [sum(len(b) for b in block_ids[:i]) for i in range(len(block_ids))]
    h = sd["model.embed_tokens.weight"][ids]
    out = []
    for layer in range(cfg.num_hidden_layers):
        p = "model.layers.%d." % layer

        def lin(name, x):
            y = x @ sd[p + name + ".weight"].T
            return y + sd[p + name + ".bias"] if p + name + ".bias" in sd else y
        x = rms_norm(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = lin("self_attn.q_proj", x).view(-1, heads, d).transpose(0, 1)
        k = lin("self_attn.k_proj", x).view(-1, kvh, d).transpose(0, 1)
        v = lin("self_attn.v_proj", x).view(-1, kvh, d).transpose(0, 1)
        out.append((k, v))
        attn = torch.zeros_like(q)
        for i, block in enumerate(block_ids):
            ctx = hf.context_blocks(i, window, sinks) + [i]
            keys = torch.cat([torch.arange(starts[c], starts[c] + len(block_ids[c]))
                              for c in ctx])
            if scheme == "sequential":
                kpos = keys
            else:
                kpos = torch.arange(len(keys))
            n = len(block)
            qpos = kpos[-n:]
            own = slice(starts[i], starts[i] + n)
            qi = rope(q[:, own], qpos, theta)
            ki = rope(k[:, keys], kpos, theta).repeat_interleave(heads // kvh, 0)
            vi = v[:, keys].repeat_interleave(heads // kvh, 0)
            scores = qi @ ki.transpose(1, 2) / math.sqrt(d)
            allowed = torch.ones(n, len(keys), dtype=torch.bool)
            allowed[:, -n:] = torch.ones(n, n).tril().bool()
            scores = scores.masked_fill(~allowed, float("-inf"))
            attn[:, own] = scores.softmax(-1) @ vi
        h = h + attn.transpose(0, 1).reshape(len(ids), heads * d) @ \
            sd[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = lin("mlp.gate_proj", x), lin("mlp.up_proj", x)
        h = h + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return out, starts


@pytest.mark.parametrize("kind,scheme,window", [("llama", "windowed", 2), ("qwen2", "windowed", 1),
                                                ("llama", "sequential", 2)])
def test_block_sparse_mask_matches_a_dense_reference(tmp_path, checkpoints, kind, scheme,
                                                     window):
    model, tok = load(checkpoints[kind], dtype=torch.float64)
    theta = {"llama": 10000.0, "qwen2": 1000000.0}[kind]
    rows = read_rows(DEMOS, 24)
    # A fixed grouping and a fingerprint of our own: this test needs no C++ runtime.
    groups = [[(i + 1, t, l) for i, (t, l) in enumerate(rows)][j:j + 4] for j in range(0, 24, 4)]
    fp = dict(architecture=kind + "@test", dtype="f64", tokenizer_hash="smollm2", num_layers=2,
              kv_heads=2, head_dim=16)
    store = shotdb.Store(str(tmp_path / "s"))
    hf.encode_pool(store, "t", model, tok, rows, fingerprint=fp, groups=groups, window=window,
                   positions=scheme, demos_per_block=4)
    blocks = store.blocks("t")
    assert len(blocks) == 6 and [b["demo_ids"] for b in blocks] == \
        [[i for i, _, _ in g] for g in groups]
    block_ids = [tok(b["text"], add_special_tokens=False)["input_ids"] for b in blocks]
    assert [len(b) for b in block_ids] == [b["tokens"] for b in blocks]
    ref, starts = dense_reference(model, theta, block_ids, window, 1, scheme)
    kv = store.load_kv("t", list(range(6)))
    for layer, (k, v) in enumerate(ref):
        for b in range(6):
            own = slice(starts[b], starts[b] + len(block_ids[b]))
            for got, want in ((kv.key(layer, b), k[:, own]), (kv.value(layer, b), v[:, own])):
                got = torch.from_dlpack(got)
                err = ((got - want).abs().max() / want.abs().max()).item()
                # HF computes RoPE angles in float32; everything else is float64.
                assert err < 1e-5, (layer, b, err)
    # The reference tells the masks apart: with full causal attention over the pool, block 5
    # (which skips blocks 1..4-window) gets other layer-1 keys.
    full, _ = dense_reference(model, theta, block_ids, window=10, sinks=1, scheme=scheme)
    b5 = slice(starts[5], starts[5] + len(block_ids[5]))
    assert (full[1][0][:, b5] - ref[1][0][:, b5]).abs().max() > 1e-3


# ---- (c) answers equal the C++ runtime's ---------------------------------------------------------

def assert_same_answer(mine, theirs):
    assert mine["label"] == theirs["label"]
    assert mine["score"] == pytest.approx(theirs["score"], rel=1e-4, abs=1e-4)
    assert mine["label_scores"] == pytest.approx(theirs["label_scores"], rel=1e-4, abs=1e-4)
    assert mine["block_scores"] == pytest.approx(theirs["block_scores"], rel=1e-9)
    for key in ("blocks", "context_tokens", "prompt_tokens", "budget", "budget_bound"):
        assert mine[key] == theirs[key], key


@needs_cli
@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2"])
@pytest.mark.parametrize("built_by", ["hf", "cli"])
def test_answer_equals_the_cpp_runtime(tmp_path, checkpoints, kind, built_by):
    path = checkpoints[kind]
    model, tok = load(path)
    store_dir = str(tmp_path / "s")
    if built_by == "cli":
        cli_build(store_dir, "t", path, n=60)
        store = shotdb.Store(store_dir, readonly=True)
    else:
        store = shotdb.Store(store_dir)
        hf.encode_pool(store, "t", model, tok, read_rows(DEMOS, 60), kv_dtype="f32")
    session = shotdb.Session(store, "t", path, threads=1)
    tight = shotdb.Session(store, "t", path, threads=1, max_context=260)
    labels_seen = set()
    for text, _ in read_rows(QUERIES, 6):
        for options in (dict(ratio=0.3), dict(ratio=1.0), dict(count=3, order="score")):
            mine = hf.answer(store, "t", model, tok, text, **options)
            assert_same_answer(mine, session.ask(text, **options))
            labels_seen.add(mine["label"])
        # A budget that binds: fewer blocks than asked for, the same ones.
        mine = hf.answer(store, "t", model, tok, text, ratio=1.0, max_context=260)
        assert mine["budget_bound"] and mine["context_tokens"] <= mine["budget"]
        assert_same_answer(mine, tight.ask(text, ratio=1.0))
    assert labels_seen <= set(store.task("t")["labels"])


@needs_cli
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path, checkpoints):
    path = checkpoints["llama"]
    cpu_model, tok = load(path)
    gpu_model, _ = load(path, device="cuda")
    a, b = shotdb.Store(str(tmp_path / "cpu")), shotdb.Store(str(tmp_path / "gpu"))
    hf.encode_pool(a, "t", cpu_model, tok, read_rows(DEMOS, 30), kv_dtype="f32")
    hf.encode_pool(b, "t", gpu_model, tok, read_rows(DEMOS, 30), kv_dtype="f32")
    assert_kv_close(b, "t", a, "t", rel=1e-3)
    session = shotdb.Session(a, "t", path, device="cuda", dtype="f32", threads=1)
    for text, _ in read_rows(QUERIES, 4):
        mine, theirs = hf.answer(b, "t", gpu_model, tok, text, ratio=0.5), \
            session.ask(text, ratio=0.5)
        assert mine["label"] == theirs["label"] and mine["blocks"] == theirs["blocks"]
        assert mine["score"] == pytest.approx(theirs["score"], rel=1e-3, abs=1e-3)


@needs_cli
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_dtype", ["i8", "f8e4m3"])
def test_scaled_kv_on_cuda_are_the_cpu_values_in_bf16(tmp_path, checkpoints, kv_dtype):
    # Store.load_kv(device="cuda") of a scaled task: the device dequantises the records as they
    # land (gpu::LaunchUnpackKv) into bf16 pages; the CPU dequantises them in C++ (KvToFloat) to
    # float32, which test_session.py checks against numpy references. Two implementations, one
    # answer: the device's arrays are the CPU's values rounded to bf16, bit for bit.
    from shotdb import _shotdb
    if not _shotdb.WITH_CUDA or _shotdb.cuda_device_count() == 0:
        pytest.skip("shotdb built without CUDA, or no device visible to it")
    path = str(tmp_path / kv_dtype)
    cli("--store", path, "build", "--task", "t", "--demos", DEMOS, "--limit", 30, "--model",
        checkpoints["llama3"], "--kv-dtype", kv_dtype, "--threads", 1)
    store = shotdb.Store(path, readonly=True)
    n = store.task("t")["num_blocks"]
    blocks, layers = [n - 1, 0, 2, 0], [1, 0]  # repeats allowed
    cpu = store.load_kv("t", blocks, layers=layers)
    gpu = store.load_kv("t", blocks, layers=layers, device="cuda")
    assert (cpu.dtype, gpu.dtype) == ("f32", "bf16")
    assert (gpu.blocks, gpu.layers, gpu.tokens) == (cpu.blocks, cpu.layers, cpu.tokens)
    for li in range(len(layers)):
        for bi in range(len(blocks)):
            for kind in ("key", "value"):
                got = torch.from_dlpack(getattr(gpu, kind)(li, bi))
                want = torch.from_dlpack(getattr(cpu, kind)(li, bi))
                assert got.is_cuda and got.dtype == torch.bfloat16 and got.shape == want.shape
                assert torch.equal(got.cpu().view(torch.int16),
                                   want.to(torch.bfloat16).view(torch.int16))
                assert want.abs().max().item() > 0  # real values, not zeros on both sides


# ---- (d) bad input raises and writes nothing --------------------------------------------------

def test_bad_input_raises_and_writes_nothing(tmp_path, checkpoints):
    model, tok = load(checkpoints["llama"])
    qwen, _ = load(checkpoints["qwen2"])
    fp = dict(architecture="llama@test", dtype="f32", tokenizer_hash="smollm2", num_layers=2,
              kv_heads=2, head_dim=16)
    rows = read_rows(DEMOS, 10)
    store = shotdb.Store(str(tmp_path / "s"))

    def refused(exc, match, **kw):
        with pytest.raises(exc, match=match):
            hf.encode_pool(store, kw.pop("task", "t"), kw.pop("model", model), tok,
                           kw.pop("demos", rows), **{"fingerprint": fp, **kw})
    refused(ValueError, "not one of task 't''s labels", labels=["weather query"])
    refused(ValueError, "expected a \\(text, label\\) pair", demos=rows + [("only text",)])
    refused(ValueError, "exactly one \\{text\\}", prompt_template="no placeholders")
    refused(ValueError, "kv_dtype", kv_dtype="f8", fingerprint=None)
    refused(ValueError, "positions", positions="diagonal")
    refused(ValueError, "but the model is", model=qwen, fingerprint=dict(fp, num_layers=3))
    refused(ValueError, "beyond the model's", demos_per_block=10,
            model=load(make_checkpoint("llama", str(tmp_path / "short"), 64))[0])
    assert store.tasks() == []

    hf.encode_pool(store, "t", model, tok, rows, fingerprint=fp,
                   groups=[[(i, t, l) for i, (t, l) in enumerate(rows[:5])]])
    before = store.task("t")
    # Another model, other options, an unknown label: refused, the task untouched.
    refused(shotdb.FailedPreconditionError, "was encoded with model",
            fingerprint=dict(fp, tokenizer_hash="other"))
    refused(ValueError, "exists with window", window=5)
    refused(ValueError, "not one of task", demos=[("x", "no such label")])
    assert store.task("t") == before
    # (check_fingerprint=False: this task's fingerprint is made up)
    with pytest.raises(ValueError, match="no room"):
        hf.answer(store, "t", model, tok, "wake me up", max_context=8, check_fingerprint=False)
    with pytest.raises(ValueError, match="order"):
        hf.answer(store, "t", model, tok, "wake me up", order="random", check_fingerprint=False)
    with pytest.raises(ValueError, match="but the model is"):
        hf.answer(store, "t", _three_layer(), tok, "x")
    with pytest.raises(KeyError):
        hf.answer(store, "missing", model, tok, "x")
    assert store.task("t") == before


def _three_layer():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@needs_runtime
def test_answer_refuses_another_checkpoint(tmp_path, checkpoints):
    model, tok = load(checkpoints["llama"])
    store = shotdb.Store(str(tmp_path / "s"))
    hf.encode_pool(store, "t", model, tok, read_rows(DEMOS, 10), kv_dtype="f32")
    fp = store.task("t")["model"]
    assert fp == {k: v for k, v in shotdb._runtime.model_fingerprint(
        checkpoints["llama"], "f32").items() if k in fp}
    assert json.loads(store.task("t")["metadata_json"])["encoder"] == "shotdb.hf"
    # Same shape, other weights: only the fingerprint tells them apart.
    other = make_checkpoint("llama", str(tmp_path / "other"))
    with torch.no_grad():
        o, _ = load(other)
        o.model.norm.weight.mul_(2)
        o.save_pretrained(other, safe_serialization=True)
    with pytest.raises(shotdb.FailedPreconditionError, match="was encoded with model"):
        hf.answer(store, "t", load(other)[0], tok, "wake me up")
    with pytest.raises(shotdb.FailedPreconditionError, match="was encoded with model"):
        hf.encode_pool(store, "t", load(other)[0], tok, read_rows(DEMOS, 12))
