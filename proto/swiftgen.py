#!/usr/bin/env python3
"""Generates the Swift side of the protobuf contract from the same .proto files protoc-c reads.

For every message: a Swift value type, `init(c:)` from the protobuf-c struct and `toC(_:)` back,
calling protoc-c's own generated pack/unpack functions. For every service: typed method
descriptors. Input is a FileDescriptorSet (protoc --descriptor_set_out --include_imports);
the C names follow protoc-c's rules and are checked against the generated headers.
"""
import base64
import os
import re
import sys

from google.protobuf import descriptor_pb2 as d

FD = d.FieldDescriptorProto

# Files served by reflection under a second package too: the twin is the same file, renamed
# (grpc.reflection.v1alpha is v1 under its older name; clients ask for one or the other). Only the
# original gets Swift and C types.
TWINS = {"grpc/reflection/v1/reflection.proto": ("grpc.reflection.v1", "grpc.reflection.v1alpha")}


def twin(f, old, new):
    """`f` with its package `old` renamed `new`: its name, its package and every type it names."""
    copy = d.FileDescriptorProto()
    copy.CopyFrom(f)
    copy.name = f.name.replace(old.replace(".", "/"), new.replace(".", "/"))
    copy.package = new

    def moved(type_name):
        return f".{new}." + type_name[len(old) + 2:] if type_name.startswith(f".{old}.") else type_name

    def rename(messages):
        for m in messages:
            for fld in m.field:
                if fld.HasField("type_name"):  # assigning a scalar's empty name would add it to the bytes
                    fld.type_name = moved(fld.type_name)
            rename(m.nested_type)

    rename(copy.message_type)
    for service in copy.service:
        for method in service.method:
            method.input_type, method.output_type = moved(method.input_type), moved(method.output_type)
    return copy

SWIFT_KEYWORDS = {
    "default", "protocol", "class", "struct", "enum", "func", "var", "let", "in", "is", "as",
    "self", "Self", "init", "deinit", "extension", "import", "internal", "public", "private",
    "return", "static", "subscript", "super", "switch", "case", "where", "while", "repeat",
    "operator", "throws", "true", "false", "nil", "type", "Type", "for", "if", "else", "guard",
}

SCALARS = {
    # proto type: (swift type, default, c->swift, swift->c)
    FD.TYPE_STRING: ("String", '""', "ProtoC.string({v})", "arena.string({v})"),
    FD.TYPE_BYTES: ("[UInt8]", "[]", "ProtoC.bytes({v})", "arena.bytes({v})"),
    FD.TYPE_INT32: ("Int32", "0", "{v}", "{v}"),
    FD.TYPE_SINT32: ("Int32", "0", "{v}", "{v}"),
    FD.TYPE_SFIXED32: ("Int32", "0", "{v}", "{v}"),
    FD.TYPE_INT64: ("Int64", "0", "{v}", "{v}"),
    FD.TYPE_SINT64: ("Int64", "0", "{v}", "{v}"),
    FD.TYPE_SFIXED64: ("Int64", "0", "{v}", "{v}"),
    FD.TYPE_UINT32: ("UInt32", "0", "{v}", "{v}"),
    FD.TYPE_FIXED32: ("UInt32", "0", "{v}", "{v}"),
    FD.TYPE_UINT64: ("UInt64", "0", "{v}", "{v}"),
    FD.TYPE_FIXED64: ("UInt64", "0", "{v}", "{v}"),
    FD.TYPE_DOUBLE: ("Double", "0", "{v}", "{v}"),
    FD.TYPE_FLOAT: ("Float", "0", "{v}", "{v}"),
    FD.TYPE_BOOL: ("Bool", "false", "({v} != 0)", "({v} ? 1 : 0)"),
}


def camel_to_lower(name):
    # protoc-c's CamelToLower: an underscore before each capital that follows a lower-case letter.
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i > 0 and name[i - 1].islower():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def lower_camel(snake):
    parts = snake.split("_")
    s = parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])
    return f"`{s}`" if s in SWIFT_KEYWORDS else s


