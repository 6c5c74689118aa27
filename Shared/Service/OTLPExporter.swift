import Glibc
import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshRPC
import Tracing

/// The OTLP/HTTP trace exporter (protobuf, `POST <endpoint>/v1/traces`) on the libcurl engine the
/// services already have. Spans are queued on a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`): a full
/// queue drops the span and counts it, it never blocks a request. One task sends a batch every
/// `OTEL_BSP_SCHEDULE_DELAY` or as soon as `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` spans wait; a batch the
/// collector refuses or cannot take is dropped and counted (its spans are not retried: a collector
/// that is down must not make the process hold spans without bound). `flush()` (SIGTERM) sends what is queued.
public final class OTLPExporter: SpanSink, @unchecked Sendable {
    public struct Configuration: Sendable {
        public var url: String
        public var headers: [String] = []
        public var serviceName: String
        public var resource: [(String, String)] = []
        public var maxQueue = 2048
        public var maxBatch = 512
        public var scheduleDelayMs = 5000
        public var timeoutMs = 10_000
    }

    let configuration: Configuration
    private let engine: CurlEngine
    private let lock = PThreadMutex()
    private var queue: [FinishedSpan] = []
    private var wake: CheckedContinuation<Void, Never>?
    private var exported = 0
    private var droppedFull = 0
    private var droppedFailed = 0
    private var exports = (ok: 0, failed: 0)
    private var loop: Task<Void, Never>?
    private let logger: Logger
    /// The encoded resource (service name, attributes), the same in every request.
    private let resourceBytes: [UInt8]

    public init(configuration: Configuration, engine: CurlEngine = CurlEngine(), logger: Logger) {
        self.configuration = configuration
        self.engine = engine
        self.logger = logger
        var resource = ProtoWriter()
        for (key, value) in [("service.name", configuration.serviceName), ("telemetry.sdk.name", "talkmesh"),
                             ("telemetry.sdk.language", "swift")] + configuration.resource {
            resource.keyValue(1, key, .string(value))  // Resource.attributes = 1
        }
        resourceBytes = resource.bytes
        loop = Task.detached { [weak self] in await self?.run() }
    }

    public func enqueue(_ span: FinishedSpan) {
        let waiter: CheckedContinuation<Void, Never>? = lock.withLock {
            guard queue.count < configuration.maxQueue else {
                droppedFull += 1
                return nil
            }
            queue.append(span)
            guard queue.count >= configuration.maxBatch, let waiter = wake else { return nil }
            wake = nil
            return waiter
        }
        waiter?.resume()
    }

    public func flush() async {
        for _ in 0..<64 {
            let batch = take()
            if batch.isEmpty { return }
            await export(batch)
        }
    }

    private func take() -> [FinishedSpan] {
        lock.withLock {
            let batch = Array(queue.prefix(configuration.maxBatch))
            queue.removeFirst(batch.count)
            return batch
        }
    }

    private func run() async {
        while !Task.isCancelled {
            let delay = UInt64(configuration.scheduleDelayMs) * 1_000_000
            let timer = Task { [weak self] in
                try? await Task.sleep(nanoseconds: delay)
                self?.ring()
            }
            await withCheckedContinuation { continuation in
                let ready: Bool = lock.withLock {
                    if queue.count >= configuration.maxBatch { return true }
                    wake = continuation
                    return false
                }
                if ready { continuation.resume() }
            }
            timer.cancel()
            while true {
                let batch = take()
                if batch.isEmpty { break }
                await export(batch)
                if lock.withLock({ queue.count < configuration.maxBatch }) { break }
            }
        }
    }

    private func ring() {
        let waiter: CheckedContinuation<Void, Never>? = lock.withLock {
            defer { wake = nil }
            return wake
        }
        waiter?.resume()
    }

    private func export(_ batch: [FinishedSpan]) async {
        let body = OTLPEncoding.request(batch, resource: resourceBytes)
        do {
            let exchange = try await engine.perform(method: "POST", url: configuration.url,
                                                    headers: ["Content-Type: application/x-protobuf"] + configuration.headers, body: body,
                                                    timeoutMilliseconds: configuration.timeoutMs, bodyLimit: 1 << 20)
            guard (200...299).contains(exchange.status) else {
                failed(batch.count, "the collector answered HTTP \(exchange.status)")
                return
            }
            lock.withLock {
                exported += batch.count
                exports.ok += 1
            }
        } catch {
            failed(batch.count, "\(error)")
        }
    }

    private func failed(_ count: Int, _ reason: String) {
        let first: Bool = lock.withLock {
            droppedFailed += count
            exports.failed += 1
            return exports.failed == 1 || exports.failed % 100 == 0
        }
        if first { logger.warning("could not export spans; they are dropped", metadata: ["spans": "\(count)", "error": "\(reason)"]) }
    }

