import Glibc
import Testing
import TalkMeshBase
@testable import TalkMeshDispatcherService

@Suite struct WorkflowExecutorTests {
    /// The thread a piece of work runs on, as a number.
    static func thread() -> UInt { UInt(bitPattern: Int(bitPattern: UInt(pthread_self()))) }

    @Test func workflowsRunOnItsOneThreadAcrossAwaitsAndChildTasks() async throws {
        let executor = WorkflowExecutor(name: "workflow-test")
        let timer = PollTimer()
        let threads = try await Task(executorPreference: executor) { () async throws -> Set<UInt> in
            var seen: Set<UInt> = [Self.thread()]
            // Resumed by another thread (the poll timer's): back on the workflow thread.
            try await timer.sleep(seconds: 0.02)
            seen.insert(Self.thread())
            // Child tasks keep the preference, as a job's chunk drivers do.
            let children = try await withThrowingTaskGroup(of: [UInt].self) { group in
                for index in 0..<20 {
                    group.addTask {
                        let before = Self.thread()
                        try await timer.sleep(seconds: 0.001 * Double(index % 5))
                        return [before, Self.thread()]
                    }
                }
                return try await group.reduce(into: [UInt]()) { $0 += $1 }
            }
            seen.formUnion(children)
            return seen
        }.value
        #expect(threads.count == 1)
        #expect(!threads.contains(Self.thread()))
    }

    @Test func workEnqueuedFromItsOwnThreadWakesNobody() async throws {
        let executor = WorkflowExecutor(name: "workflow-test")
        // Let the thread go to sleep first.
        try await Task.sleep(nanoseconds: 20_000_000)
        let before = executor.wakeUpCount
        let total = await Task(executorPreference: executor) { () async -> Int in
            // 200 child tasks, each enqueued (and resumed) from the workflow thread itself.
            await withTaskGroup(of: Int.self) { group in
                for index in 0..<200 { group.addTask { await Task.yield(); return index } }
                return await group.reduce(0, +)
            }
        }.value
        #expect(total == 199 * 200 / 2)
        // One wake-up: the task's first enqueue, from this test's thread.
        #expect(executor.wakeUpCount - before == 1)
    }

    @Test func aWatchedSocketIsServedOnItsThreadBusyOrNotUntilUnwatched() async throws {
        let executor = WorkflowExecutor(name: "workflow-test")
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        let (reader, writer) = (pair[0], pair[1])
        defer { close(reader); close(writer) }
        let seen = Locked<[(byte: UInt8, thread: UInt)]>([])
        func send(_ byte: UInt8) { var byte = byte; #expect(write(writer, &byte, 1) == 1) }
        func waitFor(_ count: Int) async throws {
            for _ in 0..<400 where seen.withLock({ $0.count }) < count { try await Task.sleep(for: .milliseconds(5)) }
        }
        await Task(executorPreference: executor) {
            executor.watch(reader, events: Int16(POLLIN)) { _ in
                var byte: UInt8 = 0
                _ = read(reader, &byte, 1)
                seen.withLock { $0.append((byte, Self.thread())) }
                if byte == 3 { executor.unwatch(reader) }
            }
        }.value
        // Asleep: the socket wakes the thread.
        send(1)
        try await waitFor(1)
        // Busy with one short piece of work after another: served between them.
        let servedWhileBusy = await Task(executorPreference: executor) { () async -> Bool in
            send(2)
            let start = MonotonicClock.nanoseconds()
            while seen.withLock({ $0.count }) < 2 && MonotonicClock.nanoseconds() - start < 5_000_000_000 { await Task.yield() }
            return seen.withLock { $0.count } == 2
        }.value
        #expect(servedWhileBusy)
        send(3)
        try await waitFor(3)
        // Unwatched after 3: 4 stays unread.
        send(4)
        try await Task.sleep(for: .milliseconds(100))
        let bytes = seen.withLock { $0 }
        #expect(bytes.map(\.byte) == [1, 2, 3])
        #expect(Set(bytes.map(\.thread)).count == 1 && !bytes.contains { $0.thread == Self.thread() })
    }
}
