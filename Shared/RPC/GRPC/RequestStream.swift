import TalkMeshBase
import TalkMeshMessages

/// The request messages of a bidirectional call, as the client sends them: each arrives while
/// the handler may already be answering earlier ones. The connection reads from the client only
/// as fast as the handler takes messages (HTTP/2 flow control), so what waits here is bounded.
/// Iterated once, by one task.
public struct RequestStream<Request: ProtoMessage>: AsyncSequence, Sendable {
    public typealias Element = Request
    let raw: RawRequestStream

    public struct AsyncIterator: AsyncIteratorProtocol {
        let raw: RawRequestStream

        /// The next request, or nil once the client half-closed. Throws the call's end otherwise:
        /// CANCELLED when the client reset it, DEADLINE_EXCEEDED when it stalled past the body
        /// timeout, RESOURCE_EXHAUSTED for a message over the size limit.
        public mutating func next() async throws -> Request? {
            guard let bytes = try await raw.next() else { return nil }
            return try RPCServiceRegistry.decode(Request.self, bytes)
        }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(raw: raw) }
}

/// The untyped side of `RequestStream`: gRPC's length-prefixed messages cut from the stream's
/// body as it arrives. Only its one reading task touches `reader` and `pending`.
final class RawRequestStream: @unchecked Sendable {
    private let body: HTTPBodyStream
    private var reader: GRPCMessageReader
    private var pending: [[UInt8]] = []
    private var head = 0

    init(body: HTTPBodyStream, maxMessageBytes: Int) {
        self.body = body
        reader = GRPCMessageReader(maxMessageBytes: maxMessageBytes)
    }

    func next() async throws -> [UInt8]? {
        while head == pending.count {
            pending.removeAll(keepingCapacity: true)
            head = 0
            let piece: [UInt8]?
            do {
                piece = try await body.next()
            } catch let error as HTTPBodyError {
                switch error {
                case .timedOut: throw RPCError(code: .deadlineExceeded, message: "the request stream stalled for longer than the body timeout")
                case .aborted, .tooLarge: throw RPCError(code: .cancelled, message: "the client ended the request stream")
                }
            }
            guard let piece else {
                if reader.hasPartialMessage { throw RPCError(code: .internal, message: "the request stream ended inside a message") }
                return nil
            }
            do {
                try piece.withUnsafeBufferPointer { (bytes) throws(GRPCMessageReader.Failure) in try reader.append(bytes) }
            } catch .tooLarge(let announced, let limit) {
                throw RPCError(code: .resourceExhausted, message: "received message larger than max (\(announced) vs. \(limit))")
            } catch {
                throw RPCError(code: .internal, message: "compressed messages are not supported (no grpc-encoding negotiated)")
            }
            pending = reader.takeMessages()
        }
        defer { head += 1 }
        return pending[head]
    }
}
