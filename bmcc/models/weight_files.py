"""Reading pretrained tensors from files as numpy arrays, without torch.

Two on-disk formats are read directly:

- safetensors (`.safetensors`): an 8-byte little-endian header length, a JSON header naming each
  tensor's dtype, shape and byte range, then the raw bytes. Read through a memory map, so only the
  tensors used are paged in. (Not `safetensors.numpy`: its released loaders have no bfloat16,
  which numpy lacks, and copy every tensor; here `ml_dtypes.bfloat16` and a memory map.)
- PyTorch's zip serialisation (`torch.save` since torch 1.6: `.pth`, `.pt`, `.bin`): a zip holding
  `data.pkl` and one file per storage. The pickle is read with a restricted unpickler that only
  rebuilds tensors, parameters and plain containers, like `torch.load(weights_only=True)`, and
  refuses any other object, so loading a file never runs code from it.

Formats are told apart by structure, not by file name: a file is safetensors when its first
8 bytes give a header length that fits the file, byte 8 is `{` and the header parses as a JSON
object (checked before anything else: the length's first byte is 0x80, the pickle protocol byte,
in 1 file of 256); else a zip is PyTorch's, and a file starting with 0x80 a legacy pickle.

The legacy (pre-1.6, non-zip) PyTorch format needs torch itself and is read with
`torch.load(weights_only=True)` only if torch is installed. `resolve` turns a source into a local
path: a file, or `hf-hub:<owner>/<repo>[/<file>]`, fetched with `huggingface_hub` (the only place
that touches the network, and only when a hub id is named).
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

HUB_PREFIX = "hf-hub:"
# Files tried, in order, when a hub id names no file.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_MAX_HEADER = 100 * 2**20

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_TORCH_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class WeightFileError(ValueError):
  """A weight file that cannot be read: unknown format, corrupt or truncated."""


def resolve(source: str | os.PathLike) -> str:
  """The local path of `source`: an existing file, or a file fetched from a `hf-hub:` id.

  `hf-hub:owner/repo` fetches `model.safetensors` (else `pytorch_model.bin`);
  `hf-hub:owner/repo/path/in/repo.pth` fetches that file. Downloads go to the Hugging Face cache
  (offline use: `HF_HUB_OFFLINE=1` with a filled cache).
  """
  source = os.fspath(source)
  if not source.startswith(HUB_PREFIX):
    if not os.path.isfile(source):
      raise FileNotFoundError(
          f"No weight file at {source!r} (a hub id must be written {HUB_PREFIX}owner/repo).")
    return source
  parts = source[len(HUB_PREFIX):].split("/")
  if len(parts) < 2 or not all(parts):
    raise ValueError(f"Hub id {source!r} is not of the form {HUB_PREFIX}owner/repo[/file].")
  try:
    import huggingface_hub
  except ImportError as error:
    raise ImportError(
        f"Fetching {source!r} needs huggingface_hub: pip install 'bmcc[hub]' (or pass a local "
        "file).") from error
  repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
  errors = []
  for name in [filename] if filename else HUB_FILES:
    try:
      return huggingface_hub.hf_hub_download(repo_id, name)
    except Exception as error:  # offline, missing file, auth: all reported below
      errors.append(f"{name}: {type(error).__name__}: {error}")
  raise OSError(f"Could not fetch weights from {source!r} (offline, or no such repo/file?):\n  "
                + "\n  ".join(errors))


def read(path: str | os.PathLike) -> Any:
  """The object stored in a weight file, tensors as numpy arrays.

  A safetensors file gives a flat dict name -> array; a PyTorch file gives whatever was saved
  (usually a state dict, maybe nested such as DINOv2's {"teacher": {...}}).
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    head = f.read(9)
  # Structure first: a safetensors header length is arbitrary bytes, so its first byte may be
  # 0x80 (the pickle protocol byte) or anything else; only a valid header decides.
  if _is_safetensors(path):
    return _read_safetensors(path)
  if head.startswith(b"PK\x03\x04"):
    return _read_torch_zip(path)
  if head[:1] == b"\x80":
    return _read_torch_legacy(path)
  if (len(head) == 9 and head[8:9] == b"{") or path.endswith(".safetensors"):
    return _read_safetensors(path)  # a damaged safetensors file: say what is wrong with it
  raise WeightFileError(
      f"{path}: not a recognised weight file (expected safetensors or a PyTorch .pth/.bin zip; "
      f"it starts with {head!r}).")


def _is_safetensors(path: str) -> bool:
  """Whether `path` has a safetensors structure: an 8-byte little-endian header length that fits
  the file, `{` at byte 8, and a header that parses as a JSON object."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(9)
    if len(prefix) < 9 or prefix[8:9] != b"{":
      return False
    header_len = int.from_bytes(prefix[:8], "little")
    if not 2 <= header_len <= min(_MAX_HEADER, size - 8):
      return False
    f.seek(8)
    try:
      return isinstance(json.loads(f.read(header_len)), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
      return False


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of a safetensors file, memory-mapped; validates the header against the file size."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise WeightFileError(f"{path}: {size} bytes, too short for a safetensors file.")
    header_len = int.from_bytes(prefix, "little")
    if header_len > _MAX_HEADER:
      raise WeightFileError(f"{path}: not a safetensors file (header length {header_len}).")
    if 8 + header_len > size:
      raise WeightFileError(
          f"{path}: truncated safetensors file: the header needs {8 + header_len} bytes, the "
          f"file has {size}.")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
      raise WeightFileError(f"{path}: corrupt safetensors header ({error}).") from error
  if not isinstance(header, dict):
    raise WeightFileError(f"{path}: corrupt safetensors header (not a JSON object).")
  start = 8 + header_len
  data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
      shape = tuple(int(n) for n in info["shape"])
      begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as error:
      raise WeightFileError(f"{path}: corrupt safetensors entry {name!r}: {info!r}.") from error
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
      raise WeightFileError(f"{path}: corrupt safetensors entry {name!r}: byte range "
                            f"[{begin}, {end}) does not hold {info['dtype']} {list(shape)}.")
    if start + end > size:
      raise WeightFileError(
          f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to {start + end}, "
          f"the file has {size} (incomplete download?).")
    tensors[name] = data[start + begin:start + end].view(dtype).reshape(shape)
  return tensors


class _Storage:
  """A torch storage class named in the pickle (e.g. torch.FloatStorage): carries the dtype."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_TORCH_STORAGES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any
                    ) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 on a numpy storage: a strided view."""
  size, stride = tuple(size), tuple(stride)
  if math.prod(size) == 0:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if offset < 0 or last >= storage.size or min(stride, default=0) < 0:
    raise WeightFileError(f"Tensor of shape {list(size)} at offset {offset} does not fit its "
                          f"storage of {storage.size} elements (corrupt file).")
  # A read-only view of the storage (no copy: a ViT-G checkpoint is 4.5 GB).
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride),
      writeable=False)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
  """torch._utils._rebuild_parameter(_with_state): the parameter's data."""
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch zip archive's data.pkl, allowing only tensors and containers."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[module, name]
    if module == "torch" and name in _TORCH_STORAGES:
      return _Storage(name)
    raise WeightFileError(
        f"{self._path}: holds a {module}.{name} object; only tensors and dicts/lists of tensors "
        "are read (save a state dict, or convert the file to safetensors).")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
            and isinstance(pid[1], _Storage)):
      raise WeightFileError(f"{self._path}: unsupported storage reference {pid!r}.")
    storage_type, key = pid[1], str(pid[2])
    if key not in self._storages:
      try:
        raw = self._archive.read(f"{self._prefix}data/{key}")
      except KeyError as error:
        raise WeightFileError(f"{self._path}: storage {key} is missing (corrupt file).") from error
      if len(raw) % storage_type.dtype.itemsize:
        raise WeightFileError(f"{self._path}: storage {key} has a partial element (corrupt file).")
      self._storages[key] = np.frombuffer(raw, storage_type.dtype)
    return self._storages[key]