def upper_camel_enum_value(name, enum_name):
    # JOB_STATUS_UNSPECIFIED -> jobStatusUnspecified; SERVING -> serving
    parts = name.lower().split("_")
    s = parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])
    return f"`{s}`" if s in SWIFT_KEYWORDS else s


class Names:
    """Maps fully qualified proto names to C and Swift names."""

    def __init__(self):
        self.c_type = {}       # .pkg.Msg.Nested -> Pkg__Msg__Nested
        self.c_func = {}       # .pkg.Msg -> pkg__msg
        self.swift = {}        # .pkg.Msg.Nested -> Msg.Nested
        self.is_enum = {}

    def add_file(self, f):
        pkg_parts = f.package.split(".") if f.package else []
        c_pkg = "__".join(p[:1].upper() + p[1:] for p in pkg_parts)
        c_pkg_lower = "__".join(camel_to_lower(p) for p in pkg_parts)

        def walk(prefix_proto, c_prefix, c_lower_prefix, swift_prefix, msgs, enums):
            for e in enums:
                fq = f"{prefix_proto}.{e.name}"
                self.c_type[fq] = f"{c_prefix}__{e.name}"
                self.swift[fq] = f"{swift_prefix}{e.name}"
                self.is_enum[fq] = True
            for m in msgs:
                fq = f"{prefix_proto}.{m.name}"
                self.c_type[fq] = f"{c_prefix}__{m.name}"
                self.c_func[fq] = f"{c_lower_prefix}__{camel_to_lower(m.name)}"
                self.swift[fq] = f"{swift_prefix}{m.name}"
                self.is_enum[fq] = False
                walk(fq, f"{c_prefix}__{m.name}", f"{c_lower_prefix}__{camel_to_lower(m.name)}",
                     f"{swift_prefix}{m.name}.", m.nested_type, m.enum_type)

        walk("." + f.package, c_pkg, c_pkg_lower, "", f.message_type, f.enum_type)


def gen_enum(e, swift_name, indent):
    short = swift_name.split(".")[-1]
    p = indent
    lines = [f"{p}/// `{e.name}`: an open proto3 enum; unknown values survive a round trip.",
             f"{p}public struct {short}: RawRepresentable, Hashable, Sendable, CustomStringConvertible {{",
             f"{p}    public var rawValue: Int32",
             f"{p}    public init(rawValue: Int32) {{ self.rawValue = rawValue }}"]
    for v in e.value:
        lines.append(f"{p}    public static let {upper_camel_enum_value(v.name, e.name)} = {short}(rawValue: {v.number})")
    lines.append(f"{p}    /// The value's name in the .proto file, or its number when unknown.")
    lines.append(f"{p}    public var description: String {{")
    lines.append(f"{p}        switch rawValue {{")
    seen = set()
    for v in e.value:
        if v.number in seen:
            continue
        seen.add(v.number)
        lines.append(f'{p}        case {v.number}: return "{v.name}"')
    lines.append(f'{p}        default: return String(rawValue)')
    lines.append(f"{p}        }}")
    lines.append(f"{p}    }}")
    lines.append(f"{p}}}")
    return lines


