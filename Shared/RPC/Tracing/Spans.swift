import Synchronization
import Instrumentation
import TalkMeshBase
import Tracing

/// The W3C trace context travels in swift-distributed-tracing's task-local `InstrumentationContext`,
/// so TalkMesh's own code and any library instrumented with the Tracing API see the same span.
private enum TraceContextKey: InstrumentationContextKey {
    typealias Value = TraceContext
    static var nameOverride: String? { "traceparent" }
}

extension InstrumentationContext {
    /// The span this context belongs to.
    public var traceContext: TraceContext? {
        get { self[TraceContextKey.self] }
        set { self[TraceContextKey.self] = newValue }
    }
}

extension TraceContext {
    /// The trace context of the running task: the innermost span started around it.
    public static var current: TraceContext? { InstrumentationContext.current?.traceContext ?? untraced }

    /// TalkMesh's own spans are made current in one plain task-local, which costs a request far
    /// less than an `InstrumentationContext` (a dictionary and a boxed value each time). Code on
    /// the Tracing API still interoperates both ways: its `withSpan` reaches `TalkMeshTracer`,
    /// whose spans take this as their parent when its context carries none, and `current` reads
    /// its context first.
    @TaskLocal static var untraced: TraceContext?

    /// Runs `body` with `trace` as the current trace context.
    public static func withCurrent<T>(_ trace: TraceContext?, isolation: isolated (any Actor)? = #isolation,
                                      _ body: () async throws -> T) async rethrows -> T {
        try await $untraced.withValue(trace, operation: body, isolation: isolation)
    }
}

/// Where ended spans go (the OTLP exporter). `enqueue` never blocks: a full sink drops and counts.
/// A sink must outlive every span recorded into it: spans do not retain it.
public protocol SpanSink: AnyObject, Sendable {
    /// Takes an ended span as its OTLP `Span` message, `size` bytes that `write` puts at the
    /// cursor it is given (at once, at most once; not when the sink drops the span). The span is
    /// encoded where it ends, so the sink keeps bytes, not the span and what it references: a
    /// span's strings and shared attributes are released on the thread that made them.
    func enqueue(size: Int, _ write: (inout ProtoCursor) -> Void)
    /// Exports everything queued (SIGTERM, `forceFlush`).
    func flush() async
}

/// Which new traces are recorded (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`): a span with a
/// parent follows the parent's decision (the `parentbased_*` samplers; the plain ones decide each
/// root alike), a root is sampled with `ratio` — judged on the trace id, so every service that
/// starts a root for the same id decides the same.
public struct TraceSampler: Sendable {
    public var ratio: Double
    public var followParent: Bool

    public init(ratio: Double = 1, followParent: Bool = true) {
        self.ratio = ratio
        self.followParent = followParent
    }

    func sampleRoot(_ trace: TraceContext) -> Bool {
        if ratio >= 1 { return true }
        if ratio <= 0 { return false }
        // The trace id's last 56 bits (W3C's random part).
        return Double(trace.traceIDLow & 0x00FF_FFFF_FFFF_FFFF) < ratio * Double(1 << 56)
    }
}

/// TalkMesh's tracer on the swift-distributed-tracing API: W3C ids (the `traceparent` every hop
/// already carries), spans recorded into a `SpanSink` when the trace is sampled and a sink is set,
/// else only propagated (a span then costs an id and a context, nothing else).
public final class TalkMeshTracer: Tracer, Sendable {
    public let sink: (any SpanSink)?
    public let sampler: TraceSampler

    /// `sink` without a retain and release per span (the exporter is one object every core
    /// records into); it lives as long as the tracer, which holds it in `sink`.
    private unowned(unsafe) let unretainedSink: (any SpanSink)?

    public init(sink: (any SpanSink)?, sampler: TraceSampler = TraceSampler()) {
        self.sink = sink
        self.unretainedSink = sink
        self.sampler = sampler
    }

    /// Whether spans may be recorded (an exporter is set): else only trace context travels.
    public var records: Bool { sink != nil }

    /// The tracer every TalkMesh span goes through: the one bootstrapped, else a propagating one
    /// (tests that run servers in process bootstrap nothing). Read on every request: a plain load,
    /// not InstrumentationSystem's lock and a cast.
    /// Written once, by `bootstrap`, before the process starts any thread that reads it.
    public static var shared: TalkMeshTracer { installed }

