"""shotdb.hf: DBSA with a Hugging Face transformers causal LM (Llama, Qwen2, Mistral families).

The same two stages as the C++ runtime (docs/python.md), with the model running in transformers:

- ``encode_pool`` groups demonstrations into blocks exactly as ``shotdb build`` does, encodes each
  block with the block-sparse mask (the block attends to the sink block(s), the previous ``window``
  blocks and itself, causally; RoPE positions by the task's scheme, ``windowed`` or
  ``sequential``), captures every layer's pre-RoPE K (``k_proj`` output, bias included) and V
  (``v_proj``), and appends them through ``Store.append_block``. The task records the fingerprint
  the C++ runtime computes for the same checkpoint, so ``shotdb query`` and ``shotdb.Session``
  accept the store, and this module answers from stores that ``shotdb build`` wrote.
- ``answer`` selects blocks with the store's own BM25 (``Store.search``) under the same selection
  size and context budget as ``shotdb query``, loads their K/V (``Store.load_kv``), applies RoPE at
  new contiguous positions 0..L-1 with the model's own rotary embedding (llama3 scaling included),
  places them in a transformers ``DynamicCache`` and scores every label of the task by its summed
  log-probability after the query prompt (constrained label scoring; the best label wins, the
  lowest index on ties).

torch and transformers are imported by this module only (``import shotdb`` never loads them).
The fingerprint and the block plan come from the C++ runtime's own code (``shotdb._runtime``,
built with ``pip install . -C cmake.define.SHOTDB_WITH_TORCH=ON``); without it, pass
``fingerprint=`` and ``groups=`` yourself. Tested with transformers 4.46 (torch 1.13) and 5.17
(torch 2.11).
"""
import json
import math
import os

from . import _shotdb
from .errors import (FailedPreconditionError, InvalidArgumentError, NotSupportedError)

import torch  # noqa: E402  (shotdb.hf needs torch; `import shotdb` does not import this module)

ARCHITECTURES = ("llama", "qwen2", "mistral")
_TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16,
                 "f64": torch.float64}
_FINGERPRINT_KEYS = ("architecture", "dtype", "tokenizer_hash", "num_layers", "kv_heads",
                     "head_dim")


# ---- the model ----------------------------------------------------------------------------------

def _config(model):
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "lm_head"):
        raise InvalidArgumentError("shotdb.hf needs a transformers causal LM (e.g. "
                                   "LlamaForCausalLM, Qwen2ForCausalLM), got " + type(model).__name__)
    if cfg.model_type not in ARCHITECTURES:
        raise NotSupportedError("model_type '%s': shotdb.hf supports %s" %
                                (cfg.model_type, ", ".join(ARCHITECTURES)))
    return cfg


def _shape(model):
    """(num_layers, kv_heads, head_dim) of the model's K/V."""
    cfg = _config(model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def _decoder(model):
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise InvalidArgumentError("%s has no .model.layers (not a Llama-family causal LM)" %
                                   type(model).__name__)
    return base


def _rotary(model):
    rot = getattr(_decoder(model), "rotary_emb", None)
    if rot is None:
        raise NotSupportedError("this transformers version keeps RoPE inside each attention layer; "
                                "shotdb.hf needs transformers >= 4.45 (model.model.rotary_emb)")
    return rot


def _device(model):
    return next(model.parameters()).device


def _dtype(model):
    return next(model.parameters()).dtype


def rotate_keys(model, k, positions):
    """Pre-RoPE keys ``k`` [kv_heads, T, head_dim] rotated at ``positions`` [T] with the model's
    own rotary embedding (its inv_freq, scaling and attention factor), as its attention does."""
    positions = torch.as_tensor(positions, dtype=torch.long, device=k.device)
    cos, sin = _rotary(model)(k, positions[None])
    cos, sin = cos[0].to(k.dtype), sin[0].to(k.dtype)  # [T, head_dim], shared by the heads
    half = k.shape[-1] // 2
    rotated_half = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return k * cos + rotated_half * sin


def _new_cache(layers):
    """A DynamicCache holding ``layers`` (per layer (K rotated, V), [kv_heads, T, head_dim])."""
    from transformers import DynamicCache
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k[None], v[None], i)
    return cache


