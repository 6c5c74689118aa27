import Instrumentation
import TalkMeshBase
import Tracing

/// The spans of the runtime's own calls, named and attributed after OpenTelemetry's semantic
/// conventions for RPC and HTTP.
public enum RPCSpans {
    /// A gRPC call's server span: `package.Service/Method`, a child of the caller's `traceparent`.
    /// Nil when spans are not recorded and the call brought no trace (as before tracing: nothing to
    /// carry). Health probes (every few seconds from every kubelet) only carry the caller's context.
    /// `name` and `attributes`: the method's, made once at registration.
    static func server(path: String, name: String, attributes: [UInt8], traceparent: String?, tracestate: String?,
                       peer: String) -> TalkMeshSpan? {
        let parent = incoming(traceparent: traceparent, tracestate: tracestate)
        let tracer = TalkMeshTracer.shared
        if !tracer.records || path.hasPrefix("/grpc.health.v1.Health/") {
            return parent.map { TalkMeshTracer.propagating.span("", parent: $0, kind: .server) }
        }
        let span = tracer.span(name, parent: parent, kind: .server)
        if span.isRecording {
            span.setEncoded(attributes)
            if !peer.isEmpty { span.set("network.peer.address", peer) }
        }
        return span
    }

    /// `rpc.system`, `rpc.service` and `rpc.method` of a method path, encoded (once per method).
    static func attributes(rpc path: String) -> [UInt8] {
        let name = path.hasPrefix("/") ? String(path.dropFirst()) : path
        let parts = name.split(separator: "/", maxSplits: 1)
        var writer = ProtoWriter()
        writer.keyValue(9, "rpc.system", .string("grpc"))
        if parts.count == 2 {
            writer.keyValue(9, "rpc.service", .string(String(parts[0])))
            writer.keyValue(9, "rpc.method", .string(String(parts[1])))
        }
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
    public static func client(path: String, target: String) -> TalkMeshSpan? {
        let tracer = TalkMeshTracer.shared
        guard tracer.records else { return nil }
        let name = path.hasPrefix("/") ? String(path.dropFirst()) : path
        let span = tracer.span(name, parent: TraceContext.current, kind: .client)
        if span.isRecording {
            span.setEncoded(Self.attributes(rpc: path))
            if !target.isEmpty { span.set("network.peer.address", target) }
        }
        return span
    }

    /// Ends an RPC span with its gRPC status (an error status for anything but OK).
    public static func end(_ span: TalkMeshSpan?, code: RPCError.Code?) {
        guard let span, span.isRecording else { return }
        span.set("rpc.grpc.status_code", Int64((code ?? .ok).rawValue))
        if let code, code != .ok { span.setStatus(SpanStatus(code: .error, message: "\(code)")) }
        span.end()
    }

    /// An HTTP request's server span: `METHOD route`, a child of the request's `traceparent`.
    public static func http(method: String, route: String, traceparent: String?, tracestate: String? = nil, peer: String) -> TalkMeshSpan {
        let span = TalkMeshTracer.shared.span("\(method) \(route)", parent: incoming(traceparent: traceparent, tracestate: tracestate), kind: .server)
        if span.isRecording {
            span.set("http.request.method", method)
            span.set("http.route", route)
            if !peer.isEmpty { span.set("network.peer.address", peer) }
        }
        return span
    }

    /// Ends an HTTP span with its status (5xx is an error, as the conventions have it for servers).
    public static func end(_ span: TalkMeshSpan, httpStatus: Int) {
        guard span.isRecording else { return }
        span.set("http.response.status_code", Int64(httpStatus))
        if httpStatus >= 500 { span.setStatus(SpanStatus(code: .error)) }
        span.end()
    }
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