    /// Prometheus text: spans exported, spans dropped by reason, spans queued.
    public func metrics() -> String {
        let (done, full, failed, queued) = lock.withLock { (exported, droppedFull, droppedFailed, queue.count) }
        return Self.metrics(exported: done, droppedFull: full, droppedFailed: failed, queued: queued)
    }

    /// The same families at zero, for a service that exports no spans (no endpoint set).
    public static func metrics(exported done: Int = 0, droppedFull full: Int = 0, droppedFailed failed: Int = 0, queued: Int = 0) -> String {
        """
        # HELP talkmesh_otel_spans_exported_total Spans sent to the OTLP endpoint.
        # TYPE talkmesh_otel_spans_exported_total counter
        talkmesh_otel_spans_exported_total \(done)
        # HELP talkmesh_otel_spans_dropped_total Spans dropped: the queue was full, or the endpoint refused or could not take their batch.
        # TYPE talkmesh_otel_spans_dropped_total counter
        talkmesh_otel_spans_dropped_total{reason="queue_full"} \(full)
        talkmesh_otel_spans_dropped_total{reason="export_failed"} \(failed)
        # HELP talkmesh_otel_spans_queued Spans waiting to be exported.
        # TYPE talkmesh_otel_spans_queued gauge
        talkmesh_otel_spans_queued \(queued)

        """
    }
}

/// OTLP's protobuf messages, written by hand (opentelemetry-proto's field numbers): a few dozen
/// lines instead of a generated copy of the whole schema. Spans arrive with their attributes
/// already encoded; each span is written into one reused scratch buffer, then framed.
enum OTLPEncoding {
    /// `ExportTraceServiceRequest { resource_spans = 1: ResourceSpans { resource = 1, scope_spans = 2:
    /// ScopeSpans { scope = 1, spans = 2 } } }`.
    static func request(_ spans: [FinishedSpan], resource: [UInt8]) -> [UInt8] {
        var scope = ProtoWriter(capacity: spans.count * 200 + 64)
        scope.message(1) { scope in
            scope.string(1, "talkmesh")
            scope.string(2, "1")
        }
        var scratch = ProtoWriter(capacity: 512)
        var nested = ProtoWriter(capacity: 64)
        for span in spans {
            scratch.bytes.removeAll(keepingCapacity: true)
            encode(span, into: &scratch, nested: &nested)
            scope.bytes(2, scratch.bytes)
        }
        var resourceSpans = ProtoWriter(capacity: scope.bytes.count + resource.count + 16)
        resourceSpans.bytes(1, resource)
        resourceSpans.bytes(2, scope.bytes)
        var root = ProtoWriter(capacity: resourceSpans.bytes.count + 8)
        root.bytes(1, resourceSpans.bytes)
        return root.bytes
    }

    /// `Span`: trace_id 1, span_id 2, trace_state 3, parent_span_id 4, name 5, kind 6, start 7 and
    /// end 8 (fixed64), attributes 9, events 11, links 13, status 15.
    static func encode(_ span: FinishedSpan, into writer: inout ProtoWriter, nested: inout ProtoWriter) {
        writer.id(1, span.trace.traceIDHigh, span.trace.traceIDLow)
        writer.id(2, span.trace.spanIDValue)
        if let state = span.trace.traceState { writer.string(3, state) }
        if span.trace.parentSpanIDValue != 0 { writer.id(4, span.trace.parentSpanIDValue) }
        writer.string(5, span.name)
        writer.varint(6, kind(span.kind))
        writer.fixed64(7, span.startNanoseconds)
        writer.fixed64(8, span.endNanoseconds)
        writer.bytes.append(contentsOf: span.encodedAttributes)
        for event in span.events {
            writer.message(11, scratch: &nested) { message in
                message.fixed64(1, event.nanosecondsSinceEpoch)
                message.string(2, event.name)
                event.attributes.forEach { key, value in message.keyValue(3, key, value) }
            }
        }
        for link in span.links {
            writer.message(13, scratch: &nested) { message in
                message.id(1, link.trace.traceIDHigh, link.trace.traceIDLow)
                message.id(2, link.trace.spanIDValue)
                link.attributes.forEach { key, value in message.keyValue(4, key, value) }
            }
        }
        if let status = span.status {
            writer.message(15, scratch: &nested) { message in
                if let text = status.message { message.string(2, text) }
                message.varint(3, status.code == .ok ? 1 : 2)
            }
        }
    }

    /// SPAN_KIND_INTERNAL 1, SERVER 2, CLIENT 3, PRODUCER 4, CONSUMER 5.
    static func kind(_ kind: SpanKind) -> UInt64 {
        switch kind {
        case .internal: return 1
        case .server: return 2
        case .client: return 3
        case .producer: return 4
        case .consumer: return 5
        }
    }
}