def gen_message(m, fq, names, indent, out_ext):
    p = indent
    swift_name = names.swift[fq]
    short = swift_name.split(".")[-1]
    c_type = names.c_type[fq]
    c_func = names.c_func[fq]
    lines = [f"{p}/// `{fq[1:]}`", f"{p}public struct {short}: Hashable, Sendable {{"]
    init_lines, to_c_lines = [], []
    oneofs = {}  # oneof index -> its member fields
    for fld in m.field:
        if fld.proto3_optional:
            raise SystemExit(f"swiftgen: proto3 optional is not supported ({fq}.{fld.name})")
        if fld.HasField("oneof_index"):
            oneofs.setdefault(fld.oneof_index, []).append(fld)
            continue
        sname = lower_camel(fld.name)
        cname = fld.name
        repeated = fld.label == FD.LABEL_REPEATED
        if fld.type == FD.TYPE_MESSAGE:
            t = names.swift[fld.type_name]
            if repeated:
                lines.append(f"{p}    public var {sname}: [{t}] = []")
                init_lines.append(f"{sname} = (0..<c.n_{cname}).map {{ {t}(c: c.{cname}[$0]!.pointee) }}")
                to_c_lines.append(f"c.n_{cname} = {sname}.count")
                to_c_lines.append(f"c.{cname} = arena.pointers({sname}.map {{ arena.object($0.toC(arena)) }})")
            else:
                lines.append(f"{p}    public var {sname}: {t}? = nil")
                init_lines.append(f"{sname} = c.{cname}.map {{ {t}(c: $0.pointee) }}")
                to_c_lines.append(f"c.{cname} = {sname}.map {{ arena.object($0.toC(arena)) }}")
        elif fld.type == FD.TYPE_ENUM:
            t = names.swift[fld.type_name]
            ct = names.c_type[fld.type_name]
            if repeated:
                lines.append(f"{p}    public var {sname}: [{t}] = []")
                init_lines.append(f"{sname} = (0..<c.n_{cname}).map {{ {t}(rawValue: Int32(bitPattern: UInt32(c.{cname}[$0].rawValue))) }}")
                to_c_lines.append(f"c.n_{cname} = {sname}.count")
                to_c_lines.append(f"c.{cname} = arena.array({sname}.map {{ {ct}(rawValue: numericCast(UInt32(bitPattern: $0.rawValue))) }})")
            else:
                lines.append(f"{p}    public var {sname}: {t} = {t}(rawValue: 0)")
                init_lines.append(f"{sname} = {t}(rawValue: Int32(bitPattern: UInt32(c.{cname}.rawValue)))")
                to_c_lines.append(f"c.{cname} = {ct}(rawValue: numericCast(UInt32(bitPattern: {sname}.rawValue)))")
        elif fld.type in SCALARS:
            t, default, c2s, s2c = SCALARS[fld.type]
            if repeated:
                lines.append(f"{p}    public var {sname}: [{t}] = []")
                init_lines.append(f"{sname} = (0..<c.n_{cname}).map {{ {c2s.format(v=f'c.{cname}[$0]')} }}")
                to_c_lines.append(f"c.n_{cname} = {sname}.count")
                to_c_lines.append(f"c.{cname} = arena.array({sname}.map {{ {s2c.format(v='$0')} }})")
            else:
                lines.append(f"{p}    public var {sname}: {t} = {default}")
                init_lines.append(f"{sname} = {c2s.format(v=f'c.{cname}')}")
                to_c_lines.append(f"c.{cname} = {s2c.format(v=sname)}")
        else:
            raise SystemExit(f"swiftgen: field type {fld.type} is not supported ({fq}.{fld.name})")
    for index, members in sorted(oneofs.items()):
        lines += gen_oneof(m.oneof_decl[index].name, members, c_type, names, p, init_lines, to_c_lines, fq)
    lines.append(f"{p}    public init() {{}}")
    for e in m.enum_type:
        lines.append("")
        lines += gen_enum(e, names.swift[f"{fq}.{e.name}"], p + "    ")
    for nm in m.nested_type:
        if nm.options.map_entry:
            raise SystemExit(f"swiftgen: map fields are not supported ({fq})")
        lines.append("")
        lines += gen_message(nm, f"{fq}.{nm.name}", names, p + "    ", out_ext)
    lines.append(f"{p}}}")

    ext = [f"extension {swift_name}: ProtoMessage {{",
           f"    public typealias CMessage = {c_type}",
           f"    public init(c: {c_type}) {{"]
    ext += [f"        {l}" for l in init_lines] or ["        self.init()"]
    if init_lines:
        ext.insert(3, "        self.init()")
    ext += ["    }",
            f"    public func toC(_ arena: ProtoArena) -> {c_type} {{",
            f"        var c = {c_type}()",
            f"        {c_func}__init(&c)"]
    ext += [f"        {l}" for l in to_c_lines]
    ext += ["        return c", "    }",
            f"    public static func cUnpack(_ data: UnsafePointer<UInt8>?, _ count: Int) -> UnsafeMutablePointer<{c_type}>? {{",
            f"        {c_func}__unpack(nil, count, data)",
            "    }",
            f"    public static func cFreeUnpacked(_ message: UnsafeMutablePointer<{c_type}>) {{",
            f"        {c_func}__free_unpacked(message, nil)",
            "    }",
            f"    public static func cPackedSize(_ message: UnsafePointer<{c_type}>) -> Int {{",
            f"        {c_func}__get_packed_size(message)",
            "    }",
            f"    public static func cPack(_ message: UnsafePointer<{c_type}>, _ out: UnsafeMutablePointer<UInt8>) -> Int {{",
            f"        {c_func}__pack(message, out)",
            "    }",
            "}", ""]
    out_ext.append(ext)
    return lines


