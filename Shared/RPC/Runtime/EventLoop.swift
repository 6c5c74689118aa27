import CTalkMesh
import Glibc
import Synchronization
import TalkMeshBase

/// One libevent loop on one thread. Everything a connection owns (its bufferevent, its nghttp2
/// session, its streams) is touched only on its loop's thread; other threads hand work over with
/// `execute`, which wakes the loop only when its queue was empty, so completions coalesce.
public final class EventLoop: @unchecked Sendable {
    let base: OpaquePointer
    let index: Int
    private var wakeEvent: OpaquePointer!
    private let lock = PThreadMutex()
    private var queue: [() -> Void] = []
    private var localQueue: [() -> Void] = []
    /// The thread running the loop (0 before `run()`): written by that thread, read by any
    /// (`execute` asks whether it is on the loop), so atomic.
    private let thread = Atomic<UInt>(0)

    /// Connections owned by this loop, by id (the table keeps them alive).
    var connections: [UInt64: Connection] = [:]
    var nextConnectionID: UInt64
    /// Connections with HTTP/2 output to send once the current batch of work is done.
    var flushList: [Connection] = []
    weak var server: RPCServer?
    var listener: OpaquePointer?
    var healthListener: OpaquePointer?
    var draining = false
    var drainTimer: LoopTimer?

    var hasLocalWork: Bool { !localQueue.isEmpty }

    init(index: Int) {
        EventLoop.enableThreads
        guard let base = event_base_new() else { fatalError("event_base_new failed") }
        self.base = base
        self.index = index
        self.nextConnectionID = UInt64(index) << 48
        wakeEvent = event_new(base, -1, 0, { _, _, arg in
            Unmanaged<EventLoop>.fromOpaque(arg!).takeUnretainedValue().runQueued()
        }, Unmanaged.passUnretained(self).toOpaque())
    }

    deinit {
        housekeepingTimer = nil  // its event must go before the base
        drainTimer = nil
        event_free(wakeEvent)
        event_base_free(base)
    }

    /// Idle connections and stalled request bodies are found by one sweep per loop, not a timer
    /// per stream: a body timeout re-armed on every DATA frame would cost an event per frame.
    private var housekeepingTimer: LoopTimer?
    /// How late the last housekeeping tick ran, and the latest ever (nanoseconds): the loop's lag,
    /// read by /metrics from any thread.
    let lagNanoseconds = Atomic<Int64>(0)
    let maxLagNanoseconds = Atomic<Int64>(0)
    /// Bytes this loop's server connections read (consumed) and queued for writing, for /metrics.
    let bytesReceived = Atomic<UInt64>(0)
    let bytesSent = Atomic<UInt64>(0)
    /// Calls and HTTP requests this loop's connections have in their handlers now (a handler may
    /// finish on another thread: atomic, but each loop's own line, not one shared by all).
    let grpcInFlight = Atomic<Int>(0)
    let httpInFlight = Atomic<Int>(0)
    /// Connections this loop owns or is about to (handed over by another loop's listener): read
    /// by every listener to place a new connection on the least-loaded loop, and by /metrics.
    let openConnections = Atomic<Int>(0)

    func startHousekeeping(every period: Int64) {
        var due = MonotonicClock.nanoseconds() + period
        housekeepingTimer = LoopTimer(loop: self, after: period, repeating: true) { [unowned self] in
            let now = MonotonicClock.nanoseconds()
            let lag = max(0, now - due)
            due = now + period
            lagNanoseconds.store(lag, ordering: .relaxed)
            if lag > maxLagNanoseconds.load(ordering: .relaxed) { maxLagNanoseconds.store(lag, ordering: .relaxed) }
            for connection in Array(self.connections.values) { connection.sweep(now: now) }
            self.afterWork()
        }
    }

    /// `evthread_use_pthreads()` must run before the first `event_base_new`, or `event_active`
    /// from another thread does not wake a loop blocked in epoll_wait.
    private static let enableThreads: Void = { _ = evthread_use_pthreads() }()

    /// True on this loop's own thread.
    var inLoop: Bool {
        let running = thread.load(ordering: .acquiring)
        return running != 0 && pthread_equal(running, pthread_self()) != 0
    }

    /// Runs `work` on the loop's thread. From the loop's own thread it is queued without a lock
    /// and runs when the current callback returns to `drainLocal()`.
    func execute(_ work: @escaping @Sendable () -> Void) {
        if inLoop {
            // Usually drained by `afterWork()` when the current callback ends; the wake-up covers
            // callbacks that do not end that way (signals, timers).
            if localQueue.isEmpty { event_active(wakeEvent, 0, 0) }
            localQueue.append(work)
            return
        }
        lock.lock()
        let wasEmpty = queue.isEmpty
        queue.append(work)
        lock.unlock()
        if wasEmpty { event_active(wakeEvent, 0, 0) }
    }

    /// Runs what the loop's own thread queued (called after each batch of socket reads).
    func drainLocal() {
        while !localQueue.isEmpty {
            let work = localQueue
            localQueue.removeAll(keepingCapacity: true)
            for item in work { item() }
        }
    }

    private func runQueued() {
        lock.lock()
        let work = queue
        queue.removeAll(keepingCapacity: true)
        lock.unlock()
        for item in work { item() }
        afterWork()
    }

    /// Runs the loop on the calling thread until `stop()`.
    func run() {
        thread.store(pthread_self(), ordering: .releasing)
        _ = event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY)
        runQueued()
    }

    /// Makes `run()` return after the current iteration.
    func stop() {
        event_base_loopbreak(base)
    }

    /// Allocates a connection id unique across loops.
    func allocateConnectionID() -> UInt64 {
        nextConnectionID += 1
        return nextConnectionID
    }
}

/// A one-shot timer on a loop; cancelled when released. The callback runs on the loop's thread.
final class LoopTimer {
    private var event: OpaquePointer!
    private let callback: () -> Void

    /// A `repeating` timer fires every `nanoseconds` until it is released.
    init(loop: EventLoop, after nanoseconds: Int64, repeating: Bool = false, _ callback: @escaping () -> Void) {
        self.callback = callback
        event = event_new(loop.base, -1, repeating ? Int16(EV_PERSIST) : 0, { _, _, arg in
            Unmanaged<LoopTimer>.fromOpaque(arg!).takeUnretainedValue().fire()
        }, Unmanaged.passUnretained(self).toOpaque())
        // Clamped: libevent adds this to its clock in C, where an overflow is undefined.
        let nanoseconds = min(max(nanoseconds, 0), MonotonicClock.longestWait)
        var tv = timeval(tv_sec: Int(nanoseconds / 1_000_000_000), tv_usec: Int(nanoseconds % 1_000_000_000 / 1000))
        event_add(event, &tv)
    }

    private func fire() {
        // The callback may release the last reference to this timer; keep it alive until it returns.
        withExtendedLifetime(self) { callback() }
    }

    deinit {
        event_del(event)
        event_free(event)
    }
}