def _read_torch_zip(path: str) -> Any:
  """The object of a torch.save zip archive, tensors as numpy arrays."""
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise WeightFileError(f"{path}: a zip file but not a PyTorch checkpoint (no data.pkl).")
      prefix = pickles[0][:-len("data.pkl")]
      if prefix + "byteorder" in archive.namelist():
        if archive.read(prefix + "byteorder").decode().strip() != "little":
          raise WeightFileError(f"{path}: big-endian PyTorch file; not supported.")
      with archive.open(pickles[0]) as f:
        return _TorchUnpickler(f, archive, prefix, path).load()
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, zipfile.LargeZipFile) as error:
    raise WeightFileError(f"{path}: corrupt or truncated PyTorch file ({error}).") from error


def _read_torch_legacy(path: str) -> Any:
  """A pre-1.6 (non-zip) torch.save file, through torch.load(weights_only=True) if available."""
  try:
    import torch
  except ImportError as error:
    raise WeightFileError(
        f"{path}: a legacy (pre-1.6) PyTorch file, which needs torch to read: pip install torch, "
        "or re-save it with a recent torch or as safetensors.") from error
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises many types for bad files
    raise WeightFileError(f"{path}: torch.load failed: {error}") from error

  def to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
      return value.detach().float().numpy() if value.is_floating_point() else value.numpy()
    if isinstance(value, dict):
      return type(value)((k, to_numpy(v)) for k, v in value.items())
    return value

  return to_numpy(obj)
