"""Checkpoints as safetensors files: writing, validating and streaming them slice by slice.

Security: a checkpoint is only ever parsed as safetensors (a JSON header plus raw bytes).
Pickle and ``torch.save`` archives are recognised by their magic bytes and refused, never loaded.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_output
from ..errors import InputError

CHECKPOINT_SUFFIX = ".safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1,
}
_CAN_ADVISE = hasattr(os, "posix_fadvise")
_FINGERPRINT_SAMPLES = 16  # data blocks hashed into a checkpoint's fingerprint, spread evenly over the file
_FINGERPRINT_BLOCK = 4096
_READ_AHEAD_SLICES = 16  # slices the kernel is asked to fetch ahead of the reader (page cache, not RSS)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offset: int  # byte offset of the tensor's data from the start of the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """A validated safetensors checkpoint: where it is, when in training it was taken, what it holds."""

    path: Path
    step: int
    epoch: float | None
    learning_rate: float | None
    tensors: Mapping[str, TensorInfo] = field(repr=False)

    @property
    def parameter_names(self) -> list[str]:
        """Floating-point tensors: integer buffers (counters, masks) are not parameters."""
        return [n for n, info in self.tensors.items() if info.dtype in _FLOAT_DTYPES]


def save_checkpoint(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    *,
    step: int,
    epoch: float | None = None,
    learning_rate: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state`` as safetensors, atomically, with step / epoch / learning rate in the metadata."""
    meta = {"step": str(int(step))}
    if epoch is not None:
        meta["epoch"] = repr(float(epoch))
    if learning_rate is not None:
        meta["learning_rate"] = repr(float(learning_rate))
    meta.update(metadata or {})
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Parse and validate a checkpoint's header without reading its tensors.

    Rejects, naming the file: pickle / ``torch.save`` files, files that are not safetensors,
    truncated files, and files without a ``step`` in their metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(9)
        header_len = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else -1
        looks_like_safetensors = 0 <= header_len <= min(_MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{"
        if not looks_like_safetensors and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
            raise InputError(
                f"checkpoint {path}: this is a pickle / torch.save file, not safetensors; it was not "
                "loaded, because unpickling a file can run arbitrary code. Save checkpoints with "
                "safetensors (z0inf_pipeline.influence.save_checkpoint)."
            )
        if len(head) < 9:
            raise InputError(f"checkpoint {path}: not a safetensors file ({size} bytes, no header)")
        if not looks_like_safetensors:
            raise InputError(
                f"checkpoint {path}: not a safetensors file, or truncated (header of {header_len} bytes "
                f"announced in a file of {size} bytes)"
            )
        fh.seek(8)
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"checkpoint {path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise InputError(f"checkpoint {path}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"checkpoint {path}: malformed header entry for tensor {name!r}") from None
        if not all(_is_int(v) for v in (begin, end)):  # 1.5 or True would be misread as a position
            raise InputError(
                f"checkpoint {path}: tensor {name!r} has non-integer data offsets [{begin!r}, {end!r}]"
            )
        if not all(_is_int(v) and v >= 0 for v in shape):
            raise InputError(f"checkpoint {path}: tensor {name!r} has a malformed shape {list(shape)!r}")
        if dtype not in _DTYPE_BYTES:
            raise InputError(f"checkpoint {path}: tensor {name!r} has unsupported dtype {dtype}")
        if not 0 <= begin <= end:
            raise InputError(f"checkpoint {path}: tensor {name!r} has invalid data offsets [{begin}, {end}]")
        if end > data_bytes:
            raise InputError(
                f"checkpoint {path}: truncated (tensor {name!r} ends at byte {end} of the data section, "
                f"which holds only {data_bytes} bytes)"
            )
        if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise InputError(f"checkpoint {path}: tensor {name!r} has a size that does not match its shape")
        tensors[name] = TensorInfo(dtype, shape, 8 + header_len + begin)
        spans.append((begin, end, name))
    _check_layout(path, spans)
    if "step" not in meta:
        raise InputError(f"checkpoint {path}: metadata has no 'step' (checkpoints must record their step)")
    try:
        step = int(meta["step"])
        epoch = float(meta["epoch"]) if "epoch" in meta else None
        learning_rate = float(meta["learning_rate"]) if "learning_rate" in meta else None
    except ValueError as exc:
        raise InputError(f"checkpoint {path}: malformed metadata ({exc})") from None
    return Checkpoint(path, step, epoch, learning_rate, tensors)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layout(path: Path, spans: list[tuple[int, int, str]]) -> None:
    """Tensors must tile the data section back to back, as safetensors writes them: two tensors
    sharing bytes would silently alias, and a gap means the header does not describe the file."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise InputError(
                f"checkpoint {path}: tensor {name!r} (bytes [{begin}, {end}]) overlaps tensor {previous!r} "
                f"(which ends at byte {position})"
            )
        if begin > position:
            raise InputError(
                f"checkpoint {path}: tensor {name!r} starts at byte {begin}, but the data before it ends at "
                f"byte {position} (a gap the header does not describe)"
            )
        position, previous = end, name


def checkpoint_fingerprint(checkpoint: Checkpoint) -> str:
    """A cheap identity for a checkpoint file: SHA-256 of its header, its size and 16 blocks of 4 KiB
    spread evenly over its data (constant cost, whatever the model size).

    It tells another checkpoint (other run, other step, retrained weights) from this one, which is what
    a derived file's provenance needs; it is not a defence against a deliberate edit of unsampled bytes
    (a run's manifest holds full SHA-256 hashes for that)."""
    path = checkpoint.path
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb", buffering=0) as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        digest.update(fh.read(header_len))
        start = 8 + header_len
        data = size - start
        for i in range(_FINGERPRINT_SAMPLES):
            digest.update(os.pread(fh.fileno(), _FINGERPRINT_BLOCK, start + data * i // _FINGERPRINT_SAMPLES))
    return digest.hexdigest()


def open_checkpoints(source: str | os.PathLike | Sequence[str | os.PathLike | Checkpoint]) -> list[Checkpoint]:
    """Validate checkpoints (a folder of ``*.safetensors`` or a list of paths) and sort them by step."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(f"checkpoint folder {folder}: not a directory")
        items: list = sorted(folder.glob(f"*{CHECKPOINT_SUFFIX}"))
        if not items:
            raise InputError(f"checkpoint folder {folder}: holds no *{CHECKPOINT_SUFFIX} files")
    else:
        items = list(source)
    checkpoints = [c if isinstance(c, Checkpoint) else read_checkpoint(c) for c in items]
    checkpoints.sort(key=lambda c: c.step)
    for before, after in zip(checkpoints, checkpoints[1:]):
        if before.step == after.step:
            raise InputError(f"checkpoints {before.path} and {after.path} both claim step {after.step}")
    return checkpoints


def select_parameters(checkpoints: Sequence[Checkpoint], patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters to use: all floating tensors, or those matching any glob in ``patterns``.

    Every checkpoint must hold the selected tensors with the same shape: otherwise the weight
    vectors would not be comparable, and the error names the first checkpoint that differs.
    """
    if not checkpoints:
        raise InputError("no checkpoints given")
    first = checkpoints[0]
    names = first.parameter_names
    if not names:
        raise InputError(
            f"checkpoint {first.path}: holds no floating-point tensors (only "
            f"{sorted({i.dtype for i in first.tensors.values()}) or 'none'}), so there are no weights to compare"
        )
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not names:
            raise InputError(
                f"parameter patterns {list(patterns)} match no floating tensor of {first.path} "
                f"(it holds {first.parameter_names})"
            )
    for ckpt in checkpoints[1:]:
        for name in names:
            info = ckpt.tensors.get(name)
            if info is None:
                raise InputError(f"checkpoint {ckpt.path}: has no tensor {name!r} (present in {first.path})")
            if info.shape != first.tensors[name].shape:
                raise InputError(
                    f"checkpoint {ckpt.path}: tensor {name!r} has shape {list(info.shape)}, "
                    f"but {first.path} has {list(first.tensors[name].shape)}"
                )
            if info.dtype != first.tensors[name].dtype:  # slices are read with one layout for all files
                raise InputError(
                    f"checkpoint {ckpt.path}: tensor {name!r} is stored as {info.dtype}, "
                    f"but {first.path} stores it as {first.tensors[name].dtype}"
                )
    return names


def iter_weight_slices(
    checkpoints: Sequence[Checkpoint], names: Sequence[str], max_elements: int = 1 << 16, *, pin_memory: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (tensor name, (T, n) block) of the flattened weights, at most ``max_elements`` per checkpoint.

    Each slice is one positioned read per file (no memory map, so nothing else stays resident),
    and the next slice is read on a background thread while the caller works on this one: peak
    memory is two (T, slice) buffers, never the weight matrix. Blocks keep the stored dtype and
    live in those buffers: each is valid until the next one is requested (``pin_memory`` makes
    them page-locked, for fast copies to a GPU).
    """
    info = checkpoints[0].tensors
    plan = []  # (name, dtype, first element, element count) per slice
    for name in names:
        numel = info[name].numel
        plan += [(name, info[name].dtype, s, min(max_elements, numel - s)) for s in range(0, numel, max_elements)]
    if not plan:
        return
    row_bytes = -(-max(n * _DTYPE_BYTES[dtype] for _, dtype, _, n in plan) // 8) * 8  # 8-byte aligned rows
    buffers = [torch.empty((len(checkpoints), row_bytes), dtype=torch.uint8, pin_memory=pin_memory) for _ in range(2)]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(c.path, "rb", buffering=0)) for c in checkpoints]
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))

        def hint(item):
            """Ask the kernel to fetch a later slice in the background: reads from disk then overlap."""
            name, dtype, start, n = item
            width = _DTYPE_BYTES[dtype]
            for fh, ckpt in zip(files, checkpoints):
                os.posix_fadvise(fh.fileno(), ckpt.tensors[name].offset + start * width, n * width, os.POSIX_FADV_WILLNEED)

        def read(index, buffer):
            name, dtype, start, n = plan[index]
            if _CAN_ADVISE and index + _READ_AHEAD_SLICES < len(plan):
                hint(plan[index + _READ_AHEAD_SLICES])
            width = _DTYPE_BYTES[dtype]
            block = buffer[:, : n * width]
            for row, (fh, ckpt) in enumerate(zip(files, checkpoints)):
                view = memoryview(block[row].numpy())
                if os.preadv(fh.fileno(), [view], ckpt.tensors[name].offset + start * width) != len(view):
                    raise InputError(f"checkpoint {ckpt.path}: truncated while reading tensor {name!r}")
            return block.view(_TORCH_DTYPES[dtype])

        if _CAN_ADVISE:
            for item in plan[:_READ_AHEAD_SLICES]:
                hint(item)
        pending = pool.submit(read, 0, buffers[0])
        for i, item in enumerate(plan):
            block = pending.result()
            if i + 1 < len(plan):
                pending = pool.submit(read, i + 1, buffers[(i + 1) % 2])
            yield item[0], block


def load_state_dict(checkpoint: Checkpoint | str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load all tensors of a validated checkpoint (for rebuilding a model), never via pickle."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    with safe_open(str(ckpt.path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}