class _Capture:
    """Forward hooks on every layer's k_proj / v_proj: their outputs are the pre-RoPE K and V."""

    def __init__(self, model):
        self.layers, self.kv_heads, self.head_dim = _shape(model)
        self.k = [None] * self.layers
        self.v = [None] * self.layers
        self.hooks = []
        for i, layer in enumerate(_decoder(model).layers):
            attn = layer.self_attn
            self.hooks.append(attn.k_proj.register_forward_hook(self._hook(self.k, i)))
            self.hooks.append(attn.v_proj.register_forward_hook(self._hook(self.v, i)))

    def _hook(self, into, i):
        def hook(_module, _inputs, out):
            # [1, T, kv_heads * head_dim] -> [kv_heads, T, head_dim]
            into[i] = out[0].reshape(out.shape[1], self.kv_heads, self.head_dim).transpose(0, 1)
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


# ---- the checkpoint's fingerprint and the block plan (the C++ runtime's own code) --------------

def _runtime():
    try:
        from . import _runtime as rt
    except ImportError as e:
        raise NotSupportedError(
            "shotdb.hf needs shotdb._runtime for the model fingerprint and the block plan; "
            "reinstall with pip install . -C cmake.define.SHOTDB_WITH_TORCH=ON, or pass "
            "fingerprint= (and groups=)") from e
    return rt


def model_path_of(model):
    """The local checkpoint directory ``model`` was loaded from, or None."""
    for path in (getattr(model, "name_or_path", None),
                 getattr(getattr(model, "config", None), "_name_or_path", None)):
        if path and os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
            return path
    return None


def model_fingerprint(model_path, kv_dtype="f32"):
    """The fingerprint ``shotdb build`` records for the checkpoint directory ``model_path``
    (config.json, *.safetensors and tokenizer.json) with K/V stored as ``kv_dtype``; see
    shotdb._runtime.model_fingerprint."""
    return _runtime().model_fingerprint(model_path, kv_dtype)


def _check_model_matches(model, fp, where):
    layers, kv_heads, head_dim = _shape(model)
    arch = fp["architecture"].split("@", 1)[0]
    got = (arch, fp["num_layers"], fp["kv_heads"], fp["head_dim"])
    want = (model.config.model_type, layers, kv_heads, head_dim)
    if got != want:
        raise InvalidArgumentError(
            "%s describes %s layers=%d kv_heads=%d head_dim=%d, but the model is %s layers=%d "
            "kv_heads=%d head_dim=%d" % ((where,) + got + want))


def _resolve_fingerprint(model, model_path, fingerprint, kv_dtype):
    if fingerprint is not None:
        fp = dict(fingerprint)
        missing = [k for k in _FINGERPRINT_KEYS if k not in fp]
        if missing:
            raise InvalidArgumentError("fingerprint lacks " + ", ".join(missing))
        if kv_dtype is not None and fp["dtype"] != kv_dtype:
            raise InvalidArgumentError("fingerprint dtype %s but kv_dtype %s" %
                                       (fp["dtype"], kv_dtype))
        _check_model_matches(model, fp, "fingerprint")
        return fp
    path = model_path or model_path_of(model)
    if path is None:
        raise InvalidArgumentError(
            "cannot tell which checkpoint the model was loaded from: pass model_path= (the "
            "directory with config.json, model.safetensors and tokenizer.json) or fingerprint=")
    fp = model_fingerprint(path, kv_dtype or _stored_name(_dtype(model)))
    _check_model_matches(model, fp, path)
    return fp


def _stored_name(dtype):
    for name, t in _TORCH_DTYPES.items():
        if t == dtype:
            return name
    raise NotSupportedError("no stored K/V type for torch dtype %s" % dtype)


# ---- tokens ---------------------------------------------------------------------------------------

