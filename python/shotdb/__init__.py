"""shotdb: a persistent store for the KV cache of many-shot in-context learning (DBSA).

This package is a thin layer over the C++ engine (engine/store.h): tasks, blocks, demonstrations
and their per-layer pre-RoPE K/V in an LMDB store, with BM25 over blocks and single
demonstrations. It needs no array framework and no model runtime; K/V come back as DLPack-capable
arrays::

    import shotdb, torch
    with shotdb.Store("st", readonly=True) as store:
        hits = store.search("nlu", "wake me up at seven", k=4)
        kv = store.load_kv("nlu", [b for b, _ in hits])
        k0 = torch.from_dlpack(kv.key(0, 0))   # layer 0, first block: [kv_heads, tokens, head_dim]
        del k0, kv                              # arrays keep the handle (and the store) alive

docs/python.md is the guide.
"""
from . import errors
from ._shotdb import KvHandle, Store
from .errors import (AlreadyExistsError, CorruptionError, FailedPreconditionError,
                     InvalidArgumentError, NotFoundError, NotSupportedError, ShotdbError,
                     StoreIOError)



def Session(store, task, model, **options):
    """Answers queries from `task` of `store` through the C++ model runtime, exactly as
    `shotdb query` does: ``Session(store, "nlu", "model.gguf").ask("wake me up")`` returns a dict
    with the label, its log-probability, the selected blocks, the budget and the timing. Options:
    device, dtype, threads, cache_gb, max_context. Needs the package built with libtorch
    (``pip install . -C cmake.define.SHOTDB_WITH_TORCH=ON``); importing shotdb never loads it."""
    # libgomp reads its wait policy once, when libtorch loads it: passive waiting keeps its
    # threads from spinning against OpenBLAS's (util/openmp_env.h; no effect if torch is loaded).
    import os
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from ._runtime import Session as _Session
    except ImportError as e:
        raise NotSupportedError(
            "this shotdb package was built without the model runtime (libtorch); reinstall with "
            "pip install . -C cmake.define.SHOTDB_WITH_TORCH=ON") from e
    return _Session(store, task, model, **options)


__all__ = ["Session", 
    "Store", "KvHandle", "errors", "ShotdbError", "NotFoundError", "CorruptionError",
    "InvalidArgumentError", "StoreIOError", "AlreadyExistsError", "NotSupportedError",
    "FailedPreconditionError",
]
