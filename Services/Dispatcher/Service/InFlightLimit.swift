/// A cap on RunPod jobs in flight (`MAX_RUNPOD_JOBS_IN_FLIGHT`): a chunk holds a slot from its
/// submission until it ends. Waiters are served first come, first served; a cancelled waiter
/// leaves the queue.
public actor InFlightLimit {
    public let capacity: Int
    private var used = 0
    private var waiters: [(id: UInt64, continuation: CheckedContinuation<Void, any Error>)] = []
    private var nextWaiter: UInt64 = 0
    /// The most slots ever held at once.
    public private(set) var peak = 0

    public init(capacity: Int) {
        self.capacity = max(1, capacity)
    }

    public var inUse: Int { used }

    /// Takes a slot, waiting for one; throws CancellationError when the task is cancelled meanwhile.
    public func acquire() async throws {
        try Task.checkCancellation()
        if used < capacity && waiters.isEmpty {
            take()
            return
        }
        nextWaiter += 1
        let id = nextWaiter
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                waiters.append((id, continuation))
            }
        } onCancel: {
            Task { await self.cancelWaiter(id) }
        }
    }

    /// Gives a slot back (to the first waiter, if any).
    public func release() {
        if !waiters.isEmpty {
            waiters.removeFirst().continuation.resume()
        } else {
            used = max(0, used - 1)
        }
    }

    private func take() {
        used += 1
        peak = max(peak, used)
    }

    private func cancelWaiter(_ id: UInt64) {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return }
        waiters.remove(at: index).continuation.resume(throwing: CancellationError())
    }
}
