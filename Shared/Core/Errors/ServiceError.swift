import TalkMeshBase

/// A stable error code: what clients and logs match on. Each maps to one gRPC status and one
/// HTTP status, here and nowhere else: the switches below are the table, and a code without a row
/// does not compile.
public enum ErrorCode: String, CaseIterable, Sendable, CustomStringConvertible {
    case invalidArgument = "INVALID_ARGUMENT"
    case notFound = "NOT_FOUND"
    case invalidKey = "INVALID_KEY"
    case storageFull = "STORAGE_FULL"
    case storageFailed = "STORAGE_FAILED"
    case storageUnavailable = "STORAGE_UNAVAILABLE"
    case emptyAudio = "EMPTY_AUDIO"
    case invalidAudio = "INVALID_AUDIO"
    case audioTooLong = "AUDIO_TOO_LONG"
    case chunkTooLarge = "CHUNK_TOO_LARGE"
    case invalidImage = "INVALID_IMAGE"
    case imageTooLarge = "IMAGE_TOO_LARGE"
    case invalidVideo = "INVALID_VIDEO"
    case cancelled = "CANCELLED"
    case deadlineExceeded = "DEADLINE_EXCEEDED"
    case overloaded = "OVERLOADED"
    case internalError = "INTERNAL"
    case runpodUnauthorized = "RUNPOD_UNAUTHORIZED"
    case runpodUnavailable = "RUNPOD_UNAVAILABLE"
    case runpodPayloadTooLarge = "RUNPOD_PAYLOAD_TOO_LARGE"
    case runpodJobExpired = "RUNPOD_JOB_EXPIRED"
    case runpodResultMissing = "RUNPOD_RESULT_MISSING"
    case runpodJobFailed = "RUNPOD_JOB_FAILED"
    case runpodBadResponse = "RUNPOD_BAD_RESPONSE"
    case jobNotFound = "JOB_NOT_FOUND"
    case jobTerminal = "JOB_TERMINAL"
    case jobTimedOut = "JOB_TIMED_OUT"
    case illegalTransition = "ILLEGAL_TRANSITION"
    case storeUnavailable = "STORE_UNAVAILABLE"
    case storeConflict = "STORE_CONFLICT"
    case leaseLost = "LEASE_LOST"
    case serviceUnavailable = "SERVICE_UNAVAILABLE"
    /// Retention deleted what was asked for (a job's video, or the job).
    case expired = "EXPIRED"
    /// A job's webhook_url is not http(s), does not resolve, or names a private address.
    case invalidWebhookURL = "INVALID_WEBHOOK_URL"
    // The Gateway's own.
    case invalidRequest = "INVALID_REQUEST"
    case unauthorized = "UNAUTHORIZED"
    case rateLimited = "RATE_LIMITED"
    case tooManyActiveJobs = "TOO_MANY_ACTIVE_JOBS"
    case payloadTooLarge = "PAYLOAD_TOO_LARGE"
    case unsupportedMediaType = "UNSUPPORTED_MEDIA_TYPE"
    case jobNotCompleted = "JOB_NOT_COMPLETED"
    case rangeNotSatisfiable = "RANGE_NOT_SATISFIABLE"

    public var description: String { rawValue }

    /// Every code (tests check that each maps).
    public static var all: [ErrorCode] { allCases }

