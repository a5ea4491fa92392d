"""Read and write safetensors files one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw little-endian tensor bytes. safetensors' own `save_file` needs
every tensor of a file in memory at once; writing the format here lets a merge hold one tensor at
a time and copy untouched tensors file-to-file without passing them through Python at all.
Torch-free on purpose: the vLLM servability check reads headers where torch is not installed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import struct
from pathlib import Path

from entrypoint.errors import ConfigError

# safetensors refuses headers above 100 MB; anything larger is corruption, not a model.
MAX_HEADER_BYTES = 100_000_000
COPY_CHUNK_BYTES = 16 << 20

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file; `start`/`end` are relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def header_value(self) -> dict[str, object]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": [self.start, self.end]}


@dataclasses.dataclass(frozen=True)
class FileHeader:
    path: Path
    data_start: int  # absolute file offset of the first tensor byte
    entries: tuple[TensorEntry, ...]  # in file order

    @property
    def data_bytes(self) -> int:
        return self.entries[-1].end if self.entries else 0

    def by_name(self) -> dict[str, TensorEntry]:
        return {entry.name: entry for entry in self.entries}


def read_header(path: Path, role: str) -> FileHeader:
    """Parse and check a header without reading tensor data; `role` names the file in errors.

    A truncated copy (interrupted transfer, full disk) is caught here: the header promises more
    bytes than the file holds.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{role} {path} is not a valid safetensors file: {why}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise bad(f"it holds only {size} bytes (truncated)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"its header claims {header_len} bytes but the file holds {size} (truncated?)")
            raw = fh.read(header_len)
    except FileNotFoundError:
        raise ConfigError(f"{role} {path} is missing") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    entries = []
    for name, spec in header.items():
        try:
            dtype = str(spec["dtype"])
            shape = tuple(int(d) for d in spec["shape"])
            start, end = (int(v) for v in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry") from None
        itemsize = DTYPE_SIZES.get(dtype)
        if itemsize is not None and (end - start) != math.prod(shape) * itemsize:
            raise bad(f"tensor {name!r} ({dtype}, shape {list(shape)}) spans {end - start} bytes")
        entries.append(TensorEntry(name, dtype, shape, start, end))
    entries.sort(key=lambda e: (e.start, e.end))
    position = 0
    for entry in entries:
        if entry.start != position or entry.end < entry.start:
            raise bad(f"tensor {entry.name!r} has inconsistent data offsets")
        position = entry.end
    data_start = 8 + header_len
    if data_start + position != size:
        state = "truncated" if data_start + position > size else "longer than its header describes"
        raise bad(f"its header describes {position} bytes of tensor data but the file holds "
                  f"{size - data_start} ({state})")
    return FileHeader(path, data_start, tuple(entries))


def encode_header(entries: tuple[TensorEntry, ...], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix included), space-padded to 8 bytes like safetensors does."""
    header: dict[str, object] = {"__metadata__": metadata}
    header.update({entry.name: entry.header_value() for entry in entries})
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Append `count` bytes of `src_fd` from `offset` to `dst_fd` without reading them into memory.

    copy_file_range lets the kernel (or an NFS 4.2 server) copy; filesystems that refuse it get a
    plain chunked copy.
    """
    done = 0
    while done < count:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, count - done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            break
        if copied == 0:
            raise OSError(errno.EIO, f"source ended {count - done} bytes early while copying")
        done += copied
    while done < count:
        chunk = os.pread(src_fd, min(COPY_CHUNK_BYTES, count - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, f"source ended {count - done} bytes early while copying")
        write_all(dst_fd, chunk)
        done += len(chunk)
