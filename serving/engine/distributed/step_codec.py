"""The step message rank 0 sends its other ranks (the forward's kwargs without KV caches), pickled fast:
small tensors go as raw bytes, not through torch's storage pickler.

A step message (the model's kwargs and the attention metadata dataclasses) holds a dozen small index
tensors. Pickling tensors directly costs ~1 ms each way on this machine; here tensors are swapped for
references while the structure is pickled, and their bytes travel alongside (~0.1 ms). Other objects
pickle as usual, so a new metadata field of any type still works, only more slowly.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import Any, NamedTuple

import torch

from serving.engine.attention import METADATA_KWARG

_MARK = "serving-step-codec"


class _Ref(NamedTuple):
    slot: int


def encode(message: Any) -> bytes:
    tensors: list[torch.Tensor] = []
    skeleton = _strip(message, tensors)
    blobs = [(t.dtype, tuple(t.shape), t.detach().cpu().contiguous().numpy().tobytes()) for t in tensors]
    return pickle.dumps((_MARK, skeleton, blobs), protocol=pickle.HIGHEST_PROTOCOL)


def strip_caches(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward's kwargs without the KV-cache tensors (each rank has its own), ready to encode."""
    meta = kwargs.get(METADATA_KWARG)
    if meta is None:
        return kwargs
    light = copy.copy(meta)
    light.kv_caches = []
    return {**kwargs, METADATA_KWARG: light}


def attach_caches(kwargs: dict[str, Any], kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give a decoded step this rank's own KV caches (the inverse of strip_caches)."""
    meta = kwargs.get(METADATA_KWARG)
    if meta is not None:
        meta.kv_caches = kv_caches


def decode(data: bytes, device: torch.device) -> Any:
    """The message encode() packed, with tensors on `device`; any other pickle is returned as loaded
    (so plain Connection.send messages such as ("stop",) share the pipe)."""
    loaded = pickle.loads(data)
    if not (isinstance(loaded, tuple) and len(loaded) == 3 and loaded[0] == _MARK):
        return loaded
    _, skeleton, blobs = loaded
    tensors = [_tensor(dtype, shape, raw, device) for dtype, shape, raw in blobs]
    return _fill(skeleton, tensors)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], raw: bytes, device: torch.device) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=dtype, device=device)
    t = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    return t if device.type == "cpu" else t.to(device)


def _strip(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Ref(len(tensors) - 1)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        clone = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(clone, f.name, _strip(getattr(obj, f.name), tensors))
        return clone
    if isinstance(obj, list):
        return [_strip(x, tensors) for x in obj]
    if isinstance(obj, tuple) and not isinstance(obj, _Ref):
        return tuple(_strip(x, tensors) for x in obj)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    return obj


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Ref):
        return tensors[obj.slot]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            object.__setattr__(obj, f.name, _fill(getattr(obj, f.name), tensors))
        return obj
    if isinstance(obj, list):
        return [_fill(x, tensors) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_fill(x, tensors) for x in obj)
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    return obj
