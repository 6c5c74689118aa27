import Synchronization
import Instrumentation
import TalkMeshBase
import Tracing

/// The spans of the runtime's own calls, named and attributed after OpenTelemetry's semantic
/// conventions for RPC and HTTP.
public enum RPCSpans {
    /// A gRPC call's server span (`TalkMeshTracer.serverSpan`): `package.Service/Method`, a child of
    /// the caller's `traceparent`. Nil when spans are not recorded and the call brought no trace
    /// (as before tracing: nothing to carry). Health probes (every few seconds from every kubelet)
    /// only carry the caller's context. `RPCSpans.end` records it.
    static func server(path: String, traceparent: String?, tracestate: String?) -> (trace: TraceContext, start: UInt64)? {
        let parent = incoming(traceparent: traceparent, tracestate: tracestate)
        return TalkMeshTracer.withShared { tracer in
            if !tracer.records || path.hasPrefix("/grpc.health.v1.Health/") {
                return parent.map { TalkMeshTracer.propagating.serverSpan(parent: $0) }
            }
            return tracer.serverSpan(parent: parent)
        }
    }

    /// Records a gRPC call's server span with its status (an error status for anything but OK).
    /// `name` and `attributes`: the method's, made once at registration; `peer`: the connection's
    /// `network.peer.address`, encoded once per connection (`peerAttribute`).
    static func end(_ span: (trace: TraceContext, start: UInt64)?, name: KeptBytes, attributes: KeptBytes, peer: [UInt8], code: RPCError.Code?) {
        guard let span, span.start != 0 else { return }
        let code = code ?? .ok, raw = Int(code.rawValue)
        KeptBytes.lending(peer) { peer in
            status(grpcStatusAttributes, raw, key: "rpc.grpc.status_code", code: raw) { status in
                TalkMeshTracer.withShared { $0.endServer(span, name: name, attributes: attributes, peer, status, failure: code == .ok ? nil : "\(code)") }
            }
        }
    }

    /// The status code's attribute: `table[index]`, else (a code outside it) made for this span
    /// and lent, not kept.
    private static func status(_ table: UnsafeBufferPointer<KeptBytes>, _ index: Int, key: String, code: Int, _ body: (KeptBytes) -> Void) {
        if table.indices.contains(index) { body(table[index]) } else { KeptBytes.lending(statusAttribute(key, code), body) }
    }

    /// `network.peer.address` encoded for spans; empty for no address.
    public static func peerAttribute(_ peer: String) -> [UInt8] {
        peer.isEmpty ? [] : encoded(["network.peer.address": .string(peer)])
    }

    /// `rpc.system`, `rpc.service` and `rpc.method` of a method path, encoded (once per method).
    static func attributes(rpc path: String) -> [UInt8] {
        let name = path.hasPrefix("/") ? String(path.dropFirst()) : path
        let parts = name.split(separator: "/", maxSplits: 1)
        guard parts.count == 2 else { return encoded(["rpc.system": .string("grpc")]) }
        return encoded(["rpc.system": .string("grpc"), "rpc.service": .string(String(parts[0])), "rpc.method": .string(String(parts[1]))])
    }

    /// Attributes in the form a span keeps them (`ProtoWriter.keyValue`, field 9 of `Span`), in order.
    static func encoded(_ attributes: KeyValuePairs<String, SpanAttribute>) -> [UInt8] {
        var writer = ProtoWriter()
        for (key, value) in attributes { writer.keyValue(9, key, value) }
        return writer.bytes
    }

    /// The caller's trace: its `traceparent` (and `tracestate`, kept when valid), or nil.
    private static func incoming(traceparent: String?, tracestate: String?) -> TraceContext? {
        guard let traceparent, var trace = TraceContext.parse(traceparent: traceparent) else { return nil }
        trace.traceState = TraceContext.validTraceState(tracestate)
        return trace
    }

    /// A gRPC call's client span (one per call, around its attempts), a child of the current span;
    /// nil when spans are not recorded (the call then sends a child of the current trace).
    /// `target`: the client's `network.peer.address`, encoded once (`peerAttribute`).
    public static func client(path: String, target: @autoclosure () -> [UInt8]) -> TalkMeshSpan? {
        let tracer = TalkMeshTracer.shared
        guard tracer.records else { return nil }
        let name = path.hasPrefix("/") ? String(path.dropFirst()) : path
        return tracer.span(name, parent: TraceContext.current, kind: .client, attributes: SharedAttributes(clientAttributes(path), target()))
    }

    /// The `rpc.*` attributes of the methods clients call, encoded once each. Bounded: past 512
    /// paths (a proxy forwarding what its callers name) the rest are encoded per call.
    private static let clientPaths = Mutex<[String: [UInt8]]>([:])

    private static func clientAttributes(_ path: String) -> [UInt8] {
        if let known = clientPaths.withLock({ $0[path] }) { return known }
        let encoded = attributes(rpc: path)
        clientPaths.withLock { if $0.count < 512 { $0[path] = encoded } }
        return encoded
    }

    /// Ends an RPC span with its gRPC status (an error status for anything but OK).
    public static func end(_ span: TalkMeshSpan?, code: RPCError.Code?) {
        guard let span, span.records else { return }
        let code = code ?? .ok, raw = Int(code.rawValue)
        span.end(adding: clientStatusAttributes.indices.contains(raw) ? clientStatusAttributes[raw] : statusAttribute("rpc.grpc.status_code", raw),
                 status: code == .ok ? nil : SpanStatus(code: .error, message: "\(code)"))
    }