def _encode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def _adds_bos(tokenizer):
    """Whether the tokenizer prepends its BOS by default (HF's notion)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _block_tokens(tokenizer, text, index, bos):
    ids = _encode(tokenizer, text)
    if index == 0 and bos is not None:
        ids = [bos] + ids
    if not ids:
        raise InvalidArgumentError("block %d has no tokens" % index)
    return ids


def _bos_for(tokenizer, fp):
    """BOS id to put first in block 0, or None: the C++ tokenizer's choice when the fingerprint
    came from the runtime, else the HF tokenizer's."""
    if "add_bos" in fp:
        return fp["bos_id"] if fp["add_bos"] else None
    return tokenizer.bos_token_id if _adds_bos(tokenizer) else None


# ---- the pool --------------------------------------------------------------------------------------

def context_blocks(index, window, sink_blocks):
    """The blocks block ``index`` attends to while it is encoded (engine/task.h ContextBlocks)."""
    first_recent = index - window if index > window else 0
    return [b for b in range(index) if b < sink_blocks or b >= first_recent]


def encoding_positions(scheme, context, block_offset):
    """(first position of each context block, of the block) while it is encoded
    (engine/task.h PositionsForEncoding); ``context`` is [(position_offset, tokens)]."""
    if scheme == "sequential":
        return [offset for offset, _ in context], block_offset
    starts, at = [], 0
    for _, tokens in context:
        starts.append(at)
        at += tokens
    return starts, at


def _plan(demos, demos_per_block, seed):
    return [[(int(i), t, l) for i, t, l in g]
            for g in _runtime().plan_blocks(demos, demos_per_block, seed)]


def _check_demos(demos):
    rows = []
    for n, d in enumerate(demos, 1):
        if isinstance(d, dict):
            d = (d.get("text"), d.get("label"))
        if not (isinstance(d, (tuple, list)) and len(d) == 2 and isinstance(d[0], str) and
                isinstance(d[1], str)):
            raise InvalidArgumentError("demonstration %d: expected a (text, label) pair of "
                                       "strings, got %r" % (n, d))
        rows.append((d[0], d[1]))
    return rows


