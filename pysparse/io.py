"""Saving and loading models with sparse layers: one safetensors file (no pickle), whose size grows with the
stored weights, not with the dense size.

The file holds the model's state dict and, in its metadata, which layers are sparse (and their configuration)
and a SHA-256 of every tensor; ``load`` rebuilds those sparse layers into a model of the same architecture and
refuses a file that is not a pysparse file, was changed (tensors or metadata), or does not fit the model. The
state dict's own metadata (each module's ``_version``, which some modules' loading reads, e.g. torchvision's
MNASNet) is kept too, as ``torch.save`` of a state dict keeps it. Tied
weights (one tensor under two names) are stored once. Other weights with many
zeros (the masked layers that ``sparsify`` left dense below the speed crossover, a pruned model never
sparsified) are stored packed, as their non-zero values and CSR indices, and unpacked on load (zeros come back
as +0.0, the non-zero values bit for bit).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from . import csr
from .convert import decline_nested_tensors, module_places, replace_module
from .nn import SparseConv2d, SparseLinear, SparseMultiheadAttention
from .nn.attention import projection_weights
from .nn._sparse_weight import SparseWeight

FORMAT = "pysparse"
VERSION = 3  # 2: weights with many zeros packed, tied weights stored once, the metadata in the checksum;
#             3: the state dict's metadata (modules' versions)
_READS = ("1", "2", "3")
_PACKED = ("::values", "::rowptr", "::col")
_TYPES = {"SparseLinear": SparseLinear, "SparseConv2d": SparseConv2d}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _digest(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """SHA-256 of the tensors (names, dtypes, shapes, bytes) and of ``extra`` (format 2: the metadata that
    describes them, so that editing it is caught too)."""
    h = hashlib.sha256(extra.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _pack(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Replace, in place, every float tensor of 2+ dims that packs to under 3/4 of its size by its non-zero
    values and CSR indices over its [shape[0], -1] view; returns {key: shape} of the packed ones."""
    packed = {}
    for key, t in list(tensors.items()):
        if not t.is_floating_point() or t.dim() < 2 or t.numel() < 256 or \
                any(key + suffix in tensors for suffix in _PACKED):
            continue
        matrix = t.reshape(t.shape[0], -1)
        keep = matrix != 0  # (-0.0 too: masking by multiplication leaves half the zeros so)
        index_bytes = csr.index_dtype(matrix.shape[1]).itemsize  # the width compress_rows will give
        if int(keep.sum()) * (t.element_size() + index_bytes) + 4 * (t.shape[0] + 1) >= 0.75 * t.numel() * \
                t.element_size():
            continue
        rowptr, col = csr.compress_rows(keep)
        del tensors[key]
        tensors.update({key + "::values": matrix[keep], key + "::rowptr": rowptr, key + "::col": col})
        packed[key] = list(t.shape)
    return packed


def _unpack(tensors: dict[str, torch.Tensor], packed: dict, path: Path) -> None:
    """Inverse of _pack, in place; ValueError for anything that does not describe a tensor of its shape."""
    for key, shape in packed.items():
        try:
            values, rowptr, col = (tensors.pop(key + suffix) for suffix in _PACKED)
        except KeyError:
            raise ValueError(f"{path}: the packed tensor {key!r} is incomplete") from None
        if not (isinstance(shape, list) and len(shape) >= 2 and all(isinstance(n, int) and n > 0 for n in shape)):
            raise ValueError(f"{path}: the packed tensor {key!r} has a bad shape {shape!r}")
        rows, cols = shape[0], math.prod(shape[1:])
        try:
            s = csr.from_compressed(rowptr, col, (rows, cols))  # canonical and in range, or ValueError
        except ValueError as exc:
            raise ValueError(f"{path}: the packed tensor {key!r} has a bad structure: {exc}") from None
        if not values.is_floating_point() or values.shape != (s.nnz,):
            raise ValueError(f"{path}: the packed tensor {key!r} has {tuple(values.shape)} values for {s.nnz} "
                             f"stored positions")
        dense = values.new_zeros(rows * cols)
        dense[csr.row_indices(s.rowptr, s.nnz) * cols + s.col.long()] = values
        tensors[key] = dense.view(shape)


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tensor stored once: a key whose tensor is another key's (tied weights, which
    safetensors refuses to write twice) becomes an alias {key: the key stored}; another view of a stored
    tensor's memory is copied."""
    out, aliases, views, storages = {}, {}, {}, set()
    for key, t in tensors.items():
        if t.numel():
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in views:
                aliases[key] = views[view]
                continue
            views[view] = key
            if view[0] in storages:
                t = t.clone()
            storages.add(view[0])
        out[key] = t
    return out, aliases


def _extra(metadata: dict) -> str:
    """The metadata the checksum covers (format 2: the layers, packed tensors and aliases; 3: also the state
    dict's metadata)."""
    keys = ("sparse_layers", "packed", "aliases") + (("state_metadata",) if metadata.get("version") != "2" else ())
    return json.dumps([metadata.get(k, "") for k in keys])


