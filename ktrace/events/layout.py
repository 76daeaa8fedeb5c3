"""Binary layouts of kernel events, as generated from BTF (see generated.py)."""

from __future__ import annotations

import struct
from typing import NamedTuple


class Field(NamedTuple):
    name: str  # dotted for nested structs: "task.pid"
    offset: int
    code: str  # struct module code: "Q", "I", "16s", ...
    ctype: str  # the C type name from BTF: "__u64", "__u8[16]"


class Layout:
    """A fixed-size event struct: decodes a record into a tuple of field values."""

    __slots__ = ("name", "size", "fields", "names", "struct")

    def __init__(self, name: str, size: int, fields: tuple[Field, ...]) -> None:
        self.name = name
        self.size = size
        self.fields = fields
        self.names = tuple(f.name for f in fields)
        fmt = ["<"]
        pos = 0
        for f in fields:
            if f.offset < pos:
                raise ValueError(f"{name}.{f.name}: overlapping field at offset {f.offset}")
            if f.offset > pos:
                fmt.append(f"{f.offset - pos}x")
            fmt.append(f.code)
            pos = f.offset + struct.calcsize("<" + f.code)
        if pos < size:
            fmt.append(f"{size - pos}x")
        self.struct = struct.Struct("".join(fmt))
        if self.struct.size != size:
            raise ValueError(f"{name}: layout is {self.struct.size} bytes, BTF says {size}")

    def subset(self, names: tuple[str, ...]) -> struct.Struct:
        """A Struct that reads only these fields, in this order of offsets, skipping the rest as padding."""
        wanted = sorted((f for f in self.fields if f.name in names), key=lambda f: f.offset)
        if len(wanted) != len(set(names)):
            missing = set(names) - {f.name for f in wanted}
            raise ValueError(f"{self.name} has no field {', '.join(sorted(missing))}")
        return Layout(self.name, self.size, tuple(wanted)).struct

    def unpack(self, buf: bytes | memoryview, offset: int = 0) -> tuple:
        return self.struct.unpack_from(buf, offset)

    def as_dict(self, buf: bytes | memoryview, offset: int = 0) -> dict:
        return dict(zip(self.names, self.struct.unpack_from(buf, offset)))
