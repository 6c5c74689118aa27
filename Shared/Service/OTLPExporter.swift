import Glibc
import Synchronization
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
    private struct State {
        var queue: [TalkMeshSpan] = []
        var wake: CheckedContinuation<Void, Never>?
        /// The schedule rang while an export ran: export again without waiting.
        var due = false
        var exported = 0
        var droppedFull = 0
        var droppedFailed = 0
        var exports = (ok: 0, failed: 0)
    }
    /// Taken by every span that ends: an inline futex lock, not a call into a lock object.
    private let state = Mutex(State())
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
        // Captured strongly: the exporter lives as long as the process. A weak reference would
        // give it a side table, and every span's retain of its sink would take the slow path.
        loop = Task.detached { await self.run() }
    }

    public func enqueue(_ span: TalkMeshSpan) {
        let maxQueue = configuration.maxQueue, maxBatch = configuration.maxBatch
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            guard state.queue.count < maxQueue else {
                state.droppedFull += 1
                return nil
            }
            state.queue.append(span)
            guard state.queue.count >= maxBatch, let waiter = state.wake else { return nil }
            state.wake = nil
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

    private func take() -> [TalkMeshSpan] {
        let maxBatch = configuration.maxBatch
        return state.withLock { state in
            if state.queue.count <= maxBatch {
                // The whole queue (the usual case): handed over, not copied.
                defer { state.queue = [] }
                return state.queue
            }
            let batch = Array(state.queue.prefix(maxBatch))
            state.queue.removeFirst(batch.count)
            return batch
        }
    }

    /// Exports whenever a batch is full, and every `scheduleDelayMs` what is queued. One ticker
    /// for the exporter's life rings the schedule (not a timer per batch: at a few hundred batches
    /// a second, arming and cancelling timers cost more thread wake-ups than the exports).
    private func run() async {
        let delay = UInt64(configuration.scheduleDelayMs) * 1_000_000
        let ticker = Task.detached {
            while !Task.isCancelled {
                try? await Task.sleep(nanoseconds: delay)
                self.ring()
            }
        }
        defer { ticker.cancel() }
        let maxBatch = configuration.maxBatch
        while !Task.isCancelled {
            await withCheckedContinuation { continuation in
                let ready: Bool = state.withLock { state in
                    if state.queue.count >= maxBatch || state.due { return true }
                    state.wake = continuation
                    return false
                }
                if ready { continuation.resume() }
            }
            state.withLock { $0.due = false }
            while true {
                let batch = take()
                if batch.isEmpty { break }
                await export(batch)
                if state.withLock({ $0.queue.count < maxBatch }) { break }
            }
        }
    }

    /// The schedule's tick: wakes the exporter, or marks the export due if it is busy.
    private func ring() {
        let waiter: CheckedContinuation<Void, Never>? = state.withLock { state in
            defer { state.wake = nil }
            if state.wake == nil { state.due = true }
            return state.wake
        }
        waiter?.resume()
    }

    private func export(_ batch: [TalkMeshSpan]) async {
        let body = OTLPEncoding.request(batch, resource: resourceBytes)
        do {
            let exchange = try await engine.perform(method: "POST", url: configuration.url,
                                                    headers: ["Content-Type: application/x-protobuf"] + configuration.headers, body: body,
                                                    timeoutMilliseconds: configuration.timeoutMs, bodyLimit: 1 << 20)
            guard (200...299).contains(exchange.status) else {
                failed(batch.count, "the collector answered HTTP \(exchange.status)")
                return
            }
            state.withLock { state in
                state.exported += batch.count
                state.exports.ok += 1
            }
        } catch {
            failed(batch.count, "\(error)")
        }
    }

    private func failed(_ count: Int, _ reason: String) {
        let first: Bool = state.withLock { state in
            state.droppedFailed += count
            state.exports.failed += 1
            return state.exports.failed == 1 || state.exports.failed % 100 == 0
        }
        if first { logger.warning("could not export spans; they are dropped", metadata: ["spans": "\(count)", "error": "\(reason)"]) }
    }

    /// Prometheus text: spans exported, spans dropped by reason, spans queued.
    public func metrics() -> String {
        let (done, full, failed, queued) = state.withLock { ($0.exported, $0.droppedFull, $0.droppedFailed, $0.queue.count) }
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
/// lines instead of a generated copy of the whole schema. Each span writes itself in place
/// (`TalkMeshSpan.writeOTLP`), its attributes already encoded.
enum OTLPEncoding {
    /// `ExportTraceServiceRequest { resource_spans = 1: ResourceSpans { resource = 1, scope_spans = 2:
    /// ScopeSpans { scope = 1, spans = 2 } } }`: the spans are written once, then the envelope
    /// (whose lengths they settle) before them.
    static func request(_ spans: [TalkMeshSpan], resource: [UInt8]) -> [UInt8] {
        var scope = ProtoWriter()
        scope.string(1, "talkmesh")
        scope.string(2, "1")
        let sizes = spans.map { $0.otlpSize() }
        let scopeSpans = ProtoCursor.fieldSize(scope.bytes.count) + sizes.reduce(0) { $0 + ProtoCursor.fieldSize($1.size) }
        let resourceSpans = ProtoCursor.fieldSize(resource.count) + ProtoCursor.fieldSize(scopeSpans)
        let total = ProtoCursor.fieldSize(resourceSpans)
        return [UInt8](unsafeUninitializedCapacity: total) { buffer, count in
            var cursor = ProtoCursor(buffer.baseAddress!)
            cursor.tag(1, 2)
            cursor.rawVarint(UInt64(resourceSpans))
            cursor.bytes(1, resource)
            cursor.tag(2, 2)
            cursor.rawVarint(UInt64(scopeSpans))
            cursor.bytes(1, scope.bytes)
            for (span, (size, tail)) in zip(spans, sizes) {
                cursor.tag(2, 2)
                cursor.rawVarint(UInt64(size))
                span.writeOTLP(into: &cursor, tail: tail)
            }
            count = cursor.end - buffer.baseAddress!
            precondition(count == total, "an OTLP export's size was miscounted")
        }
    }
}