def _state_metadata(state: dict) -> dict:
    """A state dict's ``_metadata`` ({module prefix: {"version": n, ...}}) as JSON-able data."""
    plain = (bool, int, float, str, type(None))
    return {prefix: {k: v for k, v in entry.items() if isinstance(v, plain)}
            for prefix, entry in getattr(state, "_metadata", {}).items()}


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model``'s weights (sparse layers as values + indices, other weights with many zeros packed the
    same way) to ``path``, atomically."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    as_path(path)  # before any work
    # ties found where the tensors live (a copy to the CPU would part them), then one CPU copy of each
    state = model.state_dict()
    tensors, aliases = _dedupe({k: v.detach() for k, v in state.items()})
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    layers = {name: {"type": type(m).__name__, "weight_shape": list(m.weight_shape)}
              for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, SparseWeight)}
    packed = _pack(tensors)
    metadata = {"format": FORMAT, "version": str(VERSION), "sparse_layers": json.dumps(layers),
                "packed": json.dumps(packed), "aliases": json.dumps(aliases),
                "state_metadata": json.dumps(_state_metadata(state), separators=(",", ":"))}
    metadata["sha256"] = _digest(tensors, _extra(metadata))
    write_safetensors(tensors, path, metadata)


def as_path(path, name: str = "path") -> Path:
    """``path`` as a Path; TypeError naming ``name`` unless it is a str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def readable_file(path, name: str = "path") -> Path:
    """``path`` as a Path to an existing regular file: FileNotFoundError (or IsADirectoryError) otherwise."""
    path = as_path(path, name)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, then fsync, ordinary permissions and rename: readers see
    the old file or the whole new one, and nothing is left behind if anything fails (Ctrl-C included). Missing
    parent folders are made; a ``path`` that is a folder is refused before anything is written."""
    path = as_path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it private; a saved file has ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(tensors: dict[str, torch.Tensor], path: Union[str, os.PathLike], metadata: dict) -> None:
    """Write a safetensors file atomically (see :func:`atomic_write`)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ValueError naming ``what`` was expected if it is unreadable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not {what}: {exc}") from None


def load(path: Union[str, os.PathLike], model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save` into ``model`` (same architecture, dense or sparse): the layers that
    were sparse are rebuilt as sparse layers, then every weight is loaded. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = readable_file(path)
    tensors, metadata = read_safetensors(path, "a safetensors file written by pysparse.save")
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pysparse file (metadata format {metadata.get('format')!r})")
    if metadata.get("version") not in _READS:
        raise ValueError(f"{path} has pysparse format version {metadata.get('version')}, this pysparse reads "
                         f"{' and '.join(_READS)}")
    if metadata.get("sha256") != _digest(tensors, _extra(metadata) if metadata["version"] != "1" else ""):
        raise ValueError(f"{path} was modified or corrupted after it was written (checksum mismatch)")
    try:
        layers = json.loads(metadata["sparse_layers"])
        packed = json.loads(metadata.get("packed", "{}"))
        aliases = json.loads(metadata.get("aliases", "{}"))
        versions = json.loads(metadata["state_metadata"]) if "state_metadata" in metadata else None
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has unreadable layer metadata: {exc}") from exc
    if not all(isinstance(m, dict) for m in (layers, packed, aliases)) or not (
            versions is None or isinstance(versions, dict) and all(isinstance(v, dict) for v in versions.values())):
        raise ValueError(f"{path} has unreadable layer metadata")
    _unpack(tensors, packed, path)
    for key, stored in aliases.items():  # tied weights: stored once
        if key in tensors or stored not in tensors:
            raise ValueError(f"{path}: {key!r} is an alias of {stored!r}, which the file does not hold")
        tensors[key] = tensors[stored]
    places = module_places(model)
    for name in layers:  # a sparse attention's projections: rebuild the attention first (its layers, then, are)
        parent, _, leaf = name.rpartition(".")
        try:
            attention = model.get_submodule(parent)
        except AttributeError:
            continue  # (reported below)
        if type(attention) is nn.MultiheadAttention and leaf in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sparse = SparseMultiheadAttention.from_dense(attention, {n: torch.ones_like(w, dtype=torch.bool) for n, w
                                                                     in projection_weights(attention).items()})
            replace_module(places, attention, sparse)  # (the other attentions' places stay as they were)
    decline_nested_tensors(model)
    for name, info in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} has a sparse layer {name!r} that the model does not have") from None
        cls = _TYPES.get(info.get("type"))
        if cls is None:
            raise ValueError(f"{path}: layer {name!r} has unknown type {info.get('type')!r}")
        if isinstance(module, cls):
            continue
        dense_type = nn.Linear if cls is SparseLinear else nn.Conv2d
        if type(module) is not dense_type or list(module.weight.shape) != info.get("weight_shape"):
            raise ValueError(f"{path}: layer {name!r} is a {cls.__name__} of weight shape {info.get('weight_shape')}, "
                             f"but the model has {type(module).__name__} there")
        sparse = cls.from_dense(module, torch.ones_like(module.weight, dtype=torch.bool))
        replace_module(places, module, sparse)  # (at each name of a shared layer)
    state = OrderedDict(tensors)
    # the modules' versions as saved (files before format 3: the model's own, as if saved by this code)
    state._metadata = OrderedDict(versions.items()) if versions is not None else model.state_dict()._metadata
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # the keys, shapes or sparse structures load_state_dict refused, all of them listed
        if not str(exc).startswith("Error(s) in loading state_dict"):
            raise
        raise ValueError(f"{path} does not fit the model: {exc}") from None
    return model