    /// `rpc.grpc.status_code` for each gRPC code, encoded once: as arrays for span objects (a
    /// client call's), kept for object-free server spans.
    private static let clientStatusAttributes: [[UInt8]] = (0...16).map { statusAttribute("rpc.grpc.status_code", $0) }
    private nonisolated(unsafe) static let grpcStatusAttributes = KeptBytes.table((0...16).map { KeptBytes(statusAttribute("rpc.grpc.status_code", $0)) })

    private static func statusAttribute(_ key: String, _ code: Int) -> [UInt8] {
        encoded([key: .int64(Int64(code))])
    }

    /// An HTTP request's server span (`TalkMeshTracer.serverSpan`): a child of the request's
    /// `traceparent`, else the root of a new trace.
    public static func http(traceparent: String?, tracestate: String? = nil) -> (trace: TraceContext, start: UInt64) {
        let parent = incoming(traceparent: traceparent, tracestate: tracestate)
        return TalkMeshTracer.withShared { $0.serverSpan(parent: parent) }
    }

    /// Records an HTTP request's server span, `METHOD route` (`name` and `attributes`: the
    /// route's, made once by `httpRoute`), with its status (5xx is an error, as the conventions
    /// have it for servers).
    public static func end(_ span: (trace: TraceContext, start: UInt64), name: KeptBytes, attributes: KeptBytes, httpStatus: Int) {
        guard span.start != 0 else { return }
        status(httpStatusAttributes, httpStatus - 100, key: "http.response.status_code", code: httpStatus) { status in
            TalkMeshTracer.withShared { $0.endServer(span, name: name, attributes: attributes, status, failure: httpStatus >= 500 ? "" : nil) }
        }
    }

    /// Records the span of a request no route matched: its name and attributes are made for it
    /// and lent, not kept (the client chose the method).
    public static func end(_ span: (trace: TraceContext, start: UInt64), method: String, route: String, httpStatus: Int) {
        guard span.start != 0 else { return }
        let made = routeBytes(method: method, route: route)
        KeptBytes.lending(made.name) { name in
            KeptBytes.lending(made.attributes) { end(span, name: name, attributes: $0, httpStatus: httpStatus) }
        }
    }

    /// A route's span name and encoded `http.request.method` and `http.route`, kept (`KeptBytes`):
    /// made once, when the route is added.
    public static func httpRoute(method: String, route: String) -> (name: KeptBytes, attributes: KeptBytes) {
        let made = routeBytes(method: method, route: route)
        return (KeptBytes(made.name), KeptBytes(made.attributes))
    }

    private static func routeBytes(method: String, route: String) -> (name: [UInt8], attributes: [UInt8]) {
        (Array("\(method) \(route)".utf8), encoded(["http.request.method": .string(method), "http.route": .string(route)]))
    }

    /// `http.response.status_code` for 100–599, encoded once.
    private nonisolated(unsafe) static let httpStatusAttributes = KeptBytes.table((100..<600).map { KeptBytes(statusAttribute("http.response.status_code", $0)) })
}

extension Result where Failure == RPCError {
    /// The failure's code, nil on success.
    var failureCode: RPCError.Code? {
        if case .failure(let error) = self { return error.code }
        return nil
    }
}

/// The work a handler does in process (a libav operation), for Prometheus: durations, and input
/// and output sizes, by operation and outcome.
public final class OperationMetrics: Sendable {
    let durations = HistogramFamily("talkmesh_operation_duration_seconds", help: "Time of each media or audio operation, by operation and outcome.",
                                    labels: ["operation", "outcome"], bounds: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800])
    let inputs = HistogramFamily("talkmesh_operation_input_bytes", help: "Input size of each media or audio operation that succeeded, in bytes.",
                                 labels: ["operation"], bounds: [1e4, 1e5, 1e6, 5e6, 1e7, 5e7, 1e8, 5e8, 1e9])
    let outputs = HistogramFamily("talkmesh_operation_output_bytes", help: "Output size of each media or audio operation that succeeded, in bytes.",
                                  labels: ["operation"], bounds: [1e4, 1e5, 1e6, 5e6, 1e7, 5e7, 1e8, 5e8, 1e9])

    public init() {}

    public func render() -> String { durations.render() + inputs.render() + outputs.render() }
}

/// Spans of the work a handler does in process (a libav operation), with its metrics.
public enum WorkSpans {
    /// Runs `body` in an internal span `name` and records its duration in `metrics`; `body` returns
    /// its result with the input and output sizes in bytes (nil when unknown), which go to the
    /// span's attributes and the metrics.
    public static func run<T: Sendable>(_ name: String, attributes: [String: String] = [:], metrics: OperationMetrics? = nil,
                                        _ body: () async throws -> (result: T, input: Int?, output: Int?)) async throws -> T {
        try await TalkMeshTracer.shared.withSpan(name) { span in
            for (key, value) in attributes { span.set(key, value) }
            let started = MonotonicClock.nanoseconds()
            let done: (result: T, input: Int?, output: Int?)
            do {
                done = try await body()
            } catch {
                metrics?.durations.observe([name, "error"], Double(MonotonicClock.nanoseconds() - started) / 1e9)
                throw error
            }
            metrics?.durations.observe([name, "ok"], Double(MonotonicClock.nanoseconds() - started) / 1e9)
            if let input = done.input {
                span.set("talkmesh.input_bytes", Int64(input))
                metrics?.inputs.observe([name], Double(input))
            }
            if let output = done.output {
                span.set("talkmesh.output_bytes", Int64(output))
                metrics?.outputs.observe([name], Double(output))
            }
            return done.result
        }
    }
}
