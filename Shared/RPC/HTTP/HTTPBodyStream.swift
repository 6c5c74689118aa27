import TalkMeshBase

/// Why a streamed request body stopped before its end.
public enum HTTPBodyError: Error, Equatable, Sendable {
    /// The body went past the route's limit (the server reads no more of it).
    case tooLarge(limit: Int)
    /// No body bytes arrived for longer than the body timeout.
    case timedOut
    /// The client reset the stream or closed the connection.
    case aborted
}

/// A request body as it arrives, for routes added with `HTTPRouter.addStreaming`: the handler
/// reads it piece by piece, and the connection reads from the client only as fast as the
/// handler takes the pieces (HTTP/2 flow control; HTTP/1.1 stops reading the socket), so what
/// waits here stays under a bound however large the body.
public final class HTTPBodyStream: @unchecked Sendable {
    private let lock = PThreadMutex()
    private var pieces: [[UInt8]] = []
    private var head = 0
    private var buffered = 0
    private var ended = false
    private var failure: HTTPBodyError?
    private var waiter: CheckedContinuation<[UInt8]?, any Error>?
    /// Told (on the reader's thread) how many bytes the handler took: the connection reads more.
    private let consumed: @Sendable (Int) -> Void

    init(consumed: @escaping @Sendable (Int) -> Void) {
        self.consumed = consumed
    }

    /// The next piece of the body, or nil at its end. Throws `HTTPBodyError` when it stopped early.
    public func next() async throws -> [UInt8]? {
        lock.lock()
        if let piece = takeLocked() {
            lock.unlock()
            consumed(piece.count)
            return piece
        }
        if let failure {
            lock.unlock()
            throw failure
        }
        if ended {
            lock.unlock()
            return nil
        }
        let piece = try await withCheckedThrowingContinuation { continuation in
            waiter = continuation
            lock.unlock()
        }
        if let piece { consumed(piece.count) }
        return piece
    }

    private func takeLocked() -> [UInt8]? {
        guard head < pieces.count else { return nil }
        let piece = pieces[head]
        pieces[head] = []
        head += 1
        buffered -= piece.count
        if head == pieces.count {
            pieces.removeAll(keepingCapacity: true)
            head = 0
        }
        return piece
    }

    // MARK: The connection's side (its loop thread)

    /// Adds arrived bytes (the connection pauses while `waiting` is past its bound).
    func deliver(_ piece: [UInt8]) {
        lock.lock()
        guard failure == nil, !ended else {
            lock.unlock()
            return
        }
        if let waiter {
            self.waiter = nil
            lock.unlock()
            waiter.resume(returning: piece)
            return
        }
        pieces.append(piece)
        buffered += piece.count
        lock.unlock()
    }

    /// The body is complete.
    func finish() {
        lock.lock()
        guard failure == nil, !ended else {
            lock.unlock()
            return
        }
        ended = true
        let waiter = self.waiter
        self.waiter = nil
        lock.unlock()
        waiter?.resume(returning: nil)
    }

    /// The body stops here; what waited unread is dropped and its size returned (so HTTP/2 can
    /// give it back to the flow-control window).
    @discardableResult
    func fail(_ error: HTTPBodyError) -> Int {
        lock.lock()
        guard failure == nil, !ended || head < pieces.count else {
            lock.unlock()
            return 0
        }
        failure = error
        let dropped = buffered
        pieces.removeAll()
        head = 0
        buffered = 0
        let waiter = self.waiter
        self.waiter = nil
        lock.unlock()
        waiter?.resume(throwing: error)
        return dropped
    }

    /// Bytes delivered but not yet taken.
    var waiting: Int { lock.withLock { buffered } }
}

/// Where a streamed response body goes; `write` waits while the client is slow to read.
public struct HTTPBodyWriter: Sendable {
    let send: @Sendable ([UInt8]) async throws -> Void

    public init(send: @escaping @Sendable ([UInt8]) async throws -> Void) {
        self.send = send
    }

    /// Sends bytes; throws when the client went away.
    public func write(_ bytes: [UInt8]) async throws {
        guard !bytes.isEmpty else { return }
        try await send(bytes)
    }
}

extension HTTPBodyWriter {
    /// Runs a streamed response's producer for a session on `loop`: each write is handed to the
    /// loop (`write` resumes the continuation once there is room, or throws when the exchange is
    /// gone), and `ended` runs on the loop when the producer returns (`failed`: it threw).
    static func run(on loop: EventLoop, _ produce: @escaping @Sendable (HTTPBodyWriter) async throws -> Void,
                    write: @escaping @Sendable ([UInt8], CheckedContinuation<Void, any Error>) -> Void,
                    ended: @escaping @Sendable (_ failed: Bool) -> Void) -> Task<Void, Never> {
        let writer = HTTPBodyWriter { bytes in
            try await withCheckedThrowingContinuation { continuation in
                loop.execute { write(bytes, continuation) }
            }
        }
        return Task {
            let failed: Bool
            do {
                try await produce(writer)
                failed = false
            } catch {
                failed = true
            }
            loop.execute { ended(failed) }
        }
    }
}
