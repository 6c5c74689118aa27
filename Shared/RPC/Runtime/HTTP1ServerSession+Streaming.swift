import CTalkMesh
import Glibc
import TalkMeshBase

// Responses whose body is produced while it is sent: chunked or with the producer's length,
// each write waiting while the connection's output is over its high-water mark.
extension HTTP1ServerSession {
    func startStreamedResponse(_ response: HTTPResponse, _ produce: @escaping @Sendable (HTTPBodyWriter) async throws -> Void,
                               route: String, pending: PendingRequest, keepAlive: Bool) {
        var response = response
        let chunked = !response.headers.contains { $0.name.lowercased() == "content-length" }
        if chunked { response.headers.append(("transfer-encoding", "chunked")) }
        writeResponse(response, keepAlive: keepAlive, method: pending.request.method)
        let loop = connection.loop
        let connectionID = connection.id
        streamed = StreamedResponse(pending: pending, route: route, status: response.status, chunked: chunked, keepAlive: keepAlive)
        streamed?.task = HTTPBodyWriter.run(on: loop, produce, write: { bytes, continuation in
            guard let session = loop.http1Session(connectionID) else {
                continuation.resume(throwing: CancellationError())
                return
            }
            session.streamWrite(bytes, continuation)
        }, ended: { failed in
            loop.http1Session(connectionID)?.streamEnded(failed: failed)
        })
    }

    func streamWrite(_ bytes: [UInt8], _ continuation: CheckedContinuation<Void, any Error>) {
        guard let streamed, !connection.closed else {
            continuation.resume(throwing: CancellationError())
            return
        }
        if streamed.chunked {
            let size = Array((String(bytes.count, radix: 16) + "\r\n").utf8)
            size.withUnsafeBytes { connection.write($0.baseAddress!, $0.count) }
        }
        bytes.withUnsafeBytes { connection.write($0.baseAddress!, $0.count) }
        if streamed.chunked { connection.write("\r\n", 2) }
        lastActivityAt = MonotonicClock.nanoseconds()
        if connection.pendingOutput > Connection.outputHighWater {
            writeWaiters.append(continuation)
        } else {
            continuation.resume()
        }
    }

    func streamEnded(failed: Bool) {
        guard let streamed else { return }
        self.streamed = nil
        inFlight = false
        var keepAlive = streamed.keepAlive
        if failed {
            // The body cannot be completed: closing tells the client it is cut short.
            keepAlive = false
            closeAfterFlush = true
        } else if streamed.chunked {
            connection.write("0\r\n\r\n", 5)
        }
        finishExchange(status: streamed.status, route: streamed.route, pending: streamed.pending, keepAlive: keepAlive)
    }

    func releaseWriters(_ error: (any Error)?) {
        let waiters = writeWaiters
        writeWaiters.removeAll()
        for waiter in waiters {
            if let error { waiter.resume(throwing: error) } else { waiter.resume() }
        }
    }
}
