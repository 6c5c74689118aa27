/// The one error type of the RPC layer: a gRPC status code, a message for a person, and a cause.
public struct RPCError: Error, Sendable, CustomStringConvertible {
    /// gRPC status codes, as `grpc/doc/statuscodes.md` defines them.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        public var rawValue: Int
        public init(rawValue: Int) { self.rawValue = rawValue }

        public static let ok = Code(rawValue: 0)
        public static let cancelled = Code(rawValue: 1)
        public static let unknown = Code(rawValue: 2)
        public static let invalidArgument = Code(rawValue: 3)
        public static let deadlineExceeded = Code(rawValue: 4)
        public static let notFound = Code(rawValue: 5)
        public static let alreadyExists = Code(rawValue: 6)
        public static let permissionDenied = Code(rawValue: 7)
        public static let resourceExhausted = Code(rawValue: 8)
        public static let failedPrecondition = Code(rawValue: 9)
        public static let aborted = Code(rawValue: 10)
        public static let outOfRange = Code(rawValue: 11)
        public static let unimplemented = Code(rawValue: 12)
        public static let `internal` = Code(rawValue: 13)
        public static let unavailable = Code(rawValue: 14)
        public static let dataLoss = Code(rawValue: 15)
        public static let unauthenticated = Code(rawValue: 16)

        private static let names = [
            "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
            "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
            "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
            "UNAUTHENTICATED",
        ]

        /// The canonical upper-case name, e.g. `DEADLINE_EXCEEDED`.
        public var description: String {
            Self.names.indices.contains(rawValue) ? Self.names[rawValue] : "CODE_\(rawValue)"
        }

        /// The decimal text of `grpc-status`, precomputed for the common codes.
        package var statusText: String { String(rawValue) }
    }

    /// The status code sent in `grpc-status`.
    public var code: Code
    /// A message for a person, sent percent-encoded in `grpc-message`.
    public var message: String
    /// What caused it (a libav or curl message, an HTTP status…), for logs; not sent to the peer.
    public var cause: (any Error & Sendable)?

    /// Creates an error.
    public init(code: Code, message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public var description: String {
        let base = "\(code): \(message)"
        guard let cause else { return base }
        return "\(base) (cause: \(cause))"
    }
}

extension RPCError {
    /// The status a handler's thrown error is reported with: an `RPCError` as it is, a
    /// cancellation as CANCELLED, anything else as UNKNOWN with its description.
    public init(from error: any Error) {
        if let error = error as? RPCError {
            self = error
        } else if let convertible = error as? any RPCErrorConvertible {
            self = convertible.rpcError
        } else if error is CancellationError {
            self = RPCError(code: .cancelled, message: "the call was cancelled")
        } else {
            self = RPCError(code: .unknown, message: String(describing: error))
        }
    }
}

/// A domain error that knows its gRPC status (the services' error tables conform to this).
public protocol RPCErrorConvertible: Error {
    /// The status and message the peer sees.
    var rpcError: RPCError { get }
}

/// A domain error that knows how a REST API reports it: the services' error table conforms, so a
/// handler's thrown error answers with its code's HTTP status, never a blanket 500.
public protocol HTTPErrorConvertible: Error {
    /// The HTTP status, the stable code and the message the caller sees (no server-side cause).
    var httpError: (status: Int, code: String, message: String) { get }
}

extension RPCError.Code {
    /// The HTTP status for a gRPC status, as gRPC's HTTP mapping (`google.rpc.Code`) gives it.
    public var httpStatus: Int {
        switch self {
        case .ok: 200
        case .cancelled: 499
        case .invalidArgument, .outOfRange, .failedPrecondition: 400
        case .deadlineExceeded: 504
        case .notFound: 404
        case .alreadyExists, .aborted: 409
        case .permissionDenied: 403
        case .unauthenticated: 401
        case .resourceExhausted: 429
        case .unimplemented: 501
        case .unavailable: 503
        default: 500
        }
    }
}
