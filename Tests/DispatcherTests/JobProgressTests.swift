import Testing
import TalkMeshBase
import TalkMeshMessages
@testable import TalkMeshDispatcherService

@Suite struct JobProgressTests {
    func job(stage: JobStage, chunks: [(Double, ChunkStatus)]) -> Job {
        var job = Job()
        job.status = .running
        job.stage = stage
        job.chunks = chunks.map { var chunk = JobChunk(); chunk.durationSec = $0.0; chunk.status = $0.1; return chunk }
        return job
    }

    @Test func progressIsWeightedByStageAndAudioSeconds() {
        #expect(JobProgress.progress(of: job(stage: .stagePreparing, chunks: [])) == 0)
        let rendering = job(stage: .stageRendering, chunks: [(30, .chunkCompleted), (10, .chunkRunning), (20, .chunkPending)])
        #expect(abs(JobProgress.progress(of: rendering) - (0.05 + 0.85 * 30 / 60)) < 1e-9)
        #expect(abs(JobProgress.progress(of: job(stage: .stageStitching, chunks: [])) - 0.9) < 1e-9)
    }

    @Test func etaPacksTheRemainingChunksOntoTheJobsLanes() {
        let estimate = Throughput.Estimate(secondsPerAudioSecond: 2, queueDelaySeconds: 1)
        let rendering = job(stage: .stageRendering, chunks: [(10, .chunkCompleted), (10, .chunkPending), (5, .chunkPending), (5, .chunkRunning)])
        // Left: 20 s, 10 s, 10 s of work on 2 lanes → 20; plus queue delay 1 and stitching 2.
        #expect(JobProgress.eta(of: rendering, estimate: estimate, concurrency: 2) == 23)
        #expect(JobProgress.eta(of: rendering, estimate: estimate, concurrency: 1) == 43)
        #expect(JobProgress.eta(of: rendering, estimate: Throughput.Estimate(), concurrency: 2) == -1)
    }

    @Test func throughputIsAMovingAverageOfRunPodsTimings() {
        let throughput = Throughput(smoothing: 0.5)
        throughput.record(audioSeconds: 10, queueDelayMs: 2000, executionMs: 20_000)
        #expect(throughput.estimate == Throughput.Estimate(secondsPerAudioSecond: 2, queueDelaySeconds: 2))
        throughput.record(audioSeconds: 10, queueDelayMs: 0, executionMs: 40_000)
        #expect(throughput.estimate == Throughput.Estimate(secondsPerAudioSecond: 3, queueDelaySeconds: 1))
        throughput.record(audioSeconds: 0, queueDelayMs: 0, executionMs: 1)  // ignored
        #expect(throughput.estimate.secondsPerAudioSecond == 3)
    }