def gen_oneof(oneof_name, members, c_type, names, p, init_lines, to_c_lines, fq):
    """A oneof: a Swift enum with one case per member and an optional property of it. The C side
    is protoc-c's `<oneof>_case` (the member's field number) and a union of the members."""
    enum_name = "".join(part[:1].upper() + part[1:] for part in oneof_name.split("_"))
    prop = lower_camel(oneof_name)
    case_type = f"{c_type}__{enum_name}Case"
    lines = [f"{p}    /// The `{oneof_name}` oneof: at most one of its fields is set.",
             f"{p}    public enum {enum_name}: Hashable, Sendable {{"]
    init_lines.append(f"switch Int(c.{oneof_name}_case.rawValue) {{")
    to_c_lines.append(f"switch {prop} {{")
    for fld in members:
        case = lower_camel(fld.name)
        if fld.label == FD.LABEL_REPEATED:
            raise SystemExit(f"swiftgen: a repeated field in a oneof is not possible ({fq}.{fld.name})")
        if fld.type == FD.TYPE_MESSAGE:
            t = names.swift[fld.type_name]
            c2s = f"c.{fld.name}.map {{ .{case}({t}(c: $0.pointee)) }}"
            s2c = f"arena.object(value.toC(arena))"
        elif fld.type == FD.TYPE_ENUM:
            t = names.swift[fld.type_name]
            ct = names.c_type[fld.type_name]
            c2s = f".{case}({t}(rawValue: Int32(bitPattern: UInt32(c.{fld.name}.rawValue))))"
            s2c = f"{ct}(rawValue: numericCast(UInt32(bitPattern: value.rawValue)))"
        elif fld.type in SCALARS:
            t, _, conv_in, conv_out = SCALARS[fld.type]
            c2s = f".{case}({conv_in.format(v=f'c.{fld.name}')})"
            s2c = conv_out.format(v="value")
        else:
            raise SystemExit(f"swiftgen: field type {fld.type} is not supported ({fq}.{fld.name})")
        lines.append(f"{p}        case {case}({t})")
        init_lines.append(f"case {fld.number}: {prop} = {c2s}")
        to_c_lines.append(f"case .{case}(let value)?:")
        to_c_lines.append(f"    c.{oneof_name}_case = {case_type}(rawValue: {fld.number})")
        to_c_lines.append(f"    c.{fld.name} = {s2c}")
    lines.append(f"{p}    }}")
    lines.append(f"{p}    public var {prop}: {enum_name}? = nil")
    init_lines.append(f"default: {prop} = nil")
    init_lines.append("}")
    to_c_lines.append("case nil: break")
    to_c_lines.append("}")
    return lines


def gen_service(s, package, names):
    lines = [f"/// Method descriptors of `{package}.{s.name}`.", f"public enum {s.name} {{",
             f'    public static let name = "{package}.{s.name}"']
    for m in s.method:
        if m.client_streaming and not m.server_streaming:
            raise SystemExit(f"swiftgen: client streaming is not supported ({s.name}.{m.name})")
        kind = ".bidiStreaming" if m.client_streaming else ".serverStreaming" if m.server_streaming else ".unary"
        req, resp = names.swift[m.input_type], names.swift[m.output_type]
        mname = m.name[:1].lower() + m.name[1:]
        lines.append(f"    public static let {mname} = MethodDescriptor<{req}, {resp}>("
                     f'service: "{package}.{s.name}", method: "{m.name}", kind: {kind})')
    lines.append("}")
    return lines


