import Testing
import TalkMeshBase

@Suite("Base: clocks and locks")
struct ClockTests {
    @Test("the monotonic clock never goes back, and deadlines saturate instead of overflowing")
    func monotonic() {
        var last = MonotonicClock.nanoseconds()
        for _ in 0..<10_000 {
            let now = SystemTicks().nanoseconds()
            #expect(now >= last)
            last = now
        }
        #expect(MonotonicClock.deadline(after: Int64.max, from: 1) == Int64.max)
        #expect(MonotonicClock.deadline(after: -5, from: 100) == 100)
        #expect(MonotonicClock.deadline(after: 5, from: 100) == 105)
    }

    @Test("the system ticks' sleep waits at least as long as asked, on the same clock")
    func systemSleep() async throws {
        let ticks = SystemTicks()
        let start = ticks.nanoseconds()
        try await ticks.sleep(nanoseconds: 20_000_000)
        #expect(ticks.nanoseconds() - start >= 20_000_000)
    }

    @Test("a cancelled sleep throws")
    func cancelledSleep() async {
        let task = Task { try await SystemTicks().sleep(nanoseconds: 60_000_000_000) }
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
    }

    @Test("Locked serialises concurrent updates")
    func locked() async {
        let counter = Locked(0)
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<8 {
                group.addTask { for _ in 0..<10_000 { counter.withLock { $0 += 1 } } }
            }
        }
        #expect(counter.withLock { $0 } == 80_000)
    }

    @Test("the wall clock is Unix milliseconds")
    func wall() {
        let now = SystemWallClock().nowUnixMs()
        #expect(now > 1_700_000_000_000)  // after November 2023
        #expect(now < 4_102_444_800_000)  // before 2100
    }
}
