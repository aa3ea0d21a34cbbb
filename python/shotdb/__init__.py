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

__all__ = [
    "Store", "KvHandle", "errors", "ShotdbError", "NotFoundError", "CorruptionError",
    "InvalidArgumentError", "StoreIOError", "AlreadyExistsError", "NotSupportedError",
    "FailedPreconditionError",
]
