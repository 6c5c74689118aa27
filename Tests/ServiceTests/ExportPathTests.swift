import Glibc
import Logging
import Testing
import Tracing
@testable import TalkMeshCore
@testable import TalkMeshRPC
@testable import TalkMeshService

/// Bytes a test owns, sent by the engine from where they lie.
final class OwnedBytes: RequestBytes, @unchecked Sendable {
    private let storage: UnsafeMutableRawBufferPointer
    let count: Int

    init(_ count: Int, seed: UInt8) {
        storage = .allocate(byteCount: max(count, 1), alignment: 1)
        self.count = count
        for index in 0..<count { storage[index] = seed &+ UInt8(truncatingIfNeeded: index &* 31) }
    }

    var requestBytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: storage[..<count]) }

    deinit { storage.deallocate() }
}

@Suite("The span export path: the exporter's batches and the curl engine under it")
struct ExportPathTests {
    @Test("the engine reuses its handles, sends borrowed bodies as they lie, and no option outlives its transfer")
    func curlHandles() async throws {
        let server = LoopbackHTTPServer()
        defer { server.stop() }
        let engine = CurlEngine()
        let url = "http://127.0.0.1:\(server.port)/echo"
        // Past 64 KB a body goes through curl's upload buffer, which a reused handle keeps.
        for (index, size) in [0, 1, 1000, 70_000, 250_000, 5, 250_000].enumerated() {
            let body = OwnedBytes(size, seed: UInt8(index))
            let exchange = try await engine.perform(method: "POST", url: url, borrowing: body)
            #expect(exchange.status == 200 && exchange.body == Array("\(size)".utf8))
            #expect(server.requests.withLock { $0.last?.body } == Array(body.requestBytes))
        }
        #expect(engine.idleHandleCount == 1, "one handle served every request in turn")
        // A guard set on one transfer is gone from its handle after it, and set again when asked.
        for _ in 0..<2 {
            do {
                _ = try await engine.perform(method: "POST", url: url, body: [1], publicOnly: true)
                Issue.record("a public-only request reached a loopback server")
            } catch let error as CurlError {
                #expect(error.refusedAddress, "\(error)")
            }
            let after = try await engine.perform(method: "POST", url: url, body: [1, 2, 3])
            #expect(after.status == 200 && after.body == Array("3".utf8))
        }
    }

    @Test("the environment's proxies, read once, are used as libcurl would use them")
    func proxies() async throws {
        let server = LoopbackHTTPServer()
        defer { server.stop() }
        let proxy = "http://127.0.0.1:\(server.port)"
        // The scheme's variable, else all_proxy; HTTP_PROXY is not read; an empty one means none.
        #expect(ProxyEnvironment(["http_proxy": "a", "all_proxy": "b"]).http == "a")
        #expect(ProxyEnvironment(["ALL_PROXY": "b", "HTTP_PROXY": "c"]).http == "b")
        #expect(ProxyEnvironment(["HTTPS_PROXY": "d", "all_proxy": "b"]).https == "d")
        #expect(ProxyEnvironment(["https_proxy": "", "all_proxy": "b"]).https == "")
        #expect(ProxyEnvironment(["NO_PROXY": "x"]).noProxy == "x" && ProxyEnvironment([:]).http == "")
        // Through the proxy: the request line names the whole URL.
        let proxied = CurlEngine(proxies: ProxyEnvironment(["http_proxy": proxy]))
        let exchange = try await proxied.perform(method: "POST", url: "http://runpod.test/v2/x/run", body: [1, 2])
        #expect(exchange.status == 200)
        #expect(server.requests.withLock { $0.last?.head.hasPrefix("POST http://runpod.test/v2/x/run HTTP/1.1") } == true)
        // A host no_proxy lists is reached directly (the proxy given here would refuse).
        let direct = CurlEngine(proxies: ProxyEnvironment(["all_proxy": "http://127.0.0.1:1", "no_proxy": "127.0.0.1"]))
        let answer = try await direct.perform(method: "POST", url: "http://127.0.0.1:\(server.port)/d", body: [1, 2, 3])
        #expect(answer.status == 200 && server.requests.withLock { $0.last?.head.hasPrefix("POST /d HTTP/1.1") } == true)
    }