    /// Runs `body` with the installed tracer, neither retained nor released (`shared` returns it
    /// retained): for the per-request paths.
    @inline(__always)
    public static func withShared<R>(_ body: (TalkMeshTracer) throws -> R) rethrows -> R {
        try Unmanaged.passUnretained(installed)._withUnsafeGuaranteedRef(body)
    }
    /// Not retained by each read (every request reads it; a retain and release of one shared
    /// object is an atomic that the cores contend on): `owner` keeps it.
    nonisolated(unsafe) private static unowned(unsafe) var installed: TalkMeshTracer = propagating
    nonisolated(unsafe) private static var owner = propagating
    /// A tracer that records nothing: context only.
    static let propagating = TalkMeshTracer(sink: nil)



    /// Installs `tracer` for the process (once, at start), also as swift-distributed-tracing's.
    public static func bootstrap(_ tracer: TalkMeshTracer) {
        owner = tracer
        installed = tracer
        InstrumentationSystem.bootstrap(tracer)
    }

    public func startSpan<Instant: TracerInstant>(_ operationName: String, context: @autoclosure () -> InstrumentationContext,
                                                  ofKind kind: SpanKind, at instant: @autoclosure () -> Instant,
                                                  function: String, file fileID: String, line: UInt) -> TalkMeshSpan {
        let context = context()
        return span(operationName, parent: context.traceContext ?? TraceContext.untraced, context: context, kind: kind,
                    start: { instant().nanosecondsSinceEpoch })
    }

    /// A span, a child of `parent` (none: the root of a new trace, sampled as the sampler says).
    /// `attributes`: encoded ones the span starts with (`SharedAttributes`), kept by reference.
    func span(_ name: @autoclosure () -> String, parent: TraceContext?, context: InstrumentationContext = .topLevel, kind: SpanKind,
              attributes: SharedAttributes = SharedAttributes(),
              start: () -> UInt64 = { DefaultTracerClock.now.nanosecondsSinceEpoch }) -> TalkMeshSpan {
        let trace = traceContext(parent: parent)
        let recording = sink != nil && trace.sampled
        // The name is built only for a span that records it.
        return TalkMeshSpan(name: recording ? name() : "", kind: kind, parentContext: context, trace: trace, start: recording ? start() : 0,
                            sink: recording ? sink : nil, shared: recording ? attributes : SharedAttributes())
    }

    /// A request's server span without a span object, for a server whose span nothing else
    /// touches (the HTTP router): the trace context to run the handler in, and when it started
    /// (0 when the span is not recorded). `endServer` records it; a span the handler cannot reach
    /// needs no lock, no attribute storage and no allocation.
    public func serverSpan(parent: TraceContext?) -> (trace: TraceContext, start: UInt64) {
        let trace = traceContext(parent: parent)
        return (trace, sink != nil && trace.sampled ? DefaultTracerClock.now.nanosecondsSinceEpoch : 0)
    }

    /// Records a `serverSpan` that ended now: `name`, and attributes already encoded
    /// (`ProtoWriter.keyValue` with field 9: a route's or method's, a peer's, a status code's),
    /// with an error status when `failure` is given (its text the status message, if any).
    public func endServer(_ span: (trace: TraceContext, start: UInt64), name: KeptBytes, attributes: KeptBytes, _ second: KeptBytes,
                          _ third: KeptBytes = .empty, failure: String? = nil) {
        guard let sink = unretainedSink, span.start != 0 else { return }
        let end = max(DefaultTracerClock.now.nanosecondsSinceEpoch, span.start)
        var status = ProtoWriter()  // empty, and no allocation, unless the call failed
        if let failure { SpanWire.status(into: &status, ok: false, message: failure.isEmpty ? nil : failure) }
        let size = SpanWire.size(span.trace, nameBytes: name.count) + attributes.count + second.count + third.count + status.bytes.count
        sink.enqueue(size: size) { cursor in
            SpanWire.write(span.trace, name: name.buffer, kind: .server, start: span.start, end: end, into: &cursor)
            cursor.raw(attributes.buffer)
            cursor.raw(second.buffer)
            cursor.raw(third.buffer)
            cursor.raw(status.bytes)
        }
    }

    /// A new span's trace context: a child of `parent`, or the root of a new trace, sampled as
    /// the sampler says.
    private func traceContext(parent: TraceContext?) -> TraceContext {
        if let parent {
            var child = parent.child()
            if !sampler.followParent { child.flags = sampler.sampleRoot(child) ? 1 : 0 }
            return child
        }
        var root = TraceContext.root()
        root.flags = sampler.sampleRoot(root) ? 1 : 0
        return root
    }

