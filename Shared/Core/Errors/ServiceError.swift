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
    public static let storageUnavailable = ErrorCode(rawValue: "STORAGE_UNAVAILABLE")
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
    public static let runpodUnauthorized = ErrorCode(rawValue: "RUNPOD_UNAUTHORIZED")
    public static let runpodUnavailable = ErrorCode(rawValue: "RUNPOD_UNAVAILABLE")
    public static let runpodPayloadTooLarge = ErrorCode(rawValue: "RUNPOD_PAYLOAD_TOO_LARGE")
    public static let runpodJobExpired = ErrorCode(rawValue: "RUNPOD_JOB_EXPIRED")
    public static let runpodResultMissing = ErrorCode(rawValue: "RUNPOD_RESULT_MISSING")
    public static let runpodJobFailed = ErrorCode(rawValue: "RUNPOD_JOB_FAILED")
    public static let runpodBadResponse = ErrorCode(rawValue: "RUNPOD_BAD_RESPONSE")
    public static let jobNotFound = ErrorCode(rawValue: "JOB_NOT_FOUND")
    public static let jobTerminal = ErrorCode(rawValue: "JOB_TERMINAL")
    public static let jobTimedOut = ErrorCode(rawValue: "JOB_TIMED_OUT")
    public static let illegalTransition = ErrorCode(rawValue: "ILLEGAL_TRANSITION")
    public static let storeUnavailable = ErrorCode(rawValue: "STORE_UNAVAILABLE")
    public static let storeConflict = ErrorCode(rawValue: "STORE_CONFLICT")
    public static let leaseLost = ErrorCode(rawValue: "LEASE_LOST")
    public static let serviceUnavailable = ErrorCode(rawValue: "SERVICE_UNAVAILABLE")
    // The Gateway's own.
    public static let invalidRequest = ErrorCode(rawValue: "INVALID_REQUEST")
    public static let unauthorized = ErrorCode(rawValue: "UNAUTHORIZED")
    public static let rateLimited = ErrorCode(rawValue: "RATE_LIMITED")
    public static let tooManyActiveJobs = ErrorCode(rawValue: "TOO_MANY_ACTIVE_JOBS")
    public static let payloadTooLarge = ErrorCode(rawValue: "PAYLOAD_TOO_LARGE")
    public static let unsupportedMediaType = ErrorCode(rawValue: "UNSUPPORTED_MEDIA_TYPE")
    public static let jobNotCompleted = ErrorCode(rawValue: "JOB_NOT_COMPLETED")
    public static let rangeNotSatisfiable = ErrorCode(rawValue: "RANGE_NOT_SATISFIABLE")

    /// The one table: code → (gRPC status, HTTP status).
    static let table: [ErrorCode: (RPCError.Code, Int)] = [
        .invalidArgument: (.invalidArgument, 400),
        .notFound: (.notFound, 404),
        .invalidKey: (.invalidArgument, 400),
        .storageFull: (.resourceExhausted, 507),
        .storageFailed: (.internal, 500),
        .storageUnavailable: (.unavailable, 503),
        .emptyAudio: (.invalidArgument, 422),
        .invalidAudio: (.invalidArgument, 400),
        .audioTooLong: (.invalidArgument, 400),
        .chunkTooLarge: (.invalidArgument, 422),
        .invalidImage: (.invalidArgument, 400),
        .imageTooLarge: (.invalidArgument, 422),
        .invalidVideo: (.invalidArgument, 422),
        .cancelled: (.cancelled, 499),
        .deadlineExceeded: (.deadlineExceeded, 504),
        .overloaded: (.resourceExhausted, 429),
        .internalError: (.internal, 500),
        .runpodUnauthorized: (.unavailable, 502),
        .runpodUnavailable: (.unavailable, 503),
        .runpodPayloadTooLarge: (.invalidArgument, 413),
        .runpodJobExpired: (.notFound, 502),
        .runpodResultMissing: (.unavailable, 502),
        .runpodJobFailed: (.unavailable, 502),
        .runpodBadResponse: (.unavailable, 502),
        .jobNotFound: (.notFound, 404),
        .jobTerminal: (.failedPrecondition, 409),
        .jobTimedOut: (.deadlineExceeded, 504),
        .illegalTransition: (.failedPrecondition, 409),
        .storeUnavailable: (.unavailable, 503),
        .storeConflict: (.aborted, 409),
        .leaseLost: (.aborted, 409),
        .serviceUnavailable: (.unavailable, 503),
        .invalidRequest: (.invalidArgument, 400),
        .unauthorized: (.unauthenticated, 401),
        .rateLimited: (.resourceExhausted, 429),
        .tooManyActiveJobs: (.resourceExhausted, 429),
        .payloadTooLarge: (.resourceExhausted, 413),
        .unsupportedMediaType: (.invalidArgument, 415),
        .jobNotCompleted: (.failedPrecondition, 409),
        .rangeNotSatisfiable: (.outOfRange, 416),
    ]

    /// Every code in the table (tests check that each maps).
    public static var all: [ErrorCode] { Array(table.keys) }

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

    /// The error a peer sent, read back from its status message ("CODE: message"); nil when the
    /// message carries no code from the table.
    public init?(received error: RPCError) {
        guard let code = Self.code(in: error) else { return nil }
        let text = error.message.dropFirst(code.rawValue.count + 1)
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" }
        self.init(code, String(text.drop(while: isSpace).reversed().drop(while: isSpace).reversed()))
    }
}
