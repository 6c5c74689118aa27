import CTalkMeshProto
import Glibc

/// A Swift value type generated from a .proto message, convertible to and from its protobuf-c struct.
///
/// The generated code supplies the conversions and the four protobuf-c entry points; packing and
/// unpacking are written once, here.
public protocol ProtoMessage: Sendable, Hashable {
    /// The protobuf-c struct protoc-c generated for the same message.
    associatedtype CMessage
    /// Builds the Swift value from a protobuf-c struct (deep copy: nothing points into `c` afterwards).
    init(c: CMessage)
    /// Builds the protobuf-c struct; every pointer in it is owned by `arena`.
    func toC(_ arena: ProtoArena) -> CMessage
    /// protoc-c's `__unpack`.
    static func cUnpack(_ data: UnsafePointer<UInt8>?, _ count: Int) -> UnsafeMutablePointer<CMessage>?
    /// protoc-c's `__free_unpacked`.
    static func cFreeUnpacked(_ message: UnsafeMutablePointer<CMessage>)
    /// protoc-c's `__get_packed_size`.
    static func cPackedSize(_ message: UnsafePointer<CMessage>) -> Int
    /// protoc-c's `__pack`.
    static func cPack(_ message: UnsafePointer<CMessage>, _ out: UnsafeMutablePointer<UInt8>) -> Int
}

/// A message's bytes were not a valid encoding of that message.
public struct ProtoDecodingError: Error, CustomStringConvertible {
    /// The message type that failed to decode.
    public var messageType: String
    /// Set when the encoding is sound but a `string` field is not valid UTF-8 or holds a NUL
    /// (protobuf-c's strings end at the first NUL, so `out/x\0.png` would silently become `out/x`).
    public var invalidStringField: String?

    public init(messageType: String, invalidStringField: String? = nil) {
        self.messageType = messageType
        self.invalidStringField = invalidStringField
    }

    public var description: String {
        if let field = invalidStringField { return "\(field): a string must be valid UTF-8 without NUL characters" }
        return "invalid protobuf encoding of \(messageType)"
    }
}

/// Checks every `string` field of an encoded message (nested messages included) for NUL bytes
/// and invalid UTF-8, guided by protobuf-c's descriptor. Runs after a successful unpack, so the
/// encoding is known to be well formed; every read is bounds-checked all the same.
enum ProtoStringCheck {
    /// The dotted name of the first bad string field, or nil when all are good.
    static func firstInvalidField(_ bytes: UnsafeBufferPointer<UInt8>, _ descriptor: UnsafePointer<ProtobufCMessageDescriptor>,
                                  depth: Int = 0) -> String? {
        guard depth < 64 else { return nil }
        var index = 0
        func varint() -> UInt64? {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while index < bytes.count, shift < 64 {
                let byte = bytes[index]
                index += 1
                value |= UInt64(byte & 0x7F) << shift
                if byte & 0x80 == 0 { return value }
                shift += 7
            }
            return nil
        }
        while index < bytes.count {
            guard let key = varint() else { return nil }
            let number = UInt32(truncatingIfNeeded: key >> 3)
            switch key & 7 {
            case 0: guard varint() != nil else { return nil }
            case 1: index += 8
            case 5: index += 4
            case 2:
                guard let length = varint(), length <= UInt64(bytes.count - index) else { return nil }
                let start = index
                index += Int(length)
                guard let field = protobuf_c_message_descriptor_get_field(descriptor, number) else { continue }
                let value = UnsafeBufferPointer(rebasing: bytes[start..<index])
                // The name is built only for the answer: this runs on every request's decode.
                if field.pointee.type == PROTOBUF_C_TYPE_STRING {
                    if value.contains(0) || String(validating: value, as: UTF8.self) == nil { return String(cString: field.pointee.name) }
                } else if field.pointee.type == PROTOBUF_C_TYPE_MESSAGE, let nested = field.pointee.descriptor {
                    let nestedDescriptor = nested.assumingMemoryBound(to: ProtobufCMessageDescriptor.self)
                    if let bad = firstInvalidField(value, nestedDescriptor, depth: depth + 1) {
                        return String(cString: field.pointee.name) + "." + bad
                    }
                }
            default:
                return nil  // groups: not used by proto3
            }
        }
        return nil
    }
}

extension ProtoMessage {
    /// Decodes the protobuf wire format.
    public init(serializedBytes bytes: UnsafeRawBufferPointer) throws(ProtoDecodingError) {
        let base = bytes.baseAddress?.assumingMemoryBound(to: UInt8.self)
        // protobuf-c wants a non-null pointer even for an empty message.
        var empty: UInt8 = 0
        let unpacked: UnsafeMutablePointer<CMessage>? = base.map { Self.cUnpack($0, bytes.count) }
            ?? withUnsafePointer(to: &empty) { Self.cUnpack($0, 0) }
        guard let unpacked else { throw ProtoDecodingError(messageType: String(describing: Self.self)) }
        defer { Self.cFreeUnpacked(unpacked) }
        if let base, let descriptor = UnsafeRawPointer(unpacked).assumingMemoryBound(to: ProtobufCMessage.self).pointee.descriptor,
           let field = ProtoStringCheck.firstInvalidField(UnsafeBufferPointer(start: base, count: bytes.count), descriptor) {
            throw ProtoDecodingError(messageType: String(describing: Self.self), invalidStringField: field)
        }
        self.init(c: unpacked.pointee)
    }

