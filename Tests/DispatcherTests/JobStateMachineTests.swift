import Testing
import TalkMeshCore
import TalkMeshMessages
@testable import TalkMeshDispatcherService

@Suite struct JobStateMachineTests {
    static let all: [JobStatus] = [.inQueue, .running, .completed, .failed, .cancelled, .timedOut]
    static let legal: Set<[Int32]> = [[1, 2], [1, 4], [1, 5], [2, 3], [2, 4], [2, 5], [2, 6]]

    func record(_ status: JobStatus, chunks: Int = 0) throws -> JobRecord {
        var job = Job()
        job.id = "job_0123456789abcdef01234567"
        job.chunks = (0..<chunks).map { var chunk = JobChunk(); chunk.index = Int32($0); return chunk }
        var record = JobRecord(new: job)
        if status != .inQueue {
            if status != .failed && status != .cancelled { try record.move(to: .running, at: 1) }
            if status != .running { try record.move(to: status, at: 2) }
        }
        return record
    }

    @Test(arguments: all, all)
    func onlyTheDocumentedJobTransitionsAreWritable(from: JobStatus, to: JobStatus) throws {
        var record = try record(from)
        let allowed = Self.legal.contains([from.rawValue, to.rawValue])
        do {
            try record.move(to: to, at: 10)
            #expect(allowed, "\(from) → \(to) was written")
            #expect(record.status == to)
        } catch {
            #expect(!allowed, "\(from) → \(to) was refused")
            #expect(error.code == .illegalTransition)
            #expect(record.status == from)
        }
    }

    @Test func terminalStatesStampCompletionAndStage() throws {
        var record = try record(.running)
        try record.move(to: .completed, at: 42)
        #expect(record.job.completedAtUnixMs == 42 && record.job.stage == .stageDone && record.job.etaSeconds == 0)
    }

    @Test func chunkTransitionsFollowTheMachine() throws {
        var record = try record(.running, chunks: 2)
        #expect(throws: ServiceError.self) { try record.moveChunk(0, to: .chunkCompleted) }
        try record.moveChunk(0, to: .chunkSubmitting) { $0.attempts += 1 }
        try record.moveChunk(0, to: .chunkSubmitted) { $0.runpodJobID = "rp-1" }
        try record.moveChunk(0, to: .chunkRunning)
        try record.moveChunk(0, to: .chunkCompleted) { $0.videoKey = "v" }
        #expect(record.chunks[0].status == .chunkCompleted && record.chunks[0].runpodJobId == "rp-1" && record.chunks[0].attempts == 1)
        // Nothing follows COMPLETED, not even a cancel.
        #expect(throws: ServiceError.self) { try record.moveChunk(0, to: .chunkCancelled) }
        #expect(throws: ServiceError.self) { try record.moveChunk(5, to: .chunkSubmitting) }
    }

    @Test func aTerminalJobsChunksCanOnlyBeCancelled() throws {
        var record = try record(.running, chunks: 1)
        try record.moveChunk(0, to: .chunkSubmitting)
        try record.move(to: .cancelled, at: 3)
        #expect(throws: ServiceError.self) { try record.moveChunk(0, to: .chunkSubmitted) }
        try record.moveChunk(0, to: .chunkCancelled)
    }

    @Test func updateCannotChangeStates() throws {
        var record = try record(.running, chunks: 1)
        record.update { $0.progress = 0.5; $0.stage = .stageRendering }
        #expect(record.status == .running && record.job.progress == 0.5 && record.chunks[0].status == .chunkPending)
    }

    @Test func thePlanIsSetOnceWhileRunning() throws {
        var queued = try record(.inQueue)
        #expect(throws: ServiceError.self) { try queued.setPlan([JobChunk()], audioDurationSec: 1) }
        var record = try record(.running)
        try record.setPlan([JobChunk(), JobChunk()], audioDurationSec: 9)
        #expect(record.chunks.count == 2 && record.chunks.allSatisfy { $0.status == .chunkPending })
        #expect(throws: ServiceError.self) { try record.setPlan([JobChunk()], audioDurationSec: 1) }
    }
}