    @Test("a CurlHandle sends one request after another on one connection, bodies as they lie, and survives a failure")
    func blockingHandle() throws {
        let server = LoopbackHTTPServer()
        defer { server.stop() }
        let handle = CurlHandle()
        let url = "http://127.0.0.1:\(server.port)/v1/traces"
        for (index, size) in [1, 70_000, 250_000, 0, 66_000].enumerated() {
            let body = OwnedBytes(size, seed: UInt8(index))
            // The handle is not reset between requests: a header of one must not reach the next.
            let headers = ["Content-Type: application/x-protobuf"] + (index == 0 ? ["X-First: 1"] : [])
            let exchange = try handle.perform(method: "POST", url: url, headers: headers, borrowing: body)
            #expect(exchange.status == 200 && exchange.body == Array("\(size)".utf8))
            let last = try #require(server.requests.withLock { $0.last })
            #expect(last.body == Array(body.requestBytes) && last.head.contains("Content-Type: application/x-protobuf"))
            #expect(last.head.contains("X-First: 1") == (index == 0), "\(last.head)")
        }
        #expect(server.connections.load(ordering: .relaxed) == 1, "the handle kept its connection")
        // Nothing listens on port 9: a transport error, and the handle still works after it.
        #expect(throws: CurlError.self) { try handle.perform(method: "POST", url: "http://127.0.0.1:9/", borrowing: OwnedBytes(10, seed: 1), timeoutMilliseconds: 2000) }
        let after = try handle.perform(method: "POST", url: url, borrowing: OwnedBytes(3, seed: 2))
        #expect(after.status == 200 && after.body == Array("3".utf8))
    }