    /// Decodes the protobuf wire format.
    public init(serializedBytes bytes: [UInt8]) throws(ProtoDecodingError) {
        let result: Result<Self, ProtoDecodingError> = bytes.withUnsafeBytes { raw in
            do throws(ProtoDecodingError) { return .success(try Self(serializedBytes: raw)) } catch { return .failure(error) }
        }
        self = try result.get()
    }

    /// Encodes to the protobuf wire format.
    public func serializedBytes() -> [UInt8] {
        serializedBytes(reservingPrefix: 0)
    }

    /// Encodes after `prefix` zero bytes the caller fills in (a gRPC frame header), in one buffer.
    public func serializedBytes(reservingPrefix prefix: Int) -> [UInt8] {
        let arena = ProtoArena()
        var c = toC(arena)
        let size = Self.cPackedSize(&c)
        guard size + prefix > 0 else { return [] }
        return [UInt8](unsafeUninitializedCapacity: size + prefix) { buffer, count in
            for index in 0..<prefix { buffer[index] = 0 }
            count = prefix + (size > 0 ? Self.cPack(&c, buffer.baseAddress! + prefix) : 0)
        }
    }
}

/// Owns the C memory a protobuf-c struct points at while it is packed; frees it all on deinit.
/// A bump allocator: a message's strings, structs and arrays are carved from 4 KB slabs (a job's
/// record is some seventy of them), one `malloc` per slab instead of one per piece.
public final class ProtoArena {
    private var slabs: [UnsafeMutableRawPointer] = []
    /// The free room left in the newest slab.
    private var free: UnsafeMutableRawPointer?
    private var room = 0
    private static let slabSize = 4096

    public init() {}

    deinit {
        for slab in slabs { Glibc.free(slab) }
    }

    private func allocate(byteCount: Int, alignment: Int) -> UnsafeMutableRawPointer {
        let size = max(byteCount, 1)
        if let free {
            let padding = (alignment - Int(bitPattern: free) % alignment) % alignment
            if padding + size <= room {
                let pointer = free + padding
                self.free = pointer + size
                room -= padding + size
                return pointer
            }
        }
        // A piece larger than a quarter slab (a long string, bytes) gets a block of its own.
        if size > Self.slabSize / 4 {
            let block = malloc(size)!
            slabs.append(block)
            return block
        }
        let slab = malloc(Self.slabSize)!  // aligned for any C type
        slabs.append(slab)
        free = slab + size
        room = Self.slabSize - size
        return slab
    }

    private func allocate<T>(_ type: T.Type, count: Int) -> UnsafeMutablePointer<T> {
        allocate(byteCount: count * MemoryLayout<T>.stride, alignment: MemoryLayout<T>.alignment)
            .bindMemory(to: T.self, capacity: max(1, count))
    }

    /// A NUL-terminated copy of `string`.
    public func string(_ string: String) -> UnsafeMutablePointer<CChar> {
        var string = string
        return string.withUTF8 { utf8 in
            let pointer = allocate(CChar.self, count: utf8.count + 1)
            if let source = utf8.baseAddress { UnsafeMutableRawPointer(pointer).copyMemory(from: source, byteCount: utf8.count) }
            pointer[utf8.count] = 0
            return pointer
        }
    }

    /// A `ProtobufCBinaryData` holding a copy of `bytes`.
    public func bytes(_ bytes: [UInt8]) -> ProtobufCBinaryData {
        let pointer = allocate(UInt8.self, count: bytes.count)
        bytes.withUnsafeBufferPointer { source in
            if let base = source.baseAddress { pointer.update(from: base, count: source.count) }
        }
        return ProtobufCBinaryData(len: bytes.count, data: pointer)
    }

    /// A heap copy of one C struct.
    public func object<T>(_ value: T) -> UnsafeMutablePointer<T> {
        let pointer = allocate(T.self, count: 1)
        pointer.initialize(to: value)
        return pointer
    }

    /// A C array of the values.
    public func array<T>(_ values: [T]) -> UnsafeMutablePointer<T> {
        let pointer = allocate(T.self, count: values.count)
        for (index, value) in values.enumerated() { (pointer + index).initialize(to: value) }
        return pointer
    }

    /// A C array of pointers (protobuf-c's repeated message and string fields).
    public func pointers<T>(_ values: [UnsafeMutablePointer<T>]) -> UnsafeMutablePointer<UnsafeMutablePointer<T>?> {
        let pointer = allocate(UnsafeMutablePointer<T>?.self, count: values.count)
        for (index, value) in values.enumerated() { (pointer + index).initialize(to: value) }
        return pointer
    }
}

extension ProtoArena {
    /// A C array of C strings (protobuf-c's repeated string fields).
    public func array(_ values: [UnsafeMutablePointer<CChar>]) -> UnsafeMutablePointer<UnsafeMutablePointer<CChar>?> {
        pointers(values)
    }
}

/// Reads protobuf-c field representations into Swift values.
public enum ProtoC {
    /// A protobuf-c string field (NULL reads as empty).
    public static func string(_ pointer: UnsafeMutablePointer<CChar>?) -> String {
        guard let pointer else { return "" }
        return String(cString: pointer)
    }

    /// A protobuf-c bytes field.
    public static func bytes(_ data: ProtobufCBinaryData) -> [UInt8] {
        guard data.len > 0, let base = data.data else { return [] }
        return Array(UnsafeBufferPointer(start: base, count: data.len))
    }
}