def encode_pool(store, task, model, tokenizer, demos, *, labels=None, demos_per_block=None,
                window=None, sink_blocks=None, positions=None, kv_dtype=None, codec=None,
                prompt_template=None, separator=None, bm25=None, stopwords=None, seed=0,
                model_path=None, fingerprint=None, groups=None, progress=None):
    """Encodes ``demos`` ((text, label) pairs) into ``task`` of ``store`` as ``shotdb build`` does,
    with the HF ``model`` and ``tokenizer`` (the checkpoint's tokenizer.json).

    Creates the task if it does not exist (options default as in ``shotdb build``: 5
    demonstrations a block, window 2, 1 sink block, windowed positions, raw codec, the default
    template and separator, retriv BM25; labels: the sorted distinct labels of ``demos``; K/V
    stored in the model's dtype unless ``kv_dtype``), else checks that the model is the one the
    task was encoded with (FailedPreconditionError) and that explicit options agree
    (InvalidArgumentError). Demonstrations are grouped by the same seeded plan as
    ``shotdb build --seed`` (``groups`` overrides it: lists of (id, text, label)); those the task
    already holds are skipped, so re-running after an interruption continues it. Every row is
    checked before anything is written (a label not the task's, a block that could exceed the
    model's positions). Each block is one store transaction.

    ``model_path``: the checkpoint directory (default: where ``model`` was loaded from), for the
    fingerprint; or pass ``fingerprint`` (a dict as ``store.task(name)["model"]``).
    ``progress(blocks_done, blocks_total)`` is called after each block.
    Returns {"blocks": [appended block indexes], "tokens": tokens encoded, "skipped": rows
    already stored, "max_position": one past the largest RoPE position used}.
    """
    _config(model)
    rows = _check_demos(demos)
    try:
        existing = store.task(task)
    except KeyError:
        existing = None
    if existing is not None:
        if kv_dtype is not None and kv_dtype != existing["model"]["dtype"]:
            raise InvalidArgumentError("task '%s' exists with kv_dtype=%r, not %r" %
                                       (task, existing["model"]["dtype"], kv_dtype))
        kv_dtype = existing["model"]["dtype"]
    elif kv_dtype is not None and kv_dtype not in _TORCH_DTYPES:
        raise InvalidArgumentError("kv_dtype '%s': expected f32, f16, bf16 or f64" % kv_dtype)
    fp = _resolve_fingerprint(model, model_path, fingerprint, kv_dtype)
    options = dict(labels=labels, demos_per_block=demos_per_block, window=window,
                   sink_blocks=sink_blocks, positions=positions, codec=codec,
                   prompt_template=prompt_template, separator=separator, bm25=bm25)
    if existing is not None:
        ours = {k: fp[k] for k in _FINGERPRINT_KEYS}
        if ours != existing["model"]:
            raise FailedPreconditionError(
                "task '%s' was encoded with model %s, not %s" % (task, existing["model"], ours))
        for key, value in options.items():
            if value is not None and value != existing[key]:
                raise InvalidArgumentError("task '%s' exists with %s=%r, not %r" %
                                           (task, key, existing[key], value))
        if stopwords is not None and list(stopwords) != existing["stopwords"]:
            raise InvalidArgumentError("task '%s' exists with other stopwords" % task)
        info = existing
    else:
        info = dict(labels=sorted({label for _, label in rows}) if labels is None else list(labels),
                    demos_per_block=5 if demos_per_block is None else int(demos_per_block),
                    window=2 if window is None else int(window),
                    sink_blocks=1 if sink_blocks is None else int(sink_blocks),
                    positions=positions or "windowed", codec=codec or "raw",
                    prompt_template=("utterance: {text}\nintent: {label}"
                                     if prompt_template is None else prompt_template),
                    separator="\n==\n" if separator is None else separator,
                    bm25=bm25 or "retriv")
        if info["demos_per_block"] < 1 or info["sink_blocks"] < 1 or info["window"] < 0:
            raise InvalidArgumentError("demos_per_block and sink_blocks must be >= 1, window >= 0")
        if info["positions"] not in ("windowed", "sequential"):
            raise InvalidArgumentError("positions '%s': expected 'windowed' or 'sequential'" %
                                       info["positions"])
        if not info["labels"]:
            raise InvalidArgumentError("no labels: pass labels= or demonstrations")
    tmpl, sep = info["prompt_template"], info["separator"]

    # Every row before anything is written (PoolEncoder::AddDemonstrations' checks).
    label_set = set(info["labels"])
    lengths = []
    for n, (text, label) in enumerate(rows, 1):
        if label not in label_set:
            raise InvalidArgumentError("demonstration %d: label '%s' is not one of task '%s''s "
                                       "labels" % (n, label, task))
        # The separator and the demonstration as a block holds them (format_block checks the
        # template, InvalidArgumentError).
        lengths.append(len(_encode(tokenizer, _shotdb.format_block(tmpl, sep, [(text, label)],
                                                                   False))))
    limit = getattr(model.config, "max_position_embeddings", 0) or 0
    longest = sum(sorted(lengths, reverse=True)[:info["demos_per_block"]])
    if limit and longest > limit:
        raise InvalidArgumentError(
            "blocks of %d demonstrations can reach %d tokens, beyond the model's %d positions; "
            "use fewer demonstrations per block" % (info["demos_per_block"], longest, limit))

    if groups is None:
        planned = _plan(rows, info["demos_per_block"], seed)
    else:
        planned = [[(int(i), t, l) for i, t, l in g] for g in groups]
        for g in planned:
            for _, text, label in g:
                if label not in label_set:
                    raise InvalidArgumentError("label '%s' is not one of task '%s''s labels" %
                                               (label, task))
    skipped = 0
    todo = []
    for group in planned:
        fresh = []
        for demo in group:
            if existing is not None:
                try:
                    store.demonstration(task, demo[0])
                    skipped += 1
                    continue
                except KeyError:
                    pass
            fresh.append(demo)
        if fresh:
            todo.append(fresh)

    if existing is None:
        metadata = {"weights_digest": fp.get("weights_digest", fp["architecture"].split("@")[-1]),
                    "encoder": "shotdb.hf"}
        try:
            import transformers
            metadata["transformers"] = transformers.__version__
        except ImportError:
            pass
        store.create_task(task, architecture=fp["architecture"], dtype=fp["dtype"],
                          tokenizer_hash=fp["tokenizer_hash"], num_layers=fp["num_layers"],
                          kv_heads=fp["kv_heads"], head_dim=fp["head_dim"], labels=info["labels"],
                          demos_per_block=info["demos_per_block"], window=info["window"],
                          sink_blocks=info["sink_blocks"], positions=info["positions"],
                          codec=info["codec"], prompt_template=tmpl, separator=sep,
                          bm25=info["bm25"], stopwords=stopwords,
                          metadata_json=json.dumps(metadata, sort_keys=True))
    report = encode_blocks(store, task, model, tokenizer, todo, bos=_bos_for(tokenizer, fp),
                           progress=progress)
    report["skipped"] = skipped
    return report


