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
    /// Under `mutex`: jobs running now, the most that ever ran and waited at once, jobs run, and
    /// those of them stopped early by their flag.
    private var busy = 0
    private var mostBusy = 0
    private var mostQueued = 0
    private var finished: UInt64 = 0
    private var stopped: UInt64 = 0
    public let threads: Int
    /// The threads' name, as `top -H` and perf show it (at most 15 bytes).
    public let name: String

    /// `threads` 0: one per core.
    public init(threads: Int = 0, name: String = "work-pool") {
        self.name = name
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
                push(Job(id: id) { [self] in
                    do {
                        box.finish(.success(try body(flag)))
                    } catch {
                        // Ended by its flag: the work stopped early, as a deadline or a cancel asks.
                        if flag.isCancelled { locked { stopped += 1 } }
                        box.finish(.failure(error))
                    }
                })
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

    /// Runs `body` on a pool thread, without waiting for it (and without a cancellation flag).
    public func submit(_ body: @escaping @Sendable () -> Void) {
        push(Job(id: locked { nextID += 1; return nextID }, run: body))
    }

    /// Queues a job and wakes a thread for it.
    private func push(_ job: Job) {
        locked {
            queue.append(job)
            mostQueued = max(mostQueued, queue.count)
        }
        pthread_cond_signal(condition)
    }

    private func locked<R>(_ body: () -> R) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return body()
    }

    fileprivate func work() -> Never {
        var ran = false
        while true {
            pthread_mutex_lock(mutex)
            if ran {  // the previous job, counted under the lock this thread takes anyway
                busy -= 1
                finished += 1
            }
            while queue.isEmpty { pthread_cond_wait(condition, mutex) }
            let job = queue.removeFirst()
            busy += 1
            mostBusy = max(mostBusy, busy)
            pthread_mutex_unlock(mutex)
            job.run()
            ran = true
        }
    }

    /// The pool in Prometheus text: its threads, what runs and waits now, the most that ever ran
    /// and waited at once (the proof that `WORKERS` bounds the work), and the jobs run.
    public func prometheusText(prefix: String = "talkmesh_work_pool") -> String {
        let (busy, queued, mostBusy, mostQueued, finished, stopped) = locked {
            (self.busy, queue.count, self.mostBusy, self.mostQueued, self.finished, self.stopped)
        }
        var text = ""
        for (name, kind, help, value) in [
            ("threads", "gauge", "Threads of the blocking work pool (WORKERS).", String(threads)),
            ("busy", "gauge", "Jobs running on the pool now.", String(busy)),
            ("queued", "gauge", "Jobs waiting for a pool thread now.", String(queued)),
            ("busy_max", "gauge", "The most jobs that ran on the pool at once since start.", String(mostBusy)),
            ("queued_max", "gauge", "The most jobs that waited for a pool thread at once since start.", String(mostQueued)),
            ("jobs_total", "counter", "Jobs the pool ran, those stopped early included.", String(finished)),
            ("jobs_stopped_total", "counter", "Jobs that stopped early, failing once their call was cancelled or its deadline passed.",
             String(stopped)),
        ] {
            text += "# HELP \(prefix)_\(name) \(help)\n# TYPE \(prefix)_\(name) \(kind)\n\(prefix)_\(name) \(value)\n"
        }
        return text
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
    ThreadName.set(pool.name)
    pool.work()
}
