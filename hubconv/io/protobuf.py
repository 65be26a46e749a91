"""A strict protobuf wire-format walker (no `protobuf` package): in-memory messages and files walked by offset.

Shared by the SentencePiece model reader (`hubconv.tokenizers`) and the MindSpore `.ckpt` reader
(`hubconv.io.mindspore_ckpt`). Only the wire format is decoded: each field is (field number, wire
type, value), and the caller knows its schema. Everything is validated, because the bytes are
downloaded data: a varint is at most 10 bytes and fits 64 bits, a field number is 1..2^29-1, only
wire types 0 (varint), 1 (64-bit), 2 (length-delimited) and 5 (32-bit) are accepted (groups, 3 and
4, are deprecated and used by no format we read), and a length must fit the bytes left in the
enclosing message. Every problem is a `ProtobufError` whose one-line message names the message
(`what`), the field and the byte offset.

`fields(buf)` walks a message held in memory. `stream_fields(read_at, start, end)` walks the
bytes [start, end) of a file through positional reads of a small window, without loading it:
length-delimited fields come back as (offset, length) of their payload in the file, so a caller
can descend into a nested message by walking that range, read a short string, or keep a tensor's
bytes as a file segment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
MAX_VARINT_BYTES = 10
MAX_FIELD_NUMBER = (1 << 29) - 1
WINDOW = 64 * 1024  # bytes read at a time by the streaming walker (keys and varints need at most 15)

ReadAt = Callable[[int, int], bytes]  # (offset, nbytes) -> bytes (shorter only at the end of the file)


class ProtobufError(ValueError):
    """Malformed protobuf bytes; the message is one line naming the message, field and offset."""


def decode_varint(buf: bytes | memoryview, pos: int, end: int, what: str, origin: int = 0) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`; at most 10 bytes, at most 64 bits.
    `origin` is added to positions in messages (the file offset of `buf[0]`)."""
    value = shift = 0
    start = pos + origin
    first = pos
    while True:
        if pos >= end:
            raise ProtobufError(f"{what}: truncated varint at byte {start}")
        byte = buf[pos]
        pos += 1
        if pos - first == MAX_VARINT_BYTES and byte & 0x80:
            raise ProtobufError(f"{what}: varint at byte {start} is longer than {MAX_VARINT_BYTES} bytes")
        if pos - first == MAX_VARINT_BYTES and byte > 1:
            raise ProtobufError(f"{what}: varint at byte {start} does not fit in 64 bits")
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def to_int64(value: int) -> int:
    """A varint read as protobuf int64 (two's complement: 10-byte varints are negative numbers)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _key(key: int, at: int, what: str) -> tuple[int, int]:
    number, wire = key >> 3, key & 7
    if wire in (SGROUP, EGROUP):
        raise ProtobufError(f"{what}: field {number} at byte {at} uses the deprecated group wire type {wire}")
    if wire not in (VARINT, I64, LEN, I32):
        raise ProtobufError(f"{what}: field {number} at byte {at} has invalid wire type {wire}")
    if not 1 <= number <= MAX_FIELD_NUMBER:
        raise ProtobufError(f"{what}: invalid field number {number} at byte {at}")
    return number, wire


def fields(buf: bytes | memoryview, what: str = "message") -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one in-memory message: an int for varints, bytes for the others."""
    pos, end = 0, len(buf)
    while pos < end:
        at = pos
        key, pos = decode_varint(buf, pos, end, what)
        number, wire = _key(key, at, what)
        if wire == VARINT:
            value, pos = decode_varint(buf, pos, end, f"{what}: field {number}")
            yield number, wire, value
            continue
        if wire == LEN:
            size, pos = decode_varint(buf, pos, end, f"{what}: field {number}")
        else:
            size = 8 if wire == I64 else 4
        if size > end - pos:
            raise ProtobufError(f"{what}: field {number} at byte {at} needs {size} bytes but only {end - pos} are left")
        yield number, wire, bytes(buf[pos : pos + size])
        pos += size


def file_reader(fd: int) -> ReadAt:
    """Positional reads from an open file descriptor."""
    return lambda offset, nbytes: os.pread(fd, nbytes, offset)


def stream_fields(read_at: ReadAt, start: int, end: int, what: str = "message") -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of the message in file bytes [start, end), read through a window.

    Varints come back as ints, 32/64-bit fields as their bytes, length-delimited fields as (offset, length)
    of their payload in the file (not read). Offsets in errors are file offsets. A file shorter than `end`
    is reported as truncated."""
    base, window = start, b""
    pos = start
    while pos < end:
        need = min(MAX_VARINT_BYTES * 2 + 8, end - pos)  # key + length varint, or a fixed64
        if pos < base or pos + need > base + len(window):
            base, window = pos, read_at(pos, min(WINDOW, end - pos))
            if len(window) < need:
                raise ProtobufError(f"{what}: file ends at byte {pos + len(window)}, inside the message (to {end})")
        at = pos
        rel = pos - base
        wend = len(window)
        key, rel = decode_varint(window, rel, wend, what, base)
        number, wire = _key(key, at, what)
        if wire == VARINT:
            value, rel = decode_varint(window, rel, wend, f"{what}: field {number}", base)
            pos = base + rel
            yield number, wire, value
            continue
        if wire == LEN:
            size, rel = decode_varint(window, rel, wend, f"{what}: field {number}", base)
        else:
            size = 8 if wire == I64 else 4
        pos = base + rel
        if size > end - pos:
            raise ProtobufError(f"{what}: field {number} at byte {at} needs {size} bytes but only {end - pos} are left")
        if wire == LEN:
            yield number, wire, (pos, size)
        else:
            yield number, wire, bytes(window[rel : rel + size])
        pos += size