def encode_blocks(store, task, model, tokenizer, groups, *, bos=None, progress=None):
    """Appends one block per group (a list of (id, text, label)) after the task's last block,
    each encoded with the block-sparse mask at the task's positions (PoolEncoder::EncodeBlocks).
    ``bos``: the token id block 0 starts with (None: none). The task must exist and its
    fingerprint must describe ``model`` (only the shape is checked here; encode_pool checks it
    all). Returns {"blocks", "tokens", "max_position"}."""
    info = store.task(task)
    fp = info["model"]
    _check_model_matches(model, fp, "task '%s'" % task)
    stored = _TORCH_DTYPES[fp["dtype"]]
    device, dtype = _device(model), _dtype(model)
    layers = fp["num_layers"]
    sinks, window = info["sink_blocks"], info["window"]
    blocks = [(b["position_offset"], b["tokens"]) for b in store.blocks(task)]
    cached = {}  # block -> per layer (K, V) as stored, in the model's dtype and device
    report = {"blocks": [], "tokens": 0, "max_position": 0}

    def context_kv(b):
        if b not in cached:
            kv = store.load_kv(task, [b])
            cached[b] = [(torch.from_dlpack(kv.key(l, 0)).to(device, dtype, copy=True),
                          torch.from_dlpack(kv.value(l, 0)).to(device, dtype, copy=True))
                         for l in range(layers)]
            del kv
        return cached[b]

    for n, group in enumerate(groups):
        index = len(blocks)
        text = _shotdb.format_block(info["prompt_template"], info["separator"],
                                    [(t, l) for _, t, l in group], index == 0)
        ids = _block_tokens(tokenizer, text, index, bos)
        offset = sum(t for _, t in blocks)
        ctx = context_blocks(index, window, sinks)
        starts, at = encoding_positions(info["positions"], [blocks[c] for c in ctx], offset)
        cache = None
        if ctx:
            per_layer = []
            for l in range(layers):
                ks, vs = [], []
                for c, start in zip(ctx, starts):
                    k, v = context_kv(c)[l]
                    pos = torch.arange(start, start + k.shape[1], device=device)
                    ks.append(rotate_keys(model, k, pos))
                    vs.append(v)
                per_layer.append((torch.cat(ks, 1), torch.cat(vs, 1)))
            cache = _new_cache(per_layer)
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        pos = torch.arange(at, at + len(ids), device=device)[None]
        with torch.no_grad(), _Capture(model) as cap:
            _decoder(model)(input_ids=tokens, position_ids=pos, past_key_values=cache,
                            use_cache=cache is not None)
        keys = [k.to("cpu", stored).contiguous() for k in cap.k]
        values = [v.to("cpu", stored).contiguous() for v in cap.v]
        got = store.append_block(task, keys, values, [(i, t, l) for i, t, l in group], text=text)
        assert got == index, (got, index)
        blocks.append((offset, len(ids)))
        cached[index] = [(k.to(device, dtype), v.to(device, dtype)) for k, v in zip(keys, values)]
        for b in list(cached):
            if not (b < sinks or b + window >= index + 1):
                del cached[b]
        report["blocks"].append(index)
        report["tokens"] += len(ids)
        report["max_position"] = max(report["max_position"], at + len(ids))
        if progress is not None:
            progress(n + 1, len(groups))
    return report


