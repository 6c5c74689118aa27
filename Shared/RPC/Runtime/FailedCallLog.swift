import Logging
import TalkMeshBase

extension RPCError.Code {
    /// The level a failed call is logged at: the server's own faults as errors, a dependency that
    /// is down or a server that sheds load as warnings, what the caller did (bad input, unknown
    /// method, a cancelled or timed-out call of theirs) as info.
    var logLevel: Logger.Level {
        switch self {
        case .internal, .unknown, .dataLoss: .error
        case .unavailable, .resourceExhausted, .aborted: .warning
        default: .info
        }
    }
}

extension ServerCore {
    /// Logs one failed gRPC call, once: its method, status, what the peer was told and, from the
    /// error's cause, what it was not (libav's text, a path, an errno), with the caller's trace id.
    func logFailedCall(path: String, error: RPCError, traceparent: String?, peer: String) {
        let level = error.code.logLevel
        guard logger.logLevel <= level else { return }
        var metadata: Logger.Metadata = ["method": "\(path)", "grpc_status": "\(error.code)", "message": "\(error.message)", "peer": "\(peer)"]
        if let cause = error.cause { metadata["error"] = "\(cause)" }
        if let traceparent, let trace = TraceContext.parse(traceparent: traceparent) { metadata["trace_id"] = "\(trace.traceID)" }
        logger.log(level: level, "call failed", metadata: metadata)
    }
}