def main():
    desc_path, out_dir, header_root = sys.argv[1:4]
    fds = d.FileDescriptorSet()
    with open(desc_path, "rb") as fh:
        fds.ParseFromString(fh.read())
    names = Names()
    for f in fds.file:
        names.add_file(f)
    os.makedirs(out_dir, exist_ok=True)
    for f in fds.file:
        if f.name.startswith("google/"):
            continue
        body, exts = [], []
        for e in f.enum_type:
            body += gen_enum(e, names.swift[f".{f.package}.{e.name}"], "") + [""]
        for m in f.message_type:
            body += gen_message(m, f".{f.package}.{m.name}", names, "", exts) + [""]
        for s in f.service:
            body += gen_service(s, f.package, names) + [""]
        header = os.path.join(header_root, f.name.replace(".proto", ".pb-c.h"))
        with open(header) as fh:
            htext = fh.read()
        for fn in re.findall(r"(\w+)__init\(&c\)", "\n".join("\n".join(x) for x in exts)):
            if f"{fn}__init" not in htext:
                raise SystemExit(f"swiftgen: {fn}__init is not in {header}: C naming rule mismatch")
        text = ["// Generated by proto/swiftgen.py from " + f.name + ". Do not edit: run proto/generate.",
                "", "import CTalkMeshProto", ""] + body
        for x in exts:
            text += x
        out = os.path.join(out_dir, f.name.replace("/", "_").replace(".proto", ".pb.swift"))
        with open(out, "w") as fh:
            fh.write("\n".join(text).rstrip() + "\n")
    with open(os.path.join(out_dir, "descriptors.pb.swift"), "w") as fh:
        fh.write(gen_descriptor_index(fds))


def symbols(f):
    """The fully qualified names a file defines: messages and enums (nested too), services and
    their methods."""
    prefix = f.package + "." if f.package else ""
    found = []

    def walk(scope, messages, enums):
        for e in enums:
            found.append(scope + e.name)
        for m in messages:
            found.append(scope + m.name)
            walk(scope + m.name + ".", m.nested_type, m.enum_type)

    walk(prefix, f.message_type, f.enum_type)
    for s in f.service:
        found.append(prefix + s.name)
        found += [f"{prefix}{s.name}.{m.name}" for m in s.method]
    return found


def gen_descriptor_index(fds):
    """Every compiled .proto file as a serialized FileDescriptorProto (base64: a long string
    literal compiles fast, a long array literal does not), with its dependencies and symbols."""
    lines = ["// Generated by proto/swiftgen.py from every .proto file. Do not edit: run proto/generate.", "",
             "/// The compiled .proto files, for gRPC server reflection.",
             "public enum ProtoFiles {",
             "    /// One .proto file.",
             "    public struct File: Sendable {",
             "        /// Its path, e.g. `talkmesh/v1/media.proto`.",
             "        public let name: String",
             "        /// The paths of the files it imports.",
             "        public let dependencies: [String]",
             "        /// What it defines, fully qualified: messages, enums, services and `Service.Method`.",
             "        public let symbols: [String]",
             "        /// Its `google.protobuf.FileDescriptorProto`, serialized, in base64.",
             "        public let descriptorBase64: String",
             "",
             "        public init(name: String, dependencies: [String], symbols: [String], descriptorBase64: String) {",
             "            self.name = name",
             "            self.dependencies = dependencies",
             "            self.symbols = symbols",
             "            self.descriptorBase64 = descriptorBase64",
             "        }",
             "    }", "",
             "    public static let all: [File] = ["]
    files = list(fds.file)
    files += [twin(f, *TWINS[f.name]) for f in fds.file if f.name in TWINS]
    for f in files:
        clean = d.FileDescriptorProto()
        clean.CopyFrom(f)
        clean.ClearField("source_code_info")
        encoded = base64.b64encode(clean.SerializeToString(deterministic=True)).decode()
        deps = ", ".join(f'"{x}"' for x in f.dependency)
        syms = ", ".join(f'"{x}"' for x in symbols(f))
        lines.append(f'        File(name: "{f.name}", dependencies: [{deps}],')
        lines.append(f'             symbols: [{syms}],')
        lines.append(f'             descriptorBase64: "{encoded}"),')
    lines += ["    ]", "}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
