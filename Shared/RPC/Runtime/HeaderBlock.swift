import CTalkMesh
import Glibc

/// An nghttp2 header list built from Swift strings in one allocation; nghttp2 copies it on submit.
struct HeaderBlock: ~Copyable {
    private let storage: UnsafeMutablePointer<UInt8>
    private(set) var fields: [nghttp2_nv]
    /// A `traceparent` field went out indexed (`indexTraceparent`).
    private(set) var indexedTraceparent = false

    /// `trace`: a `traceparent` field last, its value written from the span's ids into the block.
    /// `indexTraceparent`: send it with indexing (once per connection), so its name enters HPACK's
    /// dynamic table; every later one (never indexed: its value is new each time) then names it by
    /// index instead of spelling it out, for the encoder and the client.
    init(_ headers: [(name: String, value: String)], trace: TraceContext? = nil, indexTraceparent: Bool = false) {
        let total = headers.reduce(0) { $0 + $1.name.utf8.count + $1.value.utf8.count }
        let traced = trace == nil ? 0 : Self.traceparentName.utf8CodeUnitCount + TraceContext.traceparentLength
        storage = .allocate(capacity: max(total + traced, 1))
        fields = []
        fields.reserveCapacity(headers.count + 1)
        var offset = 0
        func copy(_ text: String, to offset: inout Int, storage: UnsafeMutablePointer<UInt8>) {
            var text = text
            text.withUTF8 { bytes in
                if let base = bytes.baseAddress { (storage + offset).update(from: base, count: bytes.count) }
                offset += bytes.count
            }
        }
        for (name, value) in headers {
            let namePointer = storage + offset
            copy(name, to: &offset, storage: storage)
            let valuePointer = storage + offset
            copy(value, to: &offset, storage: storage)
            fields.append(nghttp2_nv(name: namePointer, value: valuePointer, namelen: name.utf8.count,
                                     valuelen: value.utf8.count, flags: Self.indexing(name)))
        }
        if let trace {
            let name = Self.traceparentName, namePointer = storage + offset
            namePointer.update(from: name.utf8Start, count: name.utf8CodeUnitCount)
            let valuePointer = namePointer + name.utf8CodeUnitCount
            trace.writeTraceparent(valuePointer)
            indexedTraceparent = indexTraceparent
            fields.append(nghttp2_nv(name: namePointer, value: valuePointer, namelen: name.utf8CodeUnitCount, valuelen: TraceContext.traceparentLength,
                                     flags: UInt8((indexTraceparent ? NGHTTP2_NV_FLAG_NONE : NGHTTP2_NV_FLAG_NO_INDEX).rawValue)))
        }
    }

    /// A literal, not an array: read for every traced answer, and an array's buffer would be a
    /// reference count both event loops touch.
    private static let traceparentName: StaticString = "traceparent"

    /// Fields whose value is new in every response (ids, counters) are sent never-indexed: in
    /// HPACK's dynamic table they would only push out the fields that repeat, which the encoder
    /// and every client would then handle in full again.
    static func indexing(_ name: String) -> UInt8 {
        let never: Bool
        // By length first: most names are none of these, and one integer compare says so.
        switch name.utf8.count {
        case 4: never = name == "date"
        case 10: never = name == "tracestate"
        case 11: never = name == "traceparent" || name == "retry-after"
        case 12: never = name == "x-request-id"
        case 13: never = name == "last-modified"
        case 15: never = name == "ratelimit-reset"
        case 19: never = name == "ratelimit-remaining"
        default: never = false
        }
        return UInt8(never ? NGHTTP2_NV_FLAG_NO_INDEX.rawValue : NGHTTP2_NV_FLAG_NONE.rawValue)
    }

    /// One owner frees the storage, when the block goes out of scope (nghttp2 copied it by then).
    deinit { storage.deallocate() }
}

/// Header fields that never change, kept for the life of the process and submitted without copies.
enum StaticHeaders {
    nonisolated(unsafe) static let grpcResponse: [nghttp2_nv] = make([(":status", "200"), ("content-type", "application/grpc")])
    nonisolated(unsafe) static let grpcOK: [nghttp2_nv] = make([("grpc-status", "0")])

    private static func make(_ pairs: [(String, String)]) -> [nghttp2_nv] {
        pairs.map { name, value in
            let n = strdup(name)!, v = strdup(value)!
            let flags = UInt8(NGHTTP2_NV_FLAG_NO_COPY_NAME.rawValue | NGHTTP2_NV_FLAG_NO_COPY_VALUE.rawValue)
            return nghttp2_nv(name: UnsafeMutableRawPointer(n).assumingMemoryBound(to: UInt8.self),
                              value: UnsafeMutableRawPointer(v).assumingMemoryBound(to: UInt8.self),
                              namelen: strlen(n), valuelen: strlen(v), flags: flags)
        }
    }
}

/// Compares received header bytes with a literal without building a String (hot path).
@inline(__always)
func bytesEqual(_ pointer: UnsafePointer<UInt8>, _ length: Int, _ literal: StaticString) -> Bool {
    length == literal.utf8CodeUnitCount && memcmp(pointer, literal.utf8Start, length) == 0
}