    @Test func pollsLandWhenRunPodsThroughputSaysTheChunkIsDone() {
        let planner = PollPlanner()
        let known = Throughput.Estimate(secondsPerAudioSecond: 0.5, queueDelaySeconds: 0)
        // A 20 s chunk at 0.5 s/s needs 10 s; 4 s have run: the next poll is in 6 s, not a ladder step.
        #expect(planner.next(running: true, executionMs: 4000, audioSeconds: 20, estimate: known, previous: 1) == 6)
        // Overdue: close polls, growing to at most 1 s.
        var wait = 0.0
        var waits: [Double] = []
        for _ in 0..<8 {
            wait = planner.next(running: true, executionMs: 11_000, audioSeconds: 20, estimate: known, previous: wait)
            waits.append(wait)
        }
        #expect(waits.first == 0.1 && waits.max()! <= 1.0 && waits == waits.sorted())
        // Still queued: when it would be done, had it started now (the whole run the throughput
        // predicts: a chunk that keeps to it is found COMPLETED by this one poll),
        let queued = planner.next(running: false, executionMs: nil, audioSeconds: 20, estimate: known, previous: 0)
        #expect(queued == 10)
        // after what is left of the queue delay RunPod's recent chunks saw; past both, a short
        // growing ladder capped at 2 s.
        let busy = Throughput.Estimate(secondsPerAudioSecond: 0.01, queueDelaySeconds: 8)
        #expect(abs(planner.next(running: false, executionMs: nil, audioSeconds: 20, estimate: busy, previous: 0, queuedSeconds: 1) - 7.2) < 1e-9)
        #expect(abs(planner.next(running: false, executionMs: nil, audioSeconds: 20, estimate: busy, previous: 0.25, queuedSeconds: 6.5) - 1.7) < 1e-9)
        #expect(planner.next(running: false, executionMs: nil, audioSeconds: 20, estimate: busy, previous: 1.9, queuedSeconds: 9) == 2)
        let fresh = Throughput.Estimate()
        #expect(planner.next(running: false, executionMs: nil, audioSeconds: 20, estimate: fresh, previous: 0) == 0.25)
        #expect(planner.next(running: false, executionMs: nil, audioSeconds: 20, estimate: fresh, previous: 1.9) == 2)
        // Never past `longest`.
        #expect(planner.next(running: false, executionMs: nil, audioSeconds: 600, estimate: known, previous: 0) == 10)
        // Running at an unknown throughput: a tenth of the time run so far, within 0.25–2 s,
        // whatever the previous wait (the poll that finds it done is at most 10 % late).
        let unknown = Throughput.Estimate()
        #expect(planner.next(running: true, executionMs: 100, audioSeconds: 20, estimate: unknown, previous: 1.9) == 0.25)
        #expect(planner.next(running: true, executionMs: 8000, audioSeconds: 20, estimate: unknown, previous: 2) == 0.8)
        #expect(planner.next(running: true, executionMs: 60_000, audioSeconds: 20, estimate: unknown, previous: 0.25) == 2)
        // Never longer than `longest`, however long the chunk.
        #expect(planner.next(running: true, executionMs: 0, audioSeconds: 600, estimate: known, previous: 0) == 10)
    }

