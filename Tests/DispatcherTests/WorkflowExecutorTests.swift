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
}