    @Test("with the collector down, spans are dropped and counted, and a flush still returns")
    func collectorDown() async throws {
        let (exporter, tracer) = Self.exporter(to: 9, maxBatch: 4, maxQueue: 100, scheduleDelayMs: 600_000)
        for _ in 0..<10 { tracer.span("lost", parent: nil, kind: .internal).end() }
        await exporter.flush()  // the two full batches, then the last two spans
        var metrics = ""
        for _ in 0..<500 {
            metrics = exporter.metrics()
            if metrics.contains("talkmesh_otel_spans_dropped_total{reason=\"export_failed\"} 10") { break }
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        #expect(metrics.contains("talkmesh_otel_spans_dropped_total{reason=\"export_failed\"} 10") && metrics.contains("talkmesh_otel_spans_queued 0"), "\(metrics)")
    }

    @Test("the exporter sends batches of at most OTEL_BSP_MAX_EXPORT_BATCH_SIZE spans, each encoded where it ended")
    func batches() async throws {
        let server = LoopbackHTTPServer()
        defer { server.stop() }
        // Only full batches and the flush send: the schedule is ten minutes.
        let (exporter, tracer) = Self.exporter(to: server.port, maxBatch: 3, maxQueue: 100, scheduleDelayMs: 600_000)
        for index in 0..<8 { tracer.span("span \(index)", parent: nil, kind: .internal).end() }
        // A server span without a span object: a 503, so an error status.
        let served = tracer.serverSpan(parent: TraceContext.root())
        tracer.endServer(served, name: KeptBytes(utf8: "GET /x"), attributes: KeptBytes(RPCSpans.encoded(["http.route": .string("/x")])),
                         KeptBytes(RPCSpans.encoded(["http.response.status_code": .int64(503)])), failure: "")
        // A failed gRPC call's: the code's name is the status message.
        tracer.endServer(tracer.serverSpan(parent: nil), name: KeptBytes(utf8: "a.B/C"), attributes: KeptBytes(RPCSpans.attributes(rpc: "/a.B/C")),
                         KeptBytes(RPCSpans.peerAttribute("127.0.0.1:1")), KeptBytes(RPCSpans.encoded(["rpc.grpc.status_code": .int64(5)])),
                         failure: "notFound")
        // Three full batches went out as they filled; the flush sends the last span.
        await exporter.flush()
        var spans: [WireFields] = []
        for _ in 0..<500 {
            let bodies = server.requests.withLock { $0.map(\.body) }
            let batches = try bodies.map { body -> [WireFields] in
                let resourceSpans = try WireFields(body).one(1)
                #expect(try resourceSpans.one(1).bytes[1]?.isEmpty == false, "the resource (service.name) in every export")
                return try (resourceSpans.one(2).bytes[2] ?? []).map { try WireFields($0) }
            }
            spans = batches.flatMap { $0 }
            if spans.count >= 10 {
                #expect(batches.allSatisfy { $0.count <= 3 }, "\(batches.map(\.count))")
                break
            }
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        #expect(spans.count == 10)
        let names = spans.compactMap { $0.bytes[5]?.first }.map { String(decoding: $0, as: UTF8.self) }
        #expect(Set(names) == Set((0..<8).map { "span \($0)" } + ["GET /x", "a.B/C"]))
        let server503 = try #require(spans.first { $0.bytes[5]?.first == Array("GET /x".utf8) })
        #expect(server503.varints[6] == [2], "SPAN_KIND_SERVER")
        #expect(server503.bytes[9]?.count == 2 && server503.bytes[4]?.first?.count == 8, "its attributes, and its parent")
        let status = try server503.one(15)
        #expect(status.varints[3] == [2] && status.bytes[2] == nil, "STATUS_CODE_ERROR, no message")
        let failedCall = try #require(spans.first { $0.bytes[5]?.first == Array("a.B/C".utf8) })
        #expect(failedCall.bytes[9]?.count == 5 && failedCall.bytes[4] == nil, "rpc.system, service, method, the peer, the code; a root")
        #expect(try failedCall.one(15).bytes[2]?.first == Array("notFound".utf8))
        // Counted when the collector's answer is back, which may be just after the test saw the request.
        var counted = false
        for _ in 0..<500 where !counted {
            counted = exporter.metrics().contains("talkmesh_otel_spans_exported_total 10")
            if !counted { try await Task.sleep(nanoseconds: 10_000_000) }
        }
        #expect(counted, "\(exporter.metrics())")
    }

    @Test("a request no route matched, or with a status outside the table, keeps no bytes")
    func nothingKeptPerRequest() {
        // A client chooses the method of a request no route matched: its span's name and
        // attributes are made for it and lent, never kept (KeptBytes.made counts what is kept).
        let span = (trace: TraceContext.root(), start: UInt64(1))
        RPCSpans.end(span, method: "GET", route: "other", httpStatus: 200)  // makes the status tables, once
        let before = KeptBytes.made.load(ordering: .relaxed)
        for index in 0..<1000 {
            RPCSpans.end(span, method: "M\(index)", route: "other", httpStatus: 404)
            RPCSpans.end(span, method: "GET", route: "other", httpStatus: 700 + index % 100)
        }
        // Other tests may make a router meanwhile (a few dozen kept routes); 2000 spans that each
        // kept their bytes would add thousands.
        #expect(KeptBytes.made.load(ordering: .relaxed) - before < 200)
    }

    @Test("the schedule sends a batch that is not full")
    func schedule() async throws {
        let server = LoopbackHTTPServer()
        defer { server.stop() }
        let (_, tracer) = Self.exporter(to: server.port, scheduleDelayMs: 50)
        for _ in 0..<2 { tracer.span("on schedule", parent: nil, kind: .internal).end() }
        var sent = 0
        for _ in 0..<300 where sent < 2 {
            sent = try server.requests.withLock { $0 }.reduce(0) { $0 + (try WireFields($1.body).one(1).one(2).bytes[2]?.count ?? 0) }
            if sent < 2 { try await Task.sleep(nanoseconds: 10_000_000) }
        }
        #expect(sent == 2)
    }

    @Test("a full queue drops spans and counts them; it never blocks")
    func fullQueue() async throws {
        let (exporter, tracer) = Self.exporter(to: 9, maxBatch: 100, maxQueue: 2, scheduleDelayMs: 600_000)
        for _ in 0..<5 { tracer.span("dropped or queued", parent: nil, kind: .internal).end() }
        let metrics = exporter.metrics()
        #expect(metrics.contains("talkmesh_otel_spans_dropped_total{reason=\"queue_full\"} 3") && metrics.contains("talkmesh_otel_spans_queued 2"))
    }

    /// An exporter to a receiver on loopback `port`, and a tracer recording into it.
    private static func exporter(to port: UInt16, maxBatch: Int = 512, maxQueue: Int = 2048, scheduleDelayMs: Int) -> (OTLPExporter, TalkMeshTracer) {
        var configuration = OTLPExporter.Configuration(url: "http://127.0.0.1:\(port)/v1/traces", serviceName: "test")
        configuration.maxBatch = maxBatch
        configuration.maxQueue = maxQueue
        configuration.scheduleDelayMs = scheduleDelayMs
        let exporter = OTLPExporter(configuration: configuration, logger: Logger(label: "test"))
        return (exporter, TalkMeshTracer(sink: exporter))
    }
}