    /// The table: code → (gRPC status, HTTP status, whether the cause goes to the caller).
    ///
    /// The cause of an error (libav's text, a path, an errno, a store's or RunPod's answer) is
    /// always logged by the server with the call's trace id. It reaches the caller only where it
    /// tells them about their own input and nothing about the server: libav's reason a picture,
    /// a recording or a video does not decode (a failed RunPod job carries the worker's own error
    /// in its message).
    /// Paths, errnos, SQL, S3 and RunPod HTTP bodies never leave the process.
    private var row: (grpc: RPCError.Code, http: Int, sendsCause: Bool) {
        switch self {
        case .invalidArgument: (.invalidArgument, 400, false)
        case .notFound: (.notFound, 404, false)
        case .invalidKey: (.invalidArgument, 400, false)
        case .storageFull: (.resourceExhausted, 507, false)
        case .storageFailed: (.internal, 500, false)
        case .storageUnavailable: (.unavailable, 503, false)
        case .emptyAudio: (.invalidArgument, 422, true)
        case .invalidAudio: (.invalidArgument, 400, true)
        case .audioTooLong: (.invalidArgument, 400, false)
        case .chunkTooLarge: (.invalidArgument, 422, false)
        case .invalidImage: (.invalidArgument, 400, true)
        case .imageTooLarge: (.invalidArgument, 422, false)
        case .invalidVideo: (.invalidArgument, 422, true)
        case .cancelled: (.cancelled, 499, false)
        case .deadlineExceeded: (.deadlineExceeded, 504, false)
        case .overloaded: (.resourceExhausted, 429, false)
        case .internalError: (.internal, 500, false)
        case .runpodUnauthorized: (.unavailable, 502, false)
        case .runpodUnavailable: (.unavailable, 503, false)
        case .runpodPayloadTooLarge: (.invalidArgument, 413, false)
        case .runpodJobExpired: (.notFound, 502, false)
        case .runpodResultMissing: (.unavailable, 502, false)
        case .runpodJobFailed: (.unavailable, 502, false)
        case .runpodBadResponse: (.unavailable, 502, false)
        case .jobNotFound: (.notFound, 404, false)
        case .jobTerminal: (.failedPrecondition, 409, false)
        case .jobTimedOut: (.deadlineExceeded, 504, false)
        case .illegalTransition: (.failedPrecondition, 409, false)
        case .storeUnavailable: (.unavailable, 503, false)
        case .storeConflict: (.aborted, 409, false)
        case .leaseLost: (.aborted, 409, false)
        case .serviceUnavailable: (.unavailable, 503, false)
        case .expired: (.notFound, 410, false)
        case .invalidWebhookURL: (.invalidArgument, 400, false)
        case .invalidRequest: (.invalidArgument, 400, false)
        case .unauthorized: (.unauthenticated, 401, false)
        case .rateLimited: (.resourceExhausted, 429, false)
        case .tooManyActiveJobs: (.resourceExhausted, 429, false)
        case .payloadTooLarge: (.resourceExhausted, 413, false)
        case .unsupportedMediaType: (.invalidArgument, 415, false)
        case .jobNotCompleted: (.failedPrecondition, 409, false)
        case .rangeNotSatisfiable: (.outOfRange, 416, false)
        }
    }

    /// The gRPC status this code is sent with.
    public var grpcCode: RPCError.Code { row.grpc }
    /// The HTTP status the Gateway answers with.
    public var httpStatus: Int { row.http }
    /// Whether the error's cause is sent to the caller with the message (see the table).
    public var sendsCause: Bool { row.sendsCause }
}

/// A domain error: a stable code, a message for a person, and the underlying cause (libav's
/// `av_strerror` text, an errno, an HTTP status). Sent as `grpc-message` "CODE: message".
public struct ServiceError: Error, Sendable, CustomStringConvertible, RPCErrorConvertible, HTTPErrorConvertible {
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

    /// The message a caller sees: with the cause only where the table sends it.
    var callerMessage: String {
        guard code.sendsCause, let cause else { return message }
        return "\(message): \(cause)"
    }

    /// What the caller sees: "CODE: message". The error itself rides along as the status's cause,
    /// for the server's log.
    public var rpcError: RPCError {
        RPCError(code: code.grpcCode, message: "\(code): \(callerMessage)", cause: self)
    }

    /// What a REST caller sees: the code's HTTP status, the code, and the caller's message.
    public var httpError: (status: Int, code: String, message: String) {
        (code.httpStatus, code.rawValue, callerMessage)
    }

    /// Reads the stable code back from a received status message ("CODE: message").
    public static func code(in error: RPCError) -> ErrorCode? {
        guard let colon = error.message.firstIndex(of: ":") else { return nil }
        return ErrorCode(rawValue: String(error.message[..<colon]))
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
