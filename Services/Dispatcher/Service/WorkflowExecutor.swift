import CTalkMesh
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
/// PostgreSQL's batched writes are sockets this thread watches (`watch`), its other statements run
/// on its pool's threads, a network blob store on `blobIO`.
///
/// The thread sleeps in `poll(2)`: on an eventfd that work from other threads writes, and on the
/// sockets watched. Between runs of work it also looks at those sockets without sleeping, so an
/// answer is not held up by a thread that stays busy.
public final class WorkflowExecutor: TaskExecutor, @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    /// Written by `enqueue` when the thread sleeps.
    private let wakeFD: Int32
    private var queue: [UnownedJob] = []
    /// Sockets the thread watches, with what to do when they are ready (the thread's own).
    private var watches: [Watch] = []
    /// The descriptors of the last `poll` (the thread's own; kept, not made again per poll).
    private var pollSet: [pollfd] = []
    private struct Watch {
        let fd: Int32
        var events: Int16
        let ready: (Int16) -> Void
    }
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
        wakeFD = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        precondition(wakeFD >= 0, "eventfd failed: errno \(errno)")
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

    /// Watches `fd` for `events` (`POLLIN`, `POLLOUT`): `ready` runs on the thread with what
    /// `poll` reported (errors and hang-ups too) until `unwatch`. A second call for the same `fd`
    /// changes its events. Only on the thread.
    public func watch(_ fd: Int32, events: Int16, _ ready: @escaping (Int16) -> Void) {
        precondition(isCurrent, "watch is for the executor's own thread")
        if let index = watches.firstIndex(where: { $0.fd == fd }) {
            watches[index].events = events
        } else {
            watches.append(Watch(fd: fd, events: events, ready: ready))
        }
    }

    /// The descriptors watched now (tests). Only on the thread.
    var watchedDescriptors: [Int32] {
        precondition(isCurrent, "watches are the executor's own thread's")
        return watches.map(\.fd)
    }

    /// Stops watching `fd`. Only on the thread.
    public func unwatch(_ fd: Int32) {
        precondition(isCurrent, "unwatch is for the executor's own thread")
        watches.removeAll { $0.fd == fd }
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        pthread_mutex_lock(mutex)
        queue.append(job)
        let wake = sleeping
        sleeping = false
        pthread_mutex_unlock(mutex)
        if wake {
            var one: UInt64 = 1
            _ = Glibc.write(wakeFD, &one, 8)
        }
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
        var lastLook: Int64 = 0
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
            if queue.isEmpty {
                sleeping = true
                pthread_mutex_unlock(mutex)
                let woken = waitForEvents(timeout: -1)
                pthread_mutex_lock(mutex)
                if woken { wakeUps += 1 }
                continue
            }
            idleSinceWork = false
            sleeping = false
            swap(&batch, &queue)
            pthread_mutex_unlock(mutex)
            for job in batch { job.runSynchronously(on: executor) }
            batch.removeAll(keepingCapacity: true)
            // A busy thread looks at its sockets at most once a millisecond: each look is a syscall.
            if !watches.isEmpty {
                let now = MonotonicClock.nanoseconds()
                if now - lastLook >= 1_000_000 {
                    lastLook = now
                    _ = waitForEvents(timeout: 0)
                }
            }
            pthread_mutex_lock(mutex)
        }
    }
}

extension WorkflowExecutor {
    /// Polls the wake-up eventfd and the watched sockets, then runs the handlers of those that are
    /// ready (with the mutex not held: they may enqueue work). True when another thread woke it.
    fileprivate func waitForEvents(timeout: Int32) -> Bool {
        pollSet.removeAll(keepingCapacity: true)
        pollSet.append(pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0))
        for watch in watches { pollSet.append(pollfd(fd: watch.fd, events: watch.events, revents: 0)) }
        let ready = pollSet.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeout) }
        guard ready > 0 else { return false }
        let fds = pollSet
        var woken = false
        if fds[0].revents != 0 {
            var count: UInt64 = 0
            _ = Glibc.read(wakeFD, &count, 8)
            woken = true
        }
        if timeout != 0 {
            // What ran meanwhile from this thread needs no second wake-up.
            pthread_mutex_lock(mutex)
            sleeping = false
            pthread_mutex_unlock(mutex)
        }
        for entry in fds.dropFirst() where entry.revents != 0 {
            // A handler may unwatch (or watch) sockets: each is looked up again.
            watches.first { $0.fd == entry.fd }?.ready(entry.revents)
        }
        return woken
    }
}

private func workflowThread(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    Unmanaged<WorkflowExecutor>.fromOpaque(context!).takeUnretainedValue().run()
}
