"""Write-then-rename, so a crash or a rejected input never leaves a half-written output; and output
paths checked before any work, so an output never replaces one of its own inputs."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import InputError


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output path that is a directory, that is one of ``inputs`` (compared after resolving
    links, so ``./a/../x`` or a symlink to an input count), or that lies inside an input folder (a
    parquet file among the checkpoints would be read as one next time)."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"output {path}: is a directory; name a file to write")
    resolved = target.resolve()
    for source in filter(None, inputs):
        source_path = Path(source).resolve()
        if resolved == source_path or (target.exists() and source_path.exists() and os.path.samefile(target, source_path)):
            raise InputError(f"output {path}: is the input {source}; write the result elsewhere")
        if source_path.is_dir() and resolved.is_relative_to(source_path):
            raise InputError(f"output {path}: lies inside the input folder {source}; write it elsewhere")
    return target


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = check_output(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output {path}: its folder cannot be created ({exc.strerror})") from None
    # A fresh name the writer creates itself, so the file gets the usual permissions (umask),
    # not mkstemp's owner-only 0600.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
