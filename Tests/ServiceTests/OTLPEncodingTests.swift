import Synchronization
import Testing
import Tracing
@testable import TalkMeshRPC
@testable import TalkMeshService

/// Keeps the spans that end, as the exporter queues them (`ScopeSpans.spans` fields, end to end).
final class CollectingSink: SpanSink {
    let spans = Mutex<(bytes: EncodedSpans, count: Int)>((EncodedSpans(headroom: 256), 0))
    func enqueue(size: Int, _ write: (inout ProtoCursor) -> Void) {
        spans.withLock { spans in
            let field = ProtoCursor.fieldSize(size)
            spans.bytes.append(field) { start in
                var cursor = ProtoCursor(start)
                cursor.tag(2, 2)
                cursor.rawVarint(UInt64(size))
                write(&cursor)
                precondition(cursor.end == start + field)
            }
            spans.count += 1
        }
    }
    func flush() async {}
}

/// A protocol-buffer message read back field by field; every length must fit exactly.
struct WireFields {
    var varints: [Int: [UInt64]] = [:]
    var fixed64: [Int: [UInt64]] = [:]
    var bytes: [Int: [[UInt8]]] = [:]

    init(_ data: [UInt8]) throws {
        var index = 0
        func varint() throws -> UInt64 {
            var value: UInt64 = 0, shift: UInt64 = 0
            while true {
                guard index < data.count, shift < 64 else { throw WireError.truncated }
                let byte = data[index]
                index += 1
                value |= UInt64(byte & 0x7F) << shift
                if byte < 0x80 { return value }
                shift += 7
            }
        }
        while index < data.count {
            let key = try varint()
            let field = Int(key >> 3)
            switch key & 7 {
            case 0: varints[field, default: []].append(try varint())
            case 1:
                guard index + 8 <= data.count else { throw WireError.truncated }
                fixed64[field, default: []].append(data[index..<index + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) })
                index += 8
            case 2:
                let length = Int(try varint())
                guard index + length <= data.count else { throw WireError.truncated }
                bytes[field, default: []].append(Array(data[index..<index + length]))
                index += length
            default: throw WireError.wireType
            }
        }
    }

    func one(_ field: Int) throws -> WireFields { try WireFields(try #require(bytes[field]?.first)) }

    enum WireError: Error { case truncated, wireType }
}

@Suite("OTLP export encoding")
struct OTLPEncodingTests {
    @Test("an export request's lengths nest exactly, with every span's fields, events, links, status and tracestate")
    func request() throws {
        let sink = CollectingSink()
        let tracer = TalkMeshTracer(sink: sink)
        var parent = TraceContext.root()
        parent.traceState = "vendor=abc,other=1"
        // A long name and attribute: lengths past one varint byte.
        let name = String(repeating: "n", count: 200)
        let first = tracer.span(name, parent: parent, kind: .server, attributes: SharedAttributes(RPCSpans.attributes(rpc: "/a.B/C"), RPCSpans.peerAttribute("10.0.0.1:5")))
        first.set("talkmesh.long", String(repeating: "x", count: 300))
        first.set("talkmesh.count", Int64(7))
        first.addEvent(SpanEvent(name: "exception", attributes: ["exception.message": "boom"]))
        first.addLink(TraceContext.root(), attributes: ["talkmesh.link": "resume"])
        first.end(adding: [], status: SpanStatus(code: .error, message: "failed"))
        let second = tracer.span("plain", parent: nil, kind: .client)
        RPCSpans.end(second, code: nil)
        #expect(sink.spans.withLock { $0.count } == 2)

        var resource = ProtoWriter()
        resource.keyValue(1, "service.name", .string("test"))
        let body = OTLPEncoding.request(spans: sink.spans.withLock { $0.bytes }, resource: resource.bytes)
        let resourceSpans = try WireFields(body).one(1)
        #expect(resourceSpans.bytes[1]?.first == resource.bytes)
        let scopeSpans = try resourceSpans.one(2)
        #expect(try scopeSpans.one(1).bytes[1]?.first == Array("talkmesh".utf8))
        let written = try #require(scopeSpans.bytes[2]).map { try WireFields($0) }
        #expect(written.count == 2)

        let a = written[0]
        #expect(a.bytes[1]?.first?.count == 16)
        #expect(a.bytes[4]?.first?.count == 8, "a child names its parent")
        #expect(a.bytes[3]?.first == Array("vendor=abc,other=1".utf8))
        #expect(a.bytes[5]?.first == Array(name.utf8))
        #expect(a.varints[6] == [2])
        #expect(a.bytes[9]?.count == 3 + 1 + 2, "rpc.system, rpc.service, rpc.method, the peer, and the two set")
        #expect(a.bytes[11]?.count == 1 && a.bytes[13]?.count == 1)
        let status = try a.one(15)
        #expect(status.varints[3] == [2] && status.bytes[2]?.first == Array("failed".utf8))
        let times = try #require(a.fixed64[7]?.first).distance(to: try #require(a.fixed64[8]?.first))
        #expect(times >= 0)

        let b = written[1]
        #expect(b.bytes[4] == nil, "a root has no parent")
        #expect(b.bytes[9]?.count == 1, "the status code alone")
        #expect(b.bytes[15] == nil && b.varints[6] == [3])
    }

    @Test("an ended span takes no more changes, and ends once")
    func endedSpanIsFrozen() throws {
        let sink = CollectingSink()
        let span = TalkMeshTracer(sink: sink).span("once", parent: nil, kind: .internal)
        span.end()
        span.set("late", "value")
        span.setStatus(SpanStatus(code: .error))
        span.end()
        #expect(sink.spans.withLock { $0.count } == 1)
        let written = try WireFields(OTLPEncoding.request(spans: sink.spans.withLock { $0.bytes }, resource: [])).one(1).one(2)
        let fields = try WireFields(try #require(written.bytes[2]?.first))
        #expect(fields.bytes[9] == nil && fields.bytes[15] == nil)
    }
}
