import Glibc
import Synchronization
import TalkMeshBase

/// Set when a call is cancelled or its deadline passes; long loops (libav's interrupt callback
/// among them) check it and stop promptly.
public final class CancellationFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    public init() {}
    public var isCancelled: Bool { flag.load(ordering: .relaxed) }
    public func cancel() { flag.store(true, ordering: .relaxed) }
    /// Throws CANCELLED when set.
    public func check() throws(ServiceError) {
        if isCancelled { throw ServiceError(.cancelled, "the call was cancelled or its deadline passed") }
    }
}

/// A fixed set of threads for blocking work (libav decoding and encoding) so it never occupies
/// Swift's cooperative pool or an event loop. Calls beyond the threads wait in a queue, for as
/// long as their task is not cancelled.
public final class BlockingWorkPool: @unchecked Sendable {
    private struct Job {
        let id: UInt64
        let run: () -> Void
    }

    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var queue: [Job] = []
    private var nextID: UInt64 = 0
    public let threads: Int

    /// `threads` 0: one per core.
    public init(threads: Int = 0) {
        self.threads = threads > 0 ? threads : max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
        for _ in 0..<self.threads {
            var thread = pthread_t()
            pthread_create(&thread, nil, workPoolThread, Unmanaged.passRetained(self).toOpaque())
            pthread_detach(thread)
        }
    }

    /// Jobs waiting for a thread.
    public var queued: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return queue.count
    }

    /// Runs `body` on a pool thread. Cancelling the calling task sets the flag `body` receives,
    /// or removes the job if it has not started (then throws CANCELLED).
    public func run<T: Sendable>(_ body: @escaping @Sendable (CancellationFlag) throws -> T) async throws -> T {
        let flag = CancellationFlag()
        let box = ResultBox<T>()
        let id: UInt64 = locked { nextID += 1; return nextID }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
                box.continuation = continuation
                locked {
                    queue.append(Job(id: id) {
                        do { box.finish(.success(try body(flag))) } catch { box.finish(.failure(error)) }
                    })
                }
                pthread_cond_signal(condition)
            }
        } onCancel: {
            flag.cancel()
            let removed: Bool = locked {
                guard let index = queue.firstIndex(where: { $0.id == id }) else { return false }
                queue.remove(at: index)
                return true
            }
            if removed { box.finish(.failure(ServiceError(.cancelled, "cancelled while waiting for a worker"))) }
        }
    }

    private func locked<R>(_ body: () -> R) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return body()
    }

    fileprivate func work() -> Never {
        while true {
            pthread_mutex_lock(mutex)
            while queue.isEmpty { pthread_cond_wait(condition, mutex) }
            let job = queue.removeFirst()
            pthread_mutex_unlock(mutex)
            job.run()
        }
    }
}

/// Resumes a continuation exactly once (the job or its cancellation, whichever comes first).
private final class ResultBox<T: Sendable>: @unchecked Sendable {
    private let lock = Locked<Bool>(false)
    var continuation: CheckedContinuation<T, any Error>?

    func finish(_ result: Result<T, any Error>) {
        let first = lock.withLock { done -> Bool in
            defer { done = true }
            return !done
        }
        if first { continuation?.resume(with: result) }
    }
}

private func workPoolThread(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let pool = Unmanaged<BlockingWorkPool>.fromOpaque(context!).takeRetainedValue()
    pool.work()
}
