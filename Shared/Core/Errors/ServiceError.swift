import TalkMeshRPC

/// A stable error code: what clients and logs match on. Each maps to one gRPC status and one
/// HTTP status, here and nowhere else.
public struct ErrorCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public var description: String { rawValue }

    public static let invalidArgument = ErrorCode(rawValue: "INVALID_ARGUMENT")
    public static let notFound = ErrorCode(rawValue: "NOT_FOUND")
    public static let invalidKey = ErrorCode(rawValue: "INVALID_KEY")
    public static let storageFull = ErrorCode(rawValue: "STORAGE_FULL")
    public static let storageFailed = ErrorCode(rawValue: "STORAGE_FAILED")
    public static let emptyAudio = ErrorCode(rawValue: "EMPTY_AUDIO")
    public static let invalidAudio = ErrorCode(rawValue: "INVALID_AUDIO")
    public static let audioTooLong = ErrorCode(rawValue: "AUDIO_TOO_LONG")
    public static let chunkTooLarge = ErrorCode(rawValue: "CHUNK_TOO_LARGE")
    public static let invalidImage = ErrorCode(rawValue: "INVALID_IMAGE")
    public static let imageTooLarge = ErrorCode(rawValue: "IMAGE_TOO_LARGE")
    public static let invalidVideo = ErrorCode(rawValue: "INVALID_VIDEO")
    public static let cancelled = ErrorCode(rawValue: "CANCELLED")
    public static let deadlineExceeded = ErrorCode(rawValue: "DEADLINE_EXCEEDED")
    public static let overloaded = ErrorCode(rawValue: "OVERLOADED")
    public static let internalError = ErrorCode(rawValue: "INTERNAL")

    /// The one table: code → (gRPC status, HTTP status).
    static let table: [ErrorCode: (RPCError.Code, Int)] = [
        .invalidArgument: (.invalidArgument, 400),
        .notFound: (.notFound, 404),
        .invalidKey: (.invalidArgument, 400),
        .storageFull: (.resourceExhausted, 507),
        .storageFailed: (.internal, 500),
        .emptyAudio: (.invalidArgument, 422),
        .invalidAudio: (.invalidArgument, 422),
        .audioTooLong: (.invalidArgument, 422),
        .chunkTooLarge: (.invalidArgument, 422),
        .invalidImage: (.invalidArgument, 422),
        .imageTooLarge: (.invalidArgument, 422),
        .invalidVideo: (.invalidArgument, 422),
        .cancelled: (.cancelled, 499),
        .deadlineExceeded: (.deadlineExceeded, 504),
        .overloaded: (.resourceExhausted, 429),
        .internalError: (.internal, 500),
    ]

    /// The gRPC status this code is sent with.
    public var grpcCode: RPCError.Code { Self.table[self]?.0 ?? .unknown }
    /// The HTTP status the Gateway answers with.
    public var httpStatus: Int { Self.table[self]?.1 ?? 500 }
}

/// A domain error: a stable code, a message for a person, and the underlying cause (libav's
/// `av_strerror` text, an errno, an HTTP status). Sent as `grpc-message` "CODE: message".
public struct ServiceError: Error, Sendable, CustomStringConvertible, RPCErrorConvertible {
    public var code: ErrorCode
    public var message: String
    public var cause: String?

    public init(_ code: ErrorCode, _ message: String, cause: String? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public var description: String {
        cause.map { "\(code): \(message) (\($0))" } ?? "\(code): \(message)"
    }

    public var rpcError: RPCError {
        RPCError(code: code.grpcCode, message: cause.map { "\(code): \(message): \($0)" } ?? "\(code): \(message)")
    }

    /// Reads the stable code back from a received status message ("CODE: message").
    public static func code(in error: RPCError) -> ErrorCode? {
        guard let colon = error.message.firstIndex(of: ":") else { return nil }
        let candidate = ErrorCode(rawValue: String(error.message[..<colon]))
        return ErrorCode.table[candidate] != nil ? candidate : nil
    }
}
