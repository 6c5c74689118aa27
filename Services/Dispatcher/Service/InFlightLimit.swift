/// The cap on RunPod jobs in flight (`MAX_RUNPOD_JOBS_IN_FLIGHT`): a chunk holds a slot from
/// before its submission until it ends. A slot belongs to the chunk, not to the process that took
/// it: a replica that takes over a job inherits its chunks' slots (PostgreSQL), so RunPod jobs a
/// dead replica left running still count.
public protocol InFlightSlots: Sendable {
    /// Takes a slot for the chunk (at once when it holds one), waiting for one; throws
    /// CancellationError when the task is cancelled meanwhile.
    func acquire(job: String, chunk: Int) async throws
    /// Gives the chunk's slot back.
    func release(job: String, chunk: Int) async
    /// Gives back every slot the job's chunks hold (the job ended).
    func releaseAll(job: String) async
}

/// A request budget for one RunPod route: callers wait rather than exceed it.
public protocol RequestGate: Sendable {
    func acquire() async throws
}

/// The slots of one process (one replica owns the SQLite store). Waiters are served first come,
/// first served; a cancelled waiter leaves the queue.
public actor LocalInFlightSlots: InFlightSlots {
    public let capacity: Int
    private var held: [String: Set<Int>] = [:]
    private var used = 0
    /// Waiters from `head` on, oldest first; served ones before `head` are dropped in bulk (a
    /// thousand chunks may wait for a few hundred slots: no O(n) `removeFirst` per slot).
    private var waiters: [(id: UInt64, job: String, chunk: Int, continuation: CheckedContinuation<Void, any Error>)?] = []
    private var head = 0
    private var nextWaiter: UInt64 = 0
    /// The most slots ever held at once.
    public private(set) var peak = 0

    public init(capacity: Int) {
        self.capacity = max(1, capacity)
    }

    public var inUse: Int { used }

    public func acquire(job: String, chunk: Int) async throws {
        try Task.checkCancellation()
        if held[job]?.contains(chunk) == true { return }
        if used < capacity && head == waiters.count {
            take(job, chunk)
            return
        }
        nextWaiter += 1
        let id = nextWaiter
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                waiters.append((id, job, chunk, continuation))
            }
        } onCancel: {
            Task { await self.cancelWaiter(id) }
        }
    }

    public func release(job: String, chunk: Int) {
        guard held[job]?.remove(chunk) != nil else { return }
        if held[job]?.isEmpty == true { held[job] = nil }
        used -= 1
        serveWaiters()
    }

    public func releaseAll(job: String) {
        guard let chunks = held.removeValue(forKey: job) else { return }
        used -= chunks.count
        serveWaiters()
    }

    private func serveWaiters() {
        while used < capacity, head < waiters.count {
            let waiter = waiters[head]
            waiters[head] = nil
            head += 1
            guard let waiter else { continue }  // cancelled
            take(waiter.job, waiter.chunk)
            waiter.continuation.resume()
        }
        if head == waiters.count {
            waiters.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 1024 && head * 2 >= waiters.count {
            waiters.removeFirst(head)
            head = 0
        }
    }

    private func take(_ job: String, _ chunk: Int) {
        held[job, default: []].insert(chunk)
        used += 1
        peak = max(peak, used)
    }

    private func cancelWaiter(_ id: UInt64) {
        guard let index = waiters[head...].firstIndex(where: { $0?.id == id }), let waiter = waiters[index] else { return }
        waiters[index] = nil
        waiter.continuation.resume(throwing: CancellationError())
    }
}
