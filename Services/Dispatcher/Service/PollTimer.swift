import Glibc
import TalkMeshBase

/// The waits between a chunk's polls, on one thread: a heap of deadlines. `Task.sleep` armed a
/// libdispatch timer source per wait and woke its manager thread to program it and again to fire
/// it; with thousands of chunks polling, those wake-ups were a tenth of the Dispatcher's CPU
/// (bench/dispatcher). Registering a wait wakes the thread only when it moves the wake-up earlier.
///
/// Waits are batched (`RUNPOD_POLL_BATCH`): the thread wakes `batch` after the earliest deadline
/// and resumes every wait due by then (and within `slack` of it), never one before its deadline.
/// A batch of polls then goes out together: one wake-up of the timer, of the workflow thread and
/// of libcurl's thread for several polls instead of one each. On a machine where the Dispatcher
/// is mostly idle, each wake-up finds cold caches and costs far more than the work it does
/// (a lone unary call costs 4–5× the CPU of one in a busy stream); batching polls by 100 ms cut
/// the Dispatcher's voluntary context switches by 40 % and its CPU per chunk by a fifth to a
/// quarter (bench/dispatcher, interleaved runs).
final class PollTimer: @unchecked Sendable {
    /// One wait; its state changes under the timer's mutex.
    private final class Waiter: @unchecked Sendable {
        let deadline: Int64
        var continuation: CheckedContinuation<Void, any Error>?
        var cancelled = false
        var done = false

        init(deadline: Int64) {
            self.deadline = deadline
        }
    }

    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// A min-heap on `deadline`.
    private var heap: [Waiter] = []
    /// Cancelled waits still in the heap. A job's watchdog waits here until the job's deadline
    /// (an hour) and is cancelled when the job ends: once they are half the heap, they go.
    private var cancelledInHeap = 0
    /// The deadline the thread sleeps until (Int64.max: until signalled).
    private var sleepingUntil = Int64.max
    /// Waits due this close to each other are resumed together.
    let slackNanoseconds: Int64
    /// How long after the earliest deadline the thread wakes, to resume the waits due meanwhile too.
    let batchNanoseconds: Int64
    /// Wake-ups that resumed at least one wait, and the waits they resumed (under the mutex).
    private var batches = 0
    private var resumed = 0

    init(batchNanoseconds: Int64 = 0, slackNanoseconds: Int64 = 2_000_000) {
        self.batchNanoseconds = max(0, batchNanoseconds)
        self.slackNanoseconds = slackNanoseconds
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
        var thread = pthread_t()
        pthread_create(&thread, nil, pollTimerThread, Unmanaged.passRetained(self).toOpaque())
        pthread_detach(thread)
    }

    /// Returns after `seconds` (at once for 0 or less); throws CancellationError as soon as the
    /// calling task is cancelled.
    func sleep(seconds: Double) async throws {
        guard seconds > 0 else { return try Task.checkCancellation() }
        let waiter = Waiter(deadline: MonotonicClock.deadline(after: Int64(min(seconds, 86_400) * 1e9)))
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                pthread_mutex_lock(mutex)
                if waiter.cancelled {
                    pthread_mutex_unlock(mutex)
                    continuation.resume(throwing: CancellationError())
                    return
                }
                waiter.continuation = continuation
                push(waiter)
                // The thread sleeps until its earliest deadline plus the batch window.
                let wake = waiter.deadline + batchNanoseconds < sleepingUntil
                pthread_mutex_unlock(mutex)
                if wake { pthread_cond_signal(condition) }
            }
        } onCancel: {
            pthread_mutex_lock(mutex)
            waiter.cancelled = true
            // Still in the heap: resumed here; it is skipped when its deadline comes, or swept.
            let continuation = waiter.done ? nil : waiter.continuation
            waiter.done = true
            if continuation != nil { sweepCancelled() }
            pthread_mutex_unlock(mutex)
            continuation?.resume(throwing: CancellationError())
        }
    }

    /// Wake-ups that resumed waits, and how many waits they resumed.
    var statistics: (batches: Int, resumed: Int) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return (batches, resumed)
    }

    fileprivate func run() -> Never {
        var due: [CheckedContinuation<Void, any Error>] = []
        pthread_mutex_lock(mutex)
        while true {
            let now = MonotonicClock.nanoseconds()
            while let first = heap.first, first.deadline <= now + slackNanoseconds {
                popFirst()
                if !first.done, let continuation = first.continuation {
                    first.done = true
                    due.append(continuation)
                } else if first.cancelled {
                    cancelledInHeap -= 1
                }
            }
            if !due.isEmpty {
                batches += 1
                resumed += due.count
                pthread_mutex_unlock(mutex)
                for continuation in due { continuation.resume() }
                due.removeAll(keepingCapacity: true)
                pthread_mutex_lock(mutex)
                continue
            }
            if let first = heap.first {
                let wake = first.deadline + batchNanoseconds
                sleepingUntil = wake
                var until = timespec(tv_sec: Int(wake / 1_000_000_000), tv_nsec: Int(wake % 1_000_000_000))
                pthread_cond_timedwait(condition, mutex, &until)
            } else {
                sleepingUntil = Int64.max
                pthread_cond_wait(condition, mutex)
            }
            sleepingUntil = Int64.max
        }
    }

    /// Waits in the heap, cancelled ones included (tests).
    var heapCount: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return heap.count
    }

    // MARK: The heap (under the mutex)

    /// Counts one more cancelled wait in the heap; drops them all once they are half of it.
    private func sweepCancelled() {
        cancelledInHeap += 1
        guard cancelledInHeap >= 64, cancelledInHeap * 2 >= heap.count else { return }
        heap.removeAll { $0.cancelled }
        cancelledInHeap = 0
        // Heapify: sift down every parent, last first.
        for parent in stride(from: heap.count / 2 - 1, through: 0, by: -1) { siftDown(parent) }
    }

    private func push(_ waiter: Waiter) {
        heap.append(waiter)
        var child = heap.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard heap[child].deadline < heap[parent].deadline else { break }
            heap.swapAt(child, parent)
            child = parent
        }
    }

    private func popFirst() {
        let last = heap.removeLast()
        guard !heap.isEmpty else { return }
        heap[0] = last
        siftDown(0)
    }

    private func siftDown(_ start: Int) {
        var parent = start
        while true {
            let left = 2 * parent + 1, right = left + 1
            var smallest = parent
            if left < heap.count && heap[left].deadline < heap[smallest].deadline { smallest = left }
            if right < heap.count && heap[right].deadline < heap[smallest].deadline { smallest = right }
            guard smallest != parent else { return }
            heap.swapAt(parent, smallest)
            parent = smallest
        }
    }
}

private func pollTimerThread(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    ThreadName.set("poll-timer")
    Unmanaged<PollTimer>.fromOpaque(context!).takeUnretainedValue().run()
}
