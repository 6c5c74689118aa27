import Glibc
import TalkMeshBase

/// One thread that runs every job's workflow (`Task(executorPreference:)`): the job runners, their
/// chunk drivers and the actors they call, one piece at a time, in the order they were enqueued.
///
/// On Swift's global pool a workflow hopped between two threads: a chunk's poll answered on
/// libcurl's thread woke a pool thread, whose next enqueue woke the other. Each wake-up costs CPU of
/// its own (on a mostly idle process, caches are cold each time). Here work enqueued from this
/// thread wakes nobody, and work from another thread (libcurl's, the poll timer's, the RPC client's)
/// wakes it only when it sleeps with nothing queued; everything queued meanwhile runs in the same
/// wake-up. The workflow does no blocking wait: SQLite writes are short and under their own lock,
/// PostgreSQL runs on its own threads, a network blob store on `blobIO`.
public final class WorkflowExecutor: TaskExecutor, @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var queue: [UnownedJob] = []
    private var sleeping = false
    /// Wake-ups of the thread (tests).
    private var wakeUps = 0
    private let name: String
    /// Run on the thread each time it has run out of work, before it sleeps (under `mutex`).
    private var idleHooks: [@Sendable () -> Void] = []
    private var thread = pthread_t()

    public init(name: String = "workflow") {
        self.name = name
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
        pthread_create(&thread, nil, workflowThread, Unmanaged.passRetained(self).toOpaque())
        pthread_detach(thread)
    }

    /// Whether the caller runs on this executor's thread.
    public var isCurrent: Bool { pthread_equal(pthread_self(), thread) != 0 }

    /// Runs `hook` on the thread each time it has run out of work, before it sleeps: what the
    /// work of one wake-up queued elsewhere (statements for the database) can go out together.
    /// The hook must not block; work it enqueues here runs before the thread sleeps.
    public func onIdle(_ hook: @escaping @Sendable () -> Void) {
        pthread_mutex_lock(mutex)
        idleHooks.append(hook)
        pthread_mutex_unlock(mutex)
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        pthread_mutex_lock(mutex)
        queue.append(job)
        let wake = sleeping
        sleeping = false
        pthread_mutex_unlock(mutex)
        if wake { pthread_cond_signal(condition) }
    }

    /// How many times the thread was woken from sleep.
    public var wakeUpCount: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return wakeUps
    }

    fileprivate func run() -> Never {
        ThreadName.set(name)
        var batch: [UnownedJob] = []
        let executor = asUnownedTaskExecutor()
        var idleSinceWork = false
        pthread_mutex_lock(mutex)
        while true {
            if queue.isEmpty && !idleSinceWork && !idleHooks.isEmpty {
                idleSinceWork = true
                let hooks = idleHooks
                pthread_mutex_unlock(mutex)
                for hook in hooks { hook() }
                pthread_mutex_lock(mutex)
                continue
            }
            while queue.isEmpty {
                sleeping = true
                pthread_cond_wait(condition, mutex)
                if !queue.isEmpty { wakeUps += 1 }
            }
            idleSinceWork = false
            sleeping = false
            swap(&batch, &queue)
            pthread_mutex_unlock(mutex)
            for job in batch { job.runSynchronously(on: executor) }
            batch.removeAll(keepingCapacity: true)
            pthread_mutex_lock(mutex)
        }
    }
}

private func workflowThread(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    Unmanaged<WorkflowExecutor>.fromOpaque(context!).takeUnretainedValue().run()
}
