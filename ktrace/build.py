"""Build steps behind `make bpf` and `make generate`.

`python -m ktrace.build manifest` records the hashes of the BPF sources and of the
objects compiled from them; `python -m ktrace.build generate` writes the Python
event layouts from the objects' BTF. Tests recompute both and fail on drift.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from ktrace import libbpf

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(__file__).resolve().parent
OBJECT_DIR = PACKAGE / "bpf"
MANIFEST = OBJECT_DIR / "manifest.json"
GENERATED = PACKAGE / "events" / "generated.py"

# The enums that reach Python, as NAME → prefix stripped from their values.
ENUMS = {
    "kt_kind": "KT_KIND_",
    "kt_family": "KT_FAMILY_",
    "kt_attribution": "KT_ATTR_",
    "kt_reset_direction": "KT_RESET_",
    "kt_retransmit_kind": "KT_RETX_",
    "kt_held_sizes": "KT_",
    "kt_direction": "KT_DIR_",
    "kt_dns_message": "KT_DNS_",
    "kt_dns_role": "KT_DNS_",
    "kt_udp_sizes": "KT_",
    "kt_lookup_function": "KT_LOOKUP_",
    "kt_oom_source": "KT_OOM_",
    "kt_proc_counter": "KT_PROC_",
    "kt_latency_sizes": "KT_",
    "kt_bio_op": "KT_BIO_",
    "kt_latency_loss": "KT_LOSS_",
}
STRUCTS_ALSO = ("kt_counters", "kt_udp_flow_key", "kt_drop_key", "kt_hist", "kt_runq_key", "kt_bio_key", "kt_bio_hist")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_files() -> list[Path]:
    files = sorted((ROOT / "bpf").glob("*.c")) + sorted((ROOT / "bpf").glob("*.h"))
    files += sorted((ROOT / "vmlinux").glob("*/vmlinux.h"))
    return files


def object_files() -> list[Path]:
    return sorted(OBJECT_DIR.glob("*.bpf.o"))


def manifest() -> dict:
    return {
        "sources": {str(p.relative_to(ROOT)): sha256(p) for p in source_files()},
        "objects": {p.name: sha256(p) for p in object_files()},
    }


def write_manifest() -> None:
    MANIFEST.write_text(json.dumps(manifest(), indent=2, sort_keys=True) + "\n")


class LayoutError(Exception):
    pass


def _strip(btf: libbpf.Btf, tid: int) -> libbpf.BtfTypeInfo:
    """Resolve typedefs and qualifiers."""
    t = btf.type(tid)
    while t.kind in (libbpf.BTF_KIND_TYPEDEF, libbpf.BTF_KIND_CONST, libbpf.BTF_KIND_VOLATILE,
                     libbpf.BTF_KIND_RESTRICT, libbpf.BTF_KIND_TYPE_TAG):
        t = btf.type(t.type)
    return t


def _int_code(size: int, signed: bool) -> str:
    codes = {1: "b", 2: "h", 4: "i", 8: "q"}
    if size not in codes:
        raise LayoutError(f"unsupported integer size {size}")
    code = codes[size]
    return code if signed else code.upper()


def _fields(btf: libbpf.Btf, tid: int, prefix: str, base: int) -> list[tuple[str, int, str, str]]:
    t = _strip(btf, tid)
    if t.kind == libbpf.BTF_KIND_UNION:
        raise LayoutError(f"{prefix or t.name}: unions are not supported")
    out = []
    for name, mtid, bit_offset, bitfield in t.members:
        if bitfield or bit_offset % 8:
            raise LayoutError(f"{t.name}.{name}: bitfields are not supported")
        if not name:
            raise LayoutError(f"{t.name}: anonymous members are not supported")
        offset = base + bit_offset // 8
        full = f"{prefix}{name}"
        declared = btf.type(mtid)
        m = _strip(btf, mtid)
        if m.kind == libbpf.BTF_KIND_STRUCT:
            out += _fields(btf, mtid, full + ".", offset)
        elif m.kind in (libbpf.BTF_KIND_INT, libbpf.BTF_KIND_ENUM):
            ctype = declared.name or m.name
            out.append((full, offset, _int_code(m.size, m.signed if m.kind == libbpf.BTF_KIND_INT else True), ctype))
        elif m.kind == libbpf.BTF_KIND_ARRAY:
            elem_id, n = m.array
            elem = _strip(btf, elem_id)
            if elem.kind != libbpf.BTF_KIND_INT:
                raise LayoutError(f"{t.name}.{name}: only arrays of integers are supported")
            if elem.size == 1:
                out.append((full, offset, f"{n}s", f"{btf.type(elem_id).name}[{n}]"))
            else:  # one field per element: "slots[0]", "slots[1]", ... (histograms)
                code = _int_code(elem.size, elem.signed)
                out += [(f"{full}[{i}]", offset + i * elem.size, code, btf.type(elem_id).name) for i in range(n)]
        else:
            raise LayoutError(f"{t.name}.{name}: unsupported member kind {m.kind}")
    return out


def _struct_layout(btf: libbpf.Btf, name: str) -> tuple[int, list[tuple[str, int, str, str]]]:
    tid = btf.find(name, libbpf.BTF_KIND_STRUCT)
    if tid < 0:
        raise LayoutError(f"struct {name} is not in the object's BTF")
    fields = [f for f in _fields(btf, tid, "", 0) if not f[0].split(".")[-1].startswith("_pad")]
    return btf.type(tid).size, fields


def collect() -> tuple[dict[str, dict[int, str]], dict[str, tuple[int, list]]]:
    enums: dict[str, dict[int, str]] = {}
    structs: dict[str, tuple[int, list]] = {}
    for obj in object_files():
        with libbpf.Btf.from_file(str(obj)) as btf:
            for enum, prefix in ENUMS.items():
                values = btf.enum(enum)
                if not values:
                    continue
                named = {v: n.removeprefix(prefix).lower() for v, n in values.items() if not n.endswith("_MAX")}
                if enum in enums and enums[enum] != named:
                    raise LayoutError(f"enum {enum} differs between objects ({obj.name})")
                enums[enum] = named
            wanted = [f"kt_{kind}_event" for kind in enums.get("kt_kind", {}).values()] + list(STRUCTS_ALSO)
            for name in wanted:
                if btf.find(name, libbpf.BTF_KIND_STRUCT) < 0:
                    continue
                layout = _struct_layout(btf, name)
                if name in structs and structs[name] != layout:
                    raise LayoutError(f"struct {name} differs between objects ({obj.name})")
                structs[name] = layout
    for kind in enums.get("kt_kind", {}).values():
        if f"kt_{kind}_event" not in structs:
            raise LayoutError(f"kind {kind} has no struct kt_{kind}_event in any object")
    return enums, structs


def render() -> str:
    enums, structs = collect()
    lines = [
        "# Code generated by `make generate` from the BTF of ktrace/bpf/*.bpf.o; DO NOT EDIT.",
        '"""Event layouts and enums of the BPF objects, generated from their BTF."""',
        "",
        "from ktrace.events.layout import Field, Layout",
        "",
    ]
    for enum in ENUMS:
        values = enums.get(enum, {})
        lines.append(f"{enum.removeprefix('kt_').upper()} = {{")
        lines += [f"    {v}: {n!r}," for v, n in sorted(values.items())]
        lines += ["}", ""]
    for name, (size, fields) in structs.items():
        const = name.removeprefix("kt_").upper()
        lines.append(f"{const} = Layout(")
        lines.append(f"    {name!r},")
        lines.append(f"    {size},")
        lines.append("    (")
        lines += [f"        Field({n!r}, {o}, {c!r}, {t!r})," for n, o, c, t in fields]
        lines += ["    ),", ")", ""]
    lines.append("# kind value → layout")
    lines.append("LAYOUTS = {")
    for value, kind in sorted(enums.get("kt_kind", {}).items()):
        lines.append(f"    {value}: {f'kt_{kind}_event'.removeprefix('kt_').upper()},")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[1:] == ["manifest"]:
        write_manifest()
    elif argv[1:] == ["generate"]:
        GENERATED.write_text(render())
    else:
        print("usage: python -m ktrace.build manifest|generate", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