# ---- queries -----------------------------------------------------------------------------------------

def selection_size(num_blocks, ratio=0.3, count=0):
    """How many blocks a query may use before the budget (query/dbsa/dbsa.h SelectionSize)."""
    want = count if count > 0 else math.floor(ratio * num_blocks + 0.5)  # std::round
    return int(min(max(want, 1), max(num_blocks, 1)))


def select_blocks(store, task, query, *, ratio=0.3, count=0, order="encoding", budget=0,
                  info=None, block_tokens=None):
    """DBSA's blocks for ``query``: the sink blocks, then the best-scoring others (the store's
    BM25) while the selection size and ``budget`` tokens (0: none) allow, in encoding order (or
    ascending score). Returns (blocks, scores, context_tokens, budget_bound)."""
    if order not in ("encoding", "score"):
        raise InvalidArgumentError("order '%s': expected encoding or score" % order)
    info = info or store.task(task)
    if block_tokens is None:
        block_tokens = [b["tokens"] for b in store.blocks(task)]
    num_blocks = info["num_blocks"]
    sinks = min(info["sink_blocks"], num_blocks)
    m = max(selection_size(num_blocks, ratio, count), sinks)
    used = sum(block_tokens[:sinks])
    if budget > 0 and used > budget:
        raise InvalidArgumentError(
            "the context budget of %d tokens cannot hold the %d sink block(s) of task '%s' (%d "
            "tokens); raise max_context or use smaller blocks" % (budget, sinks, task, used))
    sink_scores = [0.0] * sinks
    chosen, bound = [], False
    for doc, score in store.search(task, query, k=m + sinks):
        if doc < sinks:
            sink_scores[doc] = score
            continue
        if len(chosen) + sinks >= m or bound:
            continue
        if budget > 0 and used + block_tokens[doc] > budget:
            bound = True
            continue
        chosen.append((doc, score))
        used += block_tokens[doc]
    if order == "score":
        chosen.sort(key=lambda h: h[1])  # stable: ties keep BM25's order
    else:
        chosen.sort(key=lambda h: h[0])
    blocks = list(range(sinks)) + [d for d, _ in chosen]
    scores = sink_scores + [s for _, s in chosen]
    return blocks, scores, used, bound


def load_context(store, task, blocks, model):
    """The blocks' stored K/V concatenated in order, K rotated at positions 0..L-1, in the model's
    dtype and device: per layer (K, V) [kv_heads, L, head_dim]."""
    info = store.task(task)
    device, dtype = _device(model), _dtype(model)
    kv = store.load_kv(task, list(blocks))
    out = []
    for l in range(info["model"]["num_layers"]):
        ks = [torch.from_dlpack(kv.key(l, i)).to(device, dtype, copy=True)
              for i in range(len(blocks))]
        vs = [torch.from_dlpack(kv.value(l, i)).to(device, dtype, copy=True)
              for i in range(len(blocks))]
        k, v = torch.cat(ks, 1), torch.cat(vs, 1)
        out.append((rotate_keys(model, k, torch.arange(k.shape[1], device=device)), v))
    del kv
    return out


def score_labels(model, context, context_tokens, prompt, labels):
    """Summed log-probability of each label (token id lists) right after ``prompt`` (token ids)
    over ``context`` (per layer (K rotated, V)), as the C++ DecodeLabel scores them."""
    device = _device(model)
    # Always a Cache object: given none, transformers 4.x returns the legacy tuple format.
    cache = _new_cache(context)
    p = len(prompt)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt], device=device),
                    position_ids=torch.arange(context_tokens, context_tokens + p,
                                              device=device)[None],
                    past_key_values=cache, use_cache=True)
        first = out.logits[0, -1].double().log_softmax(-1)
        sums = []
        for ids in labels:
            total = float(first[ids[0]])
            if len(ids) > 1:
                start = context_tokens + p
                o = model(input_ids=torch.tensor([ids[:-1]], device=device),
                          position_ids=torch.arange(start, start + len(ids) - 1,
                                                    device=device)[None],
                          past_key_values=cache, use_cache=True)
                logp = o.logits[0].double().log_softmax(-1)
                total += float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1)))
                cache.crop(context_tokens + p)  # drop this label's tokens again
            sums.append(total)
    return sums