    public func forceFlush() {
        guard let sink else { return }
        Task { await sink.flush() }
    }

    public func extract<Carrier, Extract: Extractor>(_ carrier: Carrier, into context: inout InstrumentationContext, using extractor: Extract)
    where Extract.Carrier == Carrier {
        if let header = extractor.extract(key: "traceparent", from: carrier), let parent = TraceContext.parse(traceparent: header) {
            context.traceContext = parent
        }
    }

    public func inject<Carrier, Inject: Injector>(_ context: InstrumentationContext, into carrier: inout Carrier, using injector: Inject)
    where Inject.Carrier == Carrier {
        if let trace = context.traceContext { injector.inject(trace.traceparent, forKey: "traceparent", into: &carrier) }
    }

    /// Starts a span, a child of the current one; the caller ends it.
    public func start(_ name: String, ofKind kind: SpanKind = .internal) -> TalkMeshSpan {
        startSpan(name, context: InstrumentationContext.current ?? .topLevel, ofKind: kind, at: DefaultTracerClock.now,
                  function: #function, file: #fileID, line: #line)
    }

    /// Runs `body` with `span` as the current span (without ending it).
    public func within<T>(_ span: TalkMeshSpan?, isolation: isolated (any Actor)? = #isolation, _ body: () async throws -> T) async throws -> T {
        guard let span else { return try await body() }
        return try await TraceContext.$untraced.withValue(span.trace, operation: body, isolation: isolation)
    }

    /// Runs `body` in a new span (a child of the current one, or of `parent` when given).
    public func withSpan<T>(_ name: String, ofKind kind: SpanKind = .internal, parent: TraceContext? = nil,
                            isolation: isolated (any Actor)? = #isolation,
                            _ body: (TalkMeshSpan) async throws -> T) async throws -> T {
        var context = InstrumentationContext.current ?? .topLevel
        if let parent { context.traceContext = parent }
        let span = startSpan(name, context: context, ofKind: kind, at: DefaultTracerClock.now, function: #function, file: #fileID, line: #line)
        let operation: () async throws -> T = {
            do {
                let result = try await body(span)
                span.end()
                return result
            } catch {
                span.recordError(error)
                span.setStatus(SpanStatus(code: .error, message: "\(error)"))
                span.end()
                throw error
            }
        }
        return try await TraceContext.$untraced.withValue(span.trace, operation: operation, isolation: isolation)
    }
}

/// Attributes already in OTLP's wire form (`ProtoWriter.keyValue`, field 9 of `Span`) that many
/// spans share: a method's `rpc.*`, a connection's peer, a status code. A span keeps up to three of
/// them by reference, so starting and ending a call's span copies no attribute bytes.
public struct SharedAttributes: Sendable {
    var first: [UInt8] = []
    var second: [UInt8] = []
    var third: [UInt8] = []

    public init(_ first: [UInt8] = [], _ second: [UInt8] = []) {
        self.first = first
        self.second = second
    }

    /// Keeps `bytes` in a free slot; false when all three are taken.
    mutating func add(_ bytes: [UInt8]) -> Bool {
        if first.isEmpty { first = bytes } else if second.isEmpty { second = bytes } else if third.isEmpty { third = bytes } else { return false }
        return true
    }

    var count: Int { first.count + second.count + third.count }
}

/// One span. Only a recording span (sampled, with a sink) keeps what is set on it; the others
/// ignore every call but `context`, and cost one allocation. An ended span is encoded into the
/// sink where it ends (`SpanSink.enqueue`).
public final class TalkMeshSpan: Tracing.Span, @unchecked Sendable {
    /// The context the span was started in; `context` adds the span itself (built when asked, so
    /// a span nobody hands to the Tracing API costs no dictionary).
    private let parentContext: InstrumentationContext
    public var context: InstrumentationContext {
        var context = parentContext
        context.traceContext = trace
        return context
    }
    public let trace: TraceContext
    public let kind: SpanKind
    /// Where the span goes when it ends; nil for a span that records nothing. Not retained: a
    /// sink outlives its spans (the process's exporter is never freed), and every request's
    /// retain and release of the one exporter contended across cores.
    private unowned(unsafe) let sink: (any SpanSink)?
    let start: UInt64

    struct State {
        var name: String
        /// Encoded attributes shared with other spans, kept by reference.
        var shared: SharedAttributes
        /// The span's own attributes, encoded as they are set (storage allocated at the first).
        var attributes = ProtoWriter()
        var events: [SpanEvent] = []
        var links: [(trace: TraceContext, attributes: SpanAttributes)] = []
        var status: SpanStatus?
        /// 0 until the span ends.
        var end: UInt64 = 0
    }

    /// Inline in the span (no second allocation); untouched when the span records nothing.
    private let state: Mutex<State>

    init(name: String, kind: SpanKind, parentContext: InstrumentationContext, trace: TraceContext, start: UInt64, sink: (any SpanSink)?,
         shared: SharedAttributes = SharedAttributes()) {
        self.kind = kind
        self.parentContext = parentContext
        self.trace = trace
        self.sink = sink
        self.start = start
        state = Mutex(State(name: name, shared: shared))
    }

    public var isRecording: Bool { sink != nil && state.withLock { $0.end == 0 } }

    /// Whether the span records at all (sampled, with a sink), ended or not: no lock taken.
    public var records: Bool { sink != nil }

    public var operationName: String {
        get { sink == nil ? "" : state.withLock { $0.name } }
        set { if sink != nil { state.withLock { if $0.end == 0 { $0.name = newValue } } } }
    }

    /// Write-only here: a set adds each attribute (as `set` does); reading gives nothing back,
    /// since the span keeps them encoded.
    public var attributes: SpanAttributes {
        get { [:] }
        set { newValue.forEach { key, value in set(key, value) } }
    }

    /// Sets one attribute.
    public func set(_ key: String, _ value: SpanAttribute) {
        guard sink != nil else { return }
        state.withLock { if $0.end == 0 { $0.attributes.keyValue(9, key, value) } }
    }

    public func set(_ key: String, _ value: String) { set(key, .string(value)) }
    public func set(_ key: String, _ value: Int64) { set(key, .int64(value)) }
    public func set(_ key: String, _ value: Bool) { set(key, .bool(value)) }
    public func set(_ key: String, _ value: Double) { set(key, .double(value)) }

    public func setStatus(_ status: SpanStatus) {
        guard sink != nil else { return }
        state.withLock { if $0.end == 0 { $0.status = status } }
    }

    public func addEvent(_ event: SpanEvent) {
        guard sink != nil else { return }
        state.withLock { if $0.end == 0 { $0.events.append(event) } }
    }

    public func recordError<Instant: TracerInstant>(_ error: any Error, attributes: SpanAttributes, at instant: @autoclosure () -> Instant) {
        guard sink != nil else { return }
        var details = attributes
        details["exception.type"] = String(describing: type(of: error))
        details["exception.message"] = String(describing: error)
        addEvent(SpanEvent(name: "exception", at: instant(), attributes: details))
    }

    public func addLink(_ link: SpanLink) {
        guard sink != nil, let linked = link.context.traceContext else { return }
        state.withLock { if $0.end == 0 { $0.links.append((linked, link.attributes)) } }
    }

    /// Links the span to another one (a job's original trace, after a restart).
    public func addLink(_ linked: TraceContext, attributes: SpanAttributes = [:]) {
        guard sink != nil else { return }
        state.withLock { if $0.end == 0 { $0.links.append((linked, attributes)) } }
    }

    /// Ends the span as failed with `message`.
    public func fail(_ message: String) {
        setStatus(SpanStatus(code: .error, message: message))
        end()
    }

    public func end<Instant: TracerInstant>(at instant: @autoclosure () -> Instant) {
        end(adding: [], status: nil, at: instant().nanosecondsSinceEpoch)
    }

    /// Ends the span with `encoded` attributes (`ProtoWriter.keyValue` with field 9, kept by
    /// reference while a shared slot is free) and `status`, in one step: a call's span ends with
    /// its status code this way.
    public func end(adding encoded: [UInt8], status: SpanStatus?, at nanoseconds: UInt64 = DefaultTracerClock.now.nanosecondsSinceEpoch) {
        guard let sink else { return }
        state.withLock { state in
            guard state.end == 0 else { return }
            if !encoded.isEmpty, !state.shared.add(encoded) { state.attributes.bytes.append(contentsOf: encoded) }
            if let status { state.status = status }
            state.end = max(nanoseconds, 1)
            // Encoded here, under the span's lock (the sink takes its own inside; it never takes a span's).
            let (size, tail) = otlpSize(&state)
            sink.enqueue(size: size) { cursor in writeOTLP(&state, into: &cursor, tail: tail) }
        }
    }

    /// The ended span's size as an OTLP `Span` message, and the part of it written ahead: events,
    /// links and a status (rare: failures), encoded here; `writeOTLP` takes both back.
    /// `Span`: trace_id 1, span_id 2, trace_state 3, parent_span_id 4, name 5, kind 6, start 7 and
    /// end 8 (fixed64), attributes 9, events 11, links 13, status 15.
    private func otlpSize(_ state: inout State) -> (size: Int, tail: [UInt8]) {
        var tail = ProtoWriter()
        for event in state.events {
            tail.message(11) { message in
                message.fixed64(1, event.nanosecondsSinceEpoch)
                message.string(2, event.name)
                event.attributes.forEach { key, value in message.keyValue(3, key, value) }
            }
        }
        for link in state.links {
            tail.message(13) { message in
                message.id(1, link.trace.traceIDHigh, link.trace.traceIDLow)
                message.id(2, link.trace.spanIDValue)
                link.attributes.forEach { key, value in message.keyValue(4, key, value) }
            }
        }
        if let status = state.status { SpanWire.status(into: &tail, ok: status.code == .ok, message: status.message) }
        let size = SpanWire.size(trace, name: state.name) + state.shared.count + state.attributes.bytes.count + tail.bytes.count
        return (size, tail.bytes)
    }

    /// Writes the ended span's OTLP `Span` fields (`otlpSize` bytes, with its `tail`).
    private func writeOTLP(_ state: inout State, into cursor: inout ProtoCursor, tail: [UInt8]) {
        SpanWire.write(trace, name: state.name, kind: kind, start: start, end: state.end, into: &cursor)
        cursor.raw(state.shared.first)
        cursor.raw(state.shared.second)
        cursor.raw(state.shared.third)
        cursor.raw(state.attributes.bytes)
        cursor.raw(tail)
    }
}

/// The fields of an OTLP `Span` that every span has: trace_id 1, span_id 2, trace_state 3,
/// parent_span_id 4, name 5, kind 6, start 7 and end 8 (fixed64). Attributes (9), events (11),
/// links (13) and a status (15) follow them.
enum SpanWire {
    /// Their encoded size.
    static func size(_ trace: TraceContext, name: String) -> Int { size(trace, nameBytes: name.utf8.count) }

    static func size(_ trace: TraceContext, nameBytes: Int) -> Int {
        // Ids 18 and 10 bytes framed, kind 2, start and end 9 each.
        var size = 18 + 10 + 2 + 9 + 9 + ProtoCursor.fieldSize(nameBytes)
        if trace.parentSpanIDValue != 0 { size += 10 }
        if let traceState = trace.traceState { size += ProtoCursor.fieldSize(traceState.utf8.count) }
        return size
    }

    static func write(_ trace: TraceContext, name: String, kind: SpanKind, start: UInt64, end: UInt64, into cursor: inout ProtoCursor) {
        var name = name
        name.withUTF8 { write(trace, name: $0, kind: kind, start: start, end: end, into: &cursor) }
    }

    static func write(_ trace: TraceContext, name: UnsafeBufferPointer<UInt8>, kind: SpanKind, start: UInt64, end: UInt64,
                      into cursor: inout ProtoCursor) {
        cursor.id(1, trace.traceIDHigh, trace.traceIDLow)
        cursor.id(2, trace.spanIDValue)
        if let traceState = trace.traceState { cursor.string(3, traceState) }
        if trace.parentSpanIDValue != 0 { cursor.id(4, trace.parentSpanIDValue) }
        cursor.bytes(5, name)
        cursor.varint(6, otlpKind(kind))
        cursor.fixed64(7, start)
        cursor.fixed64(8, end)
    }

    /// `Status { message = 2, code = 3 (STATUS_CODE_OK 1, STATUS_CODE_ERROR 2) }` as field 15.
    static func status(into writer: inout ProtoWriter, ok: Bool, message: String?) {
        writer.message(15) { status in
            if let message { status.string(2, message) }
            status.varint(3, ok ? 1 : 2)
        }
    }

    /// SPAN_KIND_INTERNAL 1, SERVER 2, CLIENT 3, PRODUCER 4, CONSUMER 5.
    static func otlpKind(_ kind: SpanKind) -> UInt64 {
        switch kind {
        case .internal: return 1
        case .server: return 2
        case .client: return 3
        case .producer: return 4
        case .consumer: return 5
        }
    }
}
