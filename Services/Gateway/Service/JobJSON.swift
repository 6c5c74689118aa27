import Foundation
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

/// The REST shapes of errors, and job responses (the job shapes: `JobJSON` in TalkMeshMessages).
extension JobJSON {
    static func data(_ value: Any) -> [UInt8] {
        JSONWriter.encode(value)
    }

    static func response(_ status: Int, _ value: Any, headers: [(name: String, value: String)] = []) -> HTTPResponse {
        HTTPResponse(status: status, headers: [("content-type", "application/json")] + headers, body: data(value))
    }

    /// `{"error": {"code", "message", "details"}}`.
    static func error(_ status: Int, _ code: String, _ message: String, details: [String: Any] = [:]) -> HTTPResponse {
        response(status, ["error": ["code": code, "message": message, "details": details]])
    }

    /// A thrown error as the API reports it: a `ServiceError` (raised here or received from the
    /// Dispatcher) with its code's status; a body that stopped early as 413/408/400.
    static func error(for error: any Error) -> HTTPResponse {
        if error is ServiceError || error is HTTPBodyError {
            let (status, code, message) = HTTPRouter.describe(error)
            return Self.error(status, code, message)
        }
        if let error = error as? RPCError {
            if let received = ServiceError(received: error) {
                return Self.error(received.code.httpStatus, received.code.rawValue, received.message)
            }
            switch error.code {
            case .unavailable, .deadlineExceeded:
                return Self.error(503, "SERVICE_UNAVAILABLE", "the Dispatcher is unavailable: \(error.message)")
            case .notFound: return Self.error(404, "NOT_FOUND", error.message)
            case .invalidArgument: return Self.error(400, "INVALID_REQUEST", error.message)
            default: break
            }
        }
        return Self.error(500, "INTERNAL", "internal error")
    }
}
