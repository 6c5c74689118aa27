import Glibc
import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshRPC
import Tracing

/// The OTLP/HTTP trace exporter (protobuf, `POST <endpoint>/v1/traces`) on libcurl, which the
/// services already have. Spans are queued on a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`): a full
/// queue drops the span and counts it, it never blocks a request. One thread of its own sends a
/// batch every `OTEL_BSP_SCHEDULE_DELAY` or as soon as `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` spans wait,
/// with a blocking `curl_easy_perform` on one kept handle (`CurlHandle`): a full batch wakes it
/// once, and it sends and reads the answer itself, where an async task handing the request to the
/// curl engine's thread and back cost three more thread wake-ups per batch. A batch the
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
    /// The export thread's connection to the collector, used by that thread alone.
    private let handle = CurlHandle()
    /// Posted to wake the export thread (a batch filled, a flush asked), only while it sleeps.
    private let wake: UnsafeMutablePointer<sem_t>
    /// Spans waiting for export, already encoded: each is an OTLP `ScopeSpans.spans` field (tag,
    /// length, `Span`), one after another, so a batch is sent as it lies.
    private struct Queue {
        var bytes: EncodedSpans
        var count = 0
        /// Where each full batch ends (a byte offset): a batch never holds more than `maxBatch` spans.
        var cuts: [Int] = []
    }
    private struct State {
        var queue: Queue
        /// An exported batch's buffer, emptied, for the next queue: its memory is reused, not
        /// allocated and faulted in again for every batch.
        var spare: EncodedSpans?
        /// The export thread waits on `wake`; set by it just before, cleared by whoever posts.
        var sleeping = false
        /// Flushes waiting for what was queued before them to be sent.
        var flushes: [CheckedContinuation<Void, Never>] = []
        var exported = 0
        var droppedFull = 0
        var droppedFailed = 0
        var exports = (ok: 0, failed: 0)
    }
    /// Taken by every span that ends. A pthread mutex (`Locked`), which ThreadSanitizer sees: with
    /// `Synchronization.Mutex` (a futex it cannot see) and a semaphore as the only other link
    /// between the threads, `make sanitize` reported every access as a race.
    private let state: Locked<State>
    private let logger: Logger
    /// The encoded resource (service name, attributes), the same in every request.
    private let resourceBytes: [UInt8]
    private let requestHeaders: [String]
    /// The queue's bound in bytes as well as in spans: a span with large attributes (an error's
    /// message) takes its share, so the queue holds at most about 1 KB per span it may keep.
    private let maxQueueBytes: Int
    /// Room ahead of a batch for its envelope (`OTLPEncoding.seal`).
    private let headroom: Int

    public init(configuration: Configuration, logger: Logger) {
        self.configuration = configuration
        requestHeaders = ["Content-Type: application/x-protobuf"] + configuration.headers
        self.logger = logger
        maxQueueBytes = max(configuration.maxQueue, 1) * 1024
        var resource = ProtoWriter()
        for (key, value) in [("service.name", configuration.serviceName), ("telemetry.sdk.name", "talkmesh"),
                             ("telemetry.sdk.language", "swift")] + configuration.resource {
            resource.keyValue(1, key, .string(value))  // Resource.attributes = 1
        }
        resourceBytes = resource.bytes
        headroom = OTLPEncoding.headroom(resource: resource.bytes)
        state = Locked(State(queue: Queue(bytes: EncodedSpans(headroom: headroom))))
        wake = .allocate(capacity: 1)
        sem_init(wake, 0, 0)
        // Retained by its thread: the exporter lives as long as the process.
        var thread = pthread_t()
        pthread_create(&thread, nil, exportThread, Unmanaged.passRetained(self).toOpaque())
        pthread_detach(thread)
    }

    public func enqueue(size: Int, _ write: (inout ProtoCursor) -> Void) {
        let maxQueue = configuration.maxQueue, maxBatch = configuration.maxBatch, maxBytes = maxQueueBytes
        let field = ProtoCursor.fieldSize(size)
        let post: Bool = state.withLock { state in
            guard state.queue.count < maxQueue, state.queue.bytes.count + field <= maxBytes else {
                state.droppedFull += 1
                return false
            }
            state.queue.bytes.append(field) { start in
                var cursor = ProtoCursor(start)
                cursor.tag(2, 2)  // ScopeSpans.spans
                cursor.rawVarint(UInt64(size))
                write(&cursor)
                precondition(cursor.end == start + field, "a span's size was miscounted")
            }
            state.queue.count += 1
            if state.queue.count % maxBatch == 0 { state.queue.cuts.append(state.queue.bytes.count) }
            guard state.queue.count >= maxBatch, state.sleeping else { return false }
            state.sleeping = false
            return true
        }
        if post { sem_post(wake) }
    }

    /// Returns when what was queued before it has been sent (or dropped: the collector failed).
    public func flush() async {
        await withCheckedContinuation { continuation in
            let post: Bool = state.withLock { state in
                state.flushes.append(continuation)
                defer { state.sleeping = false }
                return state.sleeping
            }
            if post { sem_post(wake) }
        }
    }

    /// The next batch: at most `maxBatch` spans, the oldest.
    private func take() -> (bytes: EncodedSpans, count: Int) {
        let maxBatch = configuration.maxBatch
        return state.withLock { state in
            guard let cut = state.queue.cuts.first, cut < state.queue.bytes.count else {
                // The whole queue (the usual case): handed over, not copied.
                defer { state.queue = Queue(bytes: state.spare.take() ?? EncodedSpans(headroom: headroom)) }
                return (state.queue.bytes, state.queue.count)
            }
            let batch = state.queue.bytes.split(at: cut)
            state.queue.count -= maxBatch
            state.queue.cuts = state.queue.cuts.dropFirst().map { $0 - cut }
            return (batch, maxBatch)
        }
    }

    /// The export thread: sends a batch whenever one is full, everything queued every
    /// `scheduleDelayMs` and on a flush; sleeps on `wake` in between.
    fileprivate func run() -> Never {
        let delay = Int64(configuration.scheduleDelayMs) * 1_000_000, maxBatch = configuration.maxBatch
        var deadline = MonotonicClock.nanoseconds() + delay
        while true {
            let (flushes, full): ([CheckedContinuation<Void, Never>], Bool) = state.withLock { state in
                let full = state.queue.count >= maxBatch
                if !full && state.flushes.isEmpty { state.sleeping = true }
                defer { state.flushes.removeAll() }
                return (state.flushes, full)
            }
            var due = false
            if !full && flushes.isEmpty {
                sleep(until: deadline)
                state.withLock { $0.sleeping = false }
                guard MonotonicClock.nanoseconds() >= deadline else { continue }  // woken: look again
                due = true
                deadline = MonotonicClock.nanoseconds() + delay
            }
            // On the schedule or a flush: what is queued now, in batches (a bounded number: spans
            // that keep coming wait for the next turn). Otherwise the full batches.
            let all = due || !flushes.isEmpty
            var left = all ? (state.withLock { $0.queue.count } + maxBatch - 1) / maxBatch : Int.max
            while left > 0 {
                let batch = take()
                if batch.count == 0 { break }
                export(batch)
                left -= 1
                if !all, state.withLock({ $0.queue.count < maxBatch }) { break }
            }
            for flush in flushes { flush.resume() }
        }
    }

    /// Waits on `wake` until posted or `deadline` (monotonic nanoseconds; `sem_timedwait` takes
    /// the wall clock, so the time left is added to it).
    private func sleep(until deadline: Int64) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let wall = Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec) + max(0, deadline - MonotonicClock.nanoseconds())
        var until = timespec(tv_sec: Int(wall / 1_000_000_000), tv_nsec: Int(wall % 1_000_000_000))
        while sem_timedwait(wake, &until) != 0 && errno == EINTR {}
    }

    private func export(_ batch: (bytes: EncodedSpans, count: Int)) {
        OTLPEncoding.seal(batch.bytes, resource: resourceBytes)
        defer {
            batch.bytes.reset()
            state.withLock { state in if state.spare == nil { state.spare = batch.bytes } }
        }
        do {
            let exchange = try handle.perform(method: "POST", url: configuration.url, headers: requestHeaders, borrowing: batch.bytes,
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
/// lines instead of a generated copy of the whole schema. Each span was encoded where it ended
/// (`TalkMeshSpan.end`), its attributes already encoded.
enum OTLPEncoding {
    /// Room enough ahead of a batch's spans for its envelope, with `resource`.
    static func headroom(resource: [UInt8]) -> Int { 2 * 11 + ProtoCursor.fieldSize(resource.count) + ProtoCursor.fieldSize(scope.count) }

    /// `ExportTraceServiceRequest { resource_spans = 1: ResourceSpans { resource = 1, scope_spans = 2:
    /// ScopeSpans { scope = 1, spans = 2 } } }` around `spans`, encoded `ScopeSpans.spans` fields,
    /// written in their headroom: `spans.requestBytes` is then the whole request.
    static func seal(_ spans: EncodedSpans, resource: [UInt8]) {
        let scopeSpans = ProtoCursor.fieldSize(scope.count) + spans.count
        let resourceSpans = ProtoCursor.fieldSize(resource.count) + ProtoCursor.fieldSize(scopeSpans)
        let envelope = ProtoCursor.fieldSize(resourceSpans) - resourceSpans + ProtoCursor.fieldSize(resource.count)
            + ProtoCursor.fieldSize(scopeSpans) - scopeSpans + ProtoCursor.fieldSize(scope.count)
        spans.seal(envelope) { start in
            var cursor = ProtoCursor(start)
            cursor.tag(1, 2)
            cursor.rawVarint(UInt64(resourceSpans))
            cursor.bytes(1, resource)
            cursor.tag(2, 2)
            cursor.rawVarint(UInt64(scopeSpans))
            cursor.bytes(1, scope)
            precondition(cursor.end == start + envelope, "an OTLP export's envelope was miscounted")
        }
    }

    /// The whole request for `spans` (sealed in place), as an array.
    static func request(spans: EncodedSpans, resource: [UInt8]) -> [UInt8] {
        seal(spans, resource: resource)
        return Array(spans.requestBytes)
    }

    /// `InstrumentationScope { name = 1, version = 2 }`.
    static let scope: [UInt8] = {
        var scope = ProtoWriter()
        scope.string(1, "talkmesh")
        scope.string(2, "1")
        return scope.bytes
    }()
}

/// Encoded spans end to end, in one growing buffer written in place (no zero fill, no copy),
/// with room ahead of them for the export's envelope (`seal`), so a batch is sent from here as
/// it lies (`RequestBytes`). Used under the exporter's lock, then by one export; not shared while
/// it changes.
final class EncodedSpans: RequestBytes, @unchecked Sendable {
    private var base: UnsafeMutablePointer<UInt8>?
    /// Bytes reserved ahead of the spans for the envelope.
    private let headroom: Int
    /// Where the sealed request starts (within the headroom).
    private var start: Int
    private(set) var count = 0
    private var capacity = 0

    init(headroom: Int = 0) {
        self.headroom = headroom
        start = headroom
    }

    /// The spans so far.
    var buffer: UnsafeBufferPointer<UInt8> { UnsafeBufferPointer(start: base.map { $0 + headroom }, count: count) }

    /// The sealed request: the envelope, then the spans.
    var requestBytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base.map { $0 + start }, count: headroom - start + count) }

    /// Appends `size` bytes that `write` puts at the pointer it gets.
    func append(_ size: Int, _ write: (UnsafeMutablePointer<UInt8>) -> Void) {
        if headroom + count + size > capacity {
            let grown = max(headroom + count + size, 2 * capacity, 64 * 1024)
            guard let moved = realloc(base, grown) else { fatalError("out of memory for \(grown) bytes of spans") }
            base = moved.assumingMemoryBound(to: UInt8.self)
            capacity = grown
        }
        write(base! + headroom + count)
        count += size
    }

    /// Writes `size` bytes of envelope right before the spans (at most `headroom`).
    func seal(_ size: Int, _ write: (UnsafeMutablePointer<UInt8>) -> Void) {
        precondition(size <= headroom, "an export envelope larger than its room")
        if base == nil { append(0) { _ in } }
        start = headroom - size
        write(base! + start)
    }

    /// Empties it for reuse, keeping its memory.
    func reset() {
        count = 0
        start = headroom
    }

    /// Splits off the first `offset` bytes of spans (returned); this keeps the rest.
    func split(at offset: Int) -> EncodedSpans {
        let head = EncodedSpans(headroom: headroom)
        head.append(offset) { $0.update(from: base! + headroom, count: offset) }
        if let base { memmove(base + headroom, base + headroom + offset, count - offset) }
        count -= offset
        return head
    }

    deinit { free(base) }
}

private func exportThread(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let exporter = Unmanaged<OTLPExporter>.fromOpaque(context!).takeRetainedValue()
    ThreadName.set("otlp-export")
    // SCHED_BATCH: waking to send a batch does not preempt a thread serving requests; the
    // exporter still gets its fair share of the CPU (it needs a few percent), so the queue drains.
    var parameters = sched_param()
    _ = sched_setscheduler(0, 3 /* SCHED_BATCH, which Glibc's module does not export */, &parameters)
    exporter.run()
}
