import CTalkMesh
import TalkMeshBase
import TalkMeshMessages

/// How one attempt of a call ended, as the retry logic needs to know it.
struct AttemptFailure: Error {
    var error: RPCError
    /// The server never saw the request (connection refused, REFUSED_STREAM, a GOAWAY below its
    /// stream id, no address ready): always safe to retry elsewhere.
    var transparent: Bool
}

/// The response of a unary call with its metadata.
public struct ClientResponse<Message: Sendable>: Sendable {
    /// The response message.
    public var message: Message
    /// Headers the server sent first (custom metadata only).
    public var initialMetadata: Metadata
    /// Trailers the server sent last (custom metadata only).
    public var trailingMetadata: Metadata
}

/// One attempt of a call on one HTTP/2 stream. Touched only on the client's loop.
final class ClientCall: @unchecked Sendable {  // loop-confined: touched only on its loop
    enum Sink {
        case unary(CheckedContinuation<ClientResponse<[UInt8]>, any Error>)
        case streaming(headers: CheckedContinuation<Metadata, any Error>?, messages: AsyncThrowingStream<[UInt8], any Error>.Continuation)
    }

    let path: String
    let request: [UInt8]
    var requestOffset = 0
    let metadata: Metadata
    let deadline: Int64?
    let traceparent: String?
    var sink: Sink
    let maxMessageBytes: Int
    weak var connection: ClientConnection?
    var streamID: Int32 = -1
    var headersSent = false
    var reader: GRPCMessageReader
    var httpStatus = 0
    var contentTypeOK = false
    var grpcStatus: Int?
    var grpcMessage = ""
    var initialMetadata = Metadata()
    var trailingMetadata = Metadata()
    var receivedHeaders = false
    var inTrailers = false
    var finished = false
    var unaryMessage: [UInt8]?
    var messageCount = 0
    var deadlineTimer: LoopTimer?
    /// Streaming: bytes delivered to the consumer and not yet taken; bytes not yet returned to the window.
    var bufferedBytes = 0
    var heldBack = 0
    /// Bytes delivered to a streaming consumer but not yet returned to the flow-control window.
    var isStreaming: Bool { if case .streaming = sink { return true } else { return false } }

    init(path: String, request: [UInt8], metadata: Metadata, deadline: Int64?, traceparent: String?, sink: Sink, maxMessageBytes: Int) {
        self.path = path
        self.request = request
        self.metadata = metadata
        self.deadline = deadline
        self.traceparent = traceparent
        self.sink = sink
        self.maxMessageBytes = maxMessageBytes
        self.reader = GRPCMessageReader(maxMessageBytes: maxMessageBytes)
    }

    /// Ends the attempt with an error (once).
    func fail(_ failure: AttemptFailure) {
        guard !finished else { return }
        finished = true
        deadlineTimer = nil
        switch sink {
        case .unary(let continuation):
            continuation.resume(throwing: failure)
        case .streaming(let headers, let messages):
            if let headers {
                headers.resume(throwing: failure)
            } else {
                messages.finish(throwing: failure.error)
            }
        }
    }

    /// Response headers arrived: a streaming call's consumer can start.
    func headersArrived() {
        guard case .streaming(let headers?, let messages) = sink else { return }
        sink = .streaming(headers: nil, messages: messages)
        headers.resume(returning: initialMetadata)
    }

    func deliver(_ message: [UInt8]) {
        messageCount += 1
        switch sink {
        case .unary:
            if unaryMessage == nil { unaryMessage = message }
        case .streaming(_, let messages):
            headersArrived()
            messages.yield(message)
        }
    }

    /// The stream closed: settle the call from what arrived.
    func closed(errorCode: UInt32) {
        guard !finished else { return }
        if errorCode == NGHTTP2_REFUSED_STREAM.rawValue {
            fail(AttemptFailure(error: RPCError(code: .unavailable, message: "the server refused the stream"), transparent: true))
            return
        }
        guard let status = grpcStatus else {
            if receivedHeaders && httpStatus != 200 {
                fail(AttemptFailure(error: RPCError(code: Self.codeForHTTP(httpStatus), message: "HTTP status \(httpStatus) from \(path)"), transparent: false))
            } else if receivedHeaders && !contentTypeOK {
                fail(AttemptFailure(error: RPCError(code: .unknown, message: "the response is not gRPC (content-type)"), transparent: false))
            } else {
                let reason = errorCode == NGHTTP2_CANCEL.rawValue ? "cancelled by the server" : "stream closed (HTTP/2 error \(errorCode)) without a status"
                fail(AttemptFailure(error: RPCError(code: errorCode == NGHTTP2_CANCEL.rawValue ? .cancelled : .unavailable, message: reason),
                                    transparent: !headersSent))
            }
            return
        }
        finished = true
        deadlineTimer = nil
        let code = RPCError.Code(rawValue: status)
        switch sink {
        case .unary(let continuation):
            if code != .ok {
                continuation.resume(throwing: AttemptFailure(error: RPCError(code: code, message: grpcMessage), transparent: false))
            } else if let message = unaryMessage, messageCount == 1 {
                continuation.resume(returning: ClientResponse(message: message, initialMetadata: initialMetadata, trailingMetadata: trailingMetadata))
            } else {
                let detail = messageCount == 0 ? "no response message" : "\(messageCount) response messages"
                continuation.resume(throwing: AttemptFailure(error: RPCError(code: .internal, message: "unary call returned \(detail)"), transparent: false))
            }
        case .streaming(let headers, let messages):
            if let headers {
                if code == .ok {
                    headers.resume(returning: initialMetadata)
                    messages.finish()
                } else {
                    headers.resume(throwing: AttemptFailure(error: RPCError(code: code, message: grpcMessage), transparent: false))
                }
            } else if code == .ok {
                messages.finish()
            } else {
                messages.finish(throwing: RPCError(code: code, message: grpcMessage))
            }
        }
    }

    /// gRPC's mapping of HTTP statuses without a grpc-status (doc/http-grpc-status-mapping.md).
    static func codeForHTTP(_ status: Int) -> RPCError.Code {
        switch status {
        case 400: return .internal
        case 401: return .unauthenticated
        case 403: return .permissionDenied
        case 404: return .unimplemented
        case 429, 502, 503, 504: return .unavailable
        default: return .unknown
        }
    }
}