    @Test func pollWaitsEndOnTimeInDeadlineOrderAndACancelEndsOneAtOnce() async throws {
        let timer = PollTimer()
        let order = Locked<[Int]>([])
        let start = MonotonicClock.nanoseconds()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (index, seconds) in [0.3, 0.1, 0.2, 0.1].enumerated() {
                group.addTask {
                    try await timer.sleep(seconds: seconds)
                    #expect(MonotonicClock.nanoseconds() - start >= Int64(seconds * 1e9))
                    order.withLock { $0.append(index) }
                }
            }
            try await group.waitForAll()
        }
        #expect(order.withLock { $0 }.last == 0 && order.withLock { $0 }[2] == 2)
        let sleeper = Task { try await timer.sleep(seconds: 60) }
        try await Task.sleep(nanoseconds: 50_000_000)
        let cancelled = MonotonicClock.nanoseconds()
        sleeper.cancel()
        await #expect(throws: CancellationError.self) { try await sleeper.value }
        #expect(MonotonicClock.nanoseconds() - cancelled < 5_000_000_000)
        let already = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            try await timer.sleep(seconds: 60)
        }
        await #expect(throws: CancellationError.self) { try await already.value }
    }

    @Test func pollWaitsDueWithinTheBatchWindowEndInOneWakeUpAndNoneEarly() async throws {
        // Deadlines 50, 120 and 200 ms: with a 400 ms window the thread wakes once, 450 ms in,
        // and resumes all three; a wait registered later, due after that wake-up, is a batch of
        // its own. Without a window, each is its own wake-up (3 when a late wake-up merged two).
        for (window, expected) in [(Int64(400_000_000), 2...2), (0, 3...4)] {
            let timer = PollTimer(batchNanoseconds: window)
            let start = MonotonicClock.nanoseconds()
            try await withThrowingTaskGroup(of: Void.self) { group in
                for seconds in [0.2, 0.05, 0.12] {
                    group.addTask {
                        try await timer.sleep(seconds: seconds)
                        #expect(MonotonicClock.nanoseconds() - start >= Int64(seconds * 1e9))
                    }
                }
                try await group.waitForAll()
            }
            let elapsed = MonotonicClock.nanoseconds() - start
            if window > 0 { #expect(elapsed >= 450_000_000) }
            try await timer.sleep(seconds: 0.01)
            let statistics = timer.statistics
            #expect(statistics.resumed == 4)
            #expect(expected.contains(statistics.batches), "window \(window) ns: \(statistics.batches) wake-ups")
        }
    }

    @Test func cancelledLongWaitsLeaveTheHeapOnceTheyAreHalfOfIt() async throws {
        // A job's watchdog waits until the job's deadline and is cancelled when the job ends:
        // those waits must not pile up in the heap for an hour.
        let timer = PollTimer()
        let kept = Task { try await timer.sleep(seconds: 3600) }
        let sleepers = (0..<200).map { _ in Task { try await timer.sleep(seconds: 3600) } }
        for _ in 0..<500 where timer.heapCount < 201 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(timer.heapCount == 201)
        for sleeper in sleepers { sleeper.cancel() }
        for sleeper in sleepers { await #expect(throws: CancellationError.self) { try await sleeper.value } }
        // Swept at 101 of 201 cancelled, then at 64 of 100: 36 left, the kept wait among them.
        #expect(timer.heapCount == 36)
        try await timer.sleep(seconds: 0.05)
        kept.cancel()
        await #expect(throws: CancellationError.self) { try await kept.value }
    }

    @Test func waitersGetSlotsInArrivalOrderAndACancelledOneIsSkipped() async throws {
        let limit = LocalInFlightSlots(capacity: 1)
        try await limit.acquire(job: "a", chunk: 0)
        let order = Locked<[Int]>([])
        var waiters: [Task<Void, any Error>] = []
        for chunk in 1...5 {
            waiters.append(Task {
                try await limit.acquire(job: "a", chunk: chunk)
                order.withLock { $0.append(chunk) }
            })
            try await Task.sleep(for: .milliseconds(20))  // queued in this order
        }
        waiters[2].cancel()  // chunk 3
        await #expect(throws: CancellationError.self) { try await waiters[2].value }
        var holder = 0
        for expected in [1, 2, 4, 5] {
            await limit.release(job: "a", chunk: holder)
            for _ in 0..<200 where order.withLock({ $0.last }) != expected { try await Task.sleep(for: .milliseconds(5)) }
            holder = expected
        }
        #expect(order.withLock { $0 } == [1, 2, 4, 5])
        #expect(await limit.inUse == 1)
        await limit.release(job: "a", chunk: 5)
        #expect(await limit.inUse == 0)
    }

    @Test func theInFlightLimitNeverExceedsItsCapacity() async throws {
        let limit = LocalInFlightSlots(capacity: 3)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for chunk in 0..<20 {
                group.addTask {
                    try await limit.acquire(job: "a", chunk: chunk)
                    try await limit.acquire(job: "a", chunk: chunk)  // held already: no second slot
                    try await Task.sleep(for: .milliseconds(2))
                    await limit.release(job: "a", chunk: chunk)
                }
            }
            try await group.waitForAll()
        }
        #expect(await limit.peak == 3)
        #expect(await limit.inUse == 0)
        try await limit.acquire(job: "b", chunk: 0)
        try await limit.acquire(job: "b", chunk: 1)
        await limit.releaseAll(job: "b")
        #expect(await limit.inUse == 0)
    }

    @Test func aCancelledWaiterLeavesTheQueue() async throws {
        let limit = LocalInFlightSlots(capacity: 1)
        try await limit.acquire(job: "a", chunk: 0)
        let waiter = Task { try await limit.acquire(job: "a", chunk: 1) }
        try await Task.sleep(for: .milliseconds(20))
        waiter.cancel()
        await #expect(throws: CancellationError.self) { try await waiter.value }
        await limit.release(job: "a", chunk: 0)
        #expect(await limit.inUse == 0)
    }
}
