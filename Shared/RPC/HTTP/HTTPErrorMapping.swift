import TalkMeshBase

extension HTTPRouter {
    /// How a thrown error is reported when the service sets no `thrownResponse`: the error's own
    /// status and code where it has them, a gRPC status by gRPC's HTTP mapping, a body that stopped
    /// early as 413/408/400, and anything else as 500 "internal error" with no detail (the server
    /// logs the detail).
    public static func describe(_ error: any Error) -> (status: Int, code: String, message: String) {
        switch error {
        case let error as any HTTPErrorConvertible:
            return error.httpError
        case let error as HTTPBodyError:
            switch error {
            case .tooLarge(let limit): return (413, "PAYLOAD_TOO_LARGE", "the request body is larger than \(limit) bytes")
            case .timedOut: return (408, "REQUEST_TIMEOUT", "the request body stalled")
            case .aborted: return (400, "INVALID_REQUEST", "the request body was cut short")
            }
        case let error as RPCError:
            return (error.code.httpStatus, error.code.description, error.message)
        case is CancellationError:
            return (499, "CANCELLED", "the request was cancelled")
        default:
            return (500, "INTERNAL", "internal error")
        }
    }
}