def answer(store, task, model, tokenizer, query, *, ratio=0.3, count=0, order="encoding",
           max_context=0, model_path=None, check_fingerprint=True):
    """Answers ``query`` from ``task`` with DBSA and the HF ``model``: the same selection, context
    budget and constrained label scoring as ``shotdb query --method dbsa`` (and
    ``shotdb.Session.ask``). ``max_context``: the query's sequence limit (0: the model's
    max_position_embeddings). The model must be the task's: its shape always, and with
    ``check_fingerprint`` its full fingerprint where its checkpoint directory is known
    (``model_path`` or where it was loaded from) and shotdb._runtime is built
    (FailedPreconditionError otherwise).

    Returns {"label", "score" (summed log-probability), "label_scores" (task order), "blocks",
    "block_scores", "context_tokens", "prompt_tokens", "budget", "budget_bound"}.
    """
    if not isinstance(query, str):
        raise InvalidArgumentError("query must be a string")
    if max_context < 0:
        raise InvalidArgumentError("max_context must be >= 0 (0: the model's), got %d" %
                                   max_context)
    info = store.task(task)
    fp = info["model"]
    _check_model_matches(model, fp, "task '%s'" % task)
    path = model_path or model_path_of(model)
    if check_fingerprint and path is not None:
        try:
            rt = _runtime()
        except NotSupportedError:
            rt = None
        if rt is not None:
            ours = rt.model_fingerprint(path, fp["dtype"])
            ours = {k: ours[k] for k in _FINGERPRINT_KEYS}
            if ours != fp:
                raise FailedPreconditionError("task '%s' was encoded with model %s, not %s (%s)" %
                                              (task, fp, ours, path))
    if info["num_blocks"] == 0:
        raise FailedPreconditionError("task '%s' has no blocks yet" % task)
    if not info["labels"]:
        raise FailedPreconditionError("task '%s' has no labels" % task)
    tmpl, sep = info["prompt_template"], info["separator"]
    prompt = _encode(tokenizer, _shotdb.format_query(tmpl, sep, query))
    if not prompt:
        raise InvalidArgumentError("the query prompt has no tokens")
    labels = [_encode(tokenizer, _shotdb.label_continuation(tmpl, sep, l)) for l in info["labels"]]
    for label, ids in zip(info["labels"], labels):
        if not ids:
            raise InvalidArgumentError("label '%s' has no tokens" % label)
    longest = max(len(ids) for ids in labels)
    limit = max_context or getattr(model.config, "max_position_embeddings", 0) or 0
    budget = 0
    if limit:
        if len(prompt) + longest >= limit:
            raise InvalidArgumentError(
                "the query prompt (%d tokens) and the longest label (%d) leave no room for a "
                "context within the limit of %d tokens (max_context)" % (len(prompt), longest,
                                                                         limit))
        budget = limit - len(prompt) - longest
    blocks, scores, _, bound = select_blocks(store, task, query, ratio=ratio, count=count,
                                             order=order, budget=budget, info=info)
    context = load_context(store, task, blocks, model)
    context_tokens = context[0][0].shape[1]
    sums = score_labels(model, context, context_tokens, prompt, labels)
    best = 0
    for i in range(1, len(sums)):
        if sums[i] > sums[best]:
            best = i
    return {"label": info["labels"][best], "score": sums[best], "label_scores": sums,
            "blocks": blocks, "block_scores": scores, "context_tokens": context_tokens,
            "prompt_tokens": len(prompt), "budget": budget, "budget_bound": bound}
