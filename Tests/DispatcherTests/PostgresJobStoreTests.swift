import Foundation
import Testing
import TalkMeshCore
import TalkMeshMessages
@testable import TalkMeshDispatcherService

/// The lease rules, on a real PostgreSQL server: two stores on one database are two replicas.
@Suite struct PostgresJobStoreTests {
    func database() throws -> String { try PostgresTestServer.shared.get().newDatabase() }

    func replica(_ url: String, lease: Double = 30) throws -> PostgresJobStore {
        try PostgresJobStore(url: url, leaseSeconds: lease, connections: 2)
    }

    func newJob(owner: String = "o", key: String = "", created: Int64 = 1) -> JobRecord {
        newJobRecord(owner: owner, key: key, created: created)
    }

    /// Ends a job's lease now, as if its holder had stopped renewing it long ago: no sleep that a
    /// loaded machine (a sanitizer run) could stretch past a short lease before it is checked.
    func expireLease(_ id: String, in store: PostgresJobStore) async throws {
        try await store.pool.with { db in
            _ = try db.execute("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE id = $1", [.text(id)])
        }
    }

    @Test func twoReplicasNeverClaimTheSameJob() async throws {
        let url = try database()
        let a = try replica(url), b = try replica(url)
        let creator = try replica(url)
        var ids: [String] = []
        for created in 1...10 {
            let id = try await creator.create(newJob(created: Int64(created))).record.id
            try await creator.release(id)  // as a Dispatcher without room does
            ids.append(id)
        }
        async let fromA = a.claimUnfinished(limit: 6, running: [])
        async let fromB = b.claimUnfinished(limit: 6, running: [])
        let (claimedA, claimedB) = try await (fromA, fromB)
        #expect(Set(claimedA).isDisjoint(with: claimedB))
        #expect(Set(claimedA + claimedB) == Set(ids))
        // Held jobs are nobody else's while their lease runs.
        #expect(try await creator.claimUnfinished(limit: 10, running: []).isEmpty)
    }

    @Test func anExpiredLeaseIsTakenOverAndTheOldOwnerIsFencedOut() async throws {
        let url = try database()
        let a = try replica(url), b = try replica(url)
        var record = try await a.create(newJob()).record
        try record.move(to: .running, at: 2)
        record = try await a.update(record)  // A holds it: its write goes through
        #expect(try await b.claimUnfinished(limit: 5, running: []).isEmpty)
        try await expireLease(record.id, in: b)  // A paused past its lease
        #expect(try await b.claimUnfinished(limit: 5, running: []) == [record.id])
        // A wakes up: its write (same version it last stored) is refused as LEASE_LOST, not a conflict.
        var stale = record
        stale.update { $0.resizedImageKey = "from-a" }
        await #expect { try await a.update(stale) } throws: { ($0 as? ServiceError)?.code == .leaseLost }
        // B, the new owner, writes from the stored state; A's heartbeat reports the job lost.
        guard var current = try await b.get(record.id) else { Issue.record("job missing"); return }
        current.update { $0.resizedImageKey = "from-b" }
        _ = try await b.update(current)
        #expect(try await b.get(record.id)?.job.resizedImageKey == "from-b")
        #expect(try await a.heartbeat() == [])  // the failed write already dropped it
        #expect(!a.holding.contains(record.id) && b.holding.contains(record.id))
    }

    @Test func aDriverThatLostItsLeaseNeverWritesAsABystander() async throws {
        let url = try database()
        let a = try replica(url, lease: 0.5), b = try replica(url, lease: 0.5)
        var record = try await a.create(newJob()).record
        try record.move(to: .running, at: 2)
        record = try await a.update(record, asHolder: true)
        try await Task.sleep(for: .milliseconds(700))
        #expect(try await b.claimUnfinished(limit: 5, running: []) == [record.id])
        #expect(try await a.heartbeat() == [record.id])  // A learns it lost the job and forgets it
        // A's driver, reloading the stored state after a conflict, still cannot write: it is
        // fenced though the version is current; a bystander's write (a cancel) is not.
        guard var current = try await a.get(record.id) else { Issue.record("job missing"); return }
        current.update { $0.resizedImageKey = "from-stale-driver" }
        await #expect { try await a.update(current, asHolder: true) } throws: { ($0 as? ServiceError)?.code == .leaseLost }
        #expect(try await a.get(record.id)?.job.resizedImageKey != "from-stale-driver")
        try current.move(to: .cancelled, at: 3)
        _ = try await a.update(current)
        #expect(try await a.get(record.id)?.status == .cancelled)
    }

    @Test func aHeartbeatKeepsTheLeaseAndReportsWhatWasLost() async throws {
        let url = try database()
        // Heartbeats 0.7 s apart keep 2 s leases past their first term. (0.2 s against 0.6 s left
        // too little room: a TSan run on a loaded machine once took over 0.5 s between two calls.)
        let a = try replica(url, lease: 2), b = try replica(url, lease: 2)
        let kept = try await a.create(newJob(created: 1)).record.id
        let lost = try await a.create(newJob(created: 2)).record.id
        for _ in 0..<4 {
            try await Task.sleep(for: .milliseconds(700))
            #expect(try await a.heartbeat().isEmpty)
        }
        #expect(try await b.claimUnfinished(limit: 5, running: []).isEmpty, "renewed leases hold")
        // Only `lost` goes stale (as if A stopped renewing it): B claims it, A's heartbeat says so.
        try await expireLease(lost, in: b)
        #expect(try await b.claimUnfinished(limit: 5, running: []) == [lost])
        #expect(try await a.heartbeat() == [lost])
        #expect(a.holding == [kept])
    }

    /// The bench once left a job leased to its replica with no runner: a heartbeat judged a job
    /// created during its renewal as lost, and later heartbeats renewed the orphaned row forever.
    @Test func aRowLeasedToAReplicaThatHoldsNoRunnerIsReleasedAfterTwoHeartbeats() async throws {
        let url = try database()
        let a = try replica(url), b = try replica(url)
        let id = try await a.create(newJob(created: 1)).record.id
        // As the race left it: the store says A holds the lease, A itself holds nothing.
        try await a.release(id)
        try await a.pool.with { db in
            _ = try db.execute("UPDATE jobs SET lease_owner = $2, lease_until = now() + interval '30 seconds' WHERE id = $1",
                               [.text(id), .text(a.replica)])
        }
        #expect(a.holding.isEmpty)
        #expect(try await b.claimUnfinished(limit: 5, running: []).isEmpty, "the lease looks alive")
        #expect(try await a.heartbeat().isEmpty)  // first sight of the orphan: kept, it may be a claim in flight
        #expect(try await b.claimUnfinished(limit: 5, running: []).isEmpty)
        #expect(try await a.heartbeat().isEmpty)  // still nobody's runner here: released
        #expect(try await b.claimUnfinished(limit: 5, running: []) == [id])
    }

    @Test func aReleasedJobIsClaimableAtOnceAndATerminalOneNever() async throws {
        let url = try database()
        let a = try replica(url), b = try replica(url)
        var finished = try await a.create(newJob(created: 1)).record
        let open = try await a.create(newJob(created: 2)).record
        try finished.move(to: .running, at: 2)
        finished = try await a.update(finished)
        try finished.move(to: .completed, at: 3)
        _ = try await a.update(finished)
        try await a.release(finished.id)
        try await a.release(open.id)
        #expect(try await b.claimUnfinished(limit: 5, running: []) == [open.id])
    }

    @Test func aWriterThatHoldsNoLeaseWritesByVersionAndTheOwnerSeesAConflict() async throws {
        let url = try database()
        let owner = try replica(url), other = try replica(url)
        var record = try await owner.create(newJob()).record
        try record.move(to: .running, at: 2)
        record = try await owner.update(record)
        // A cancel on the other replica: compare-and-swap on the version.
        guard var cancelled = try await other.get(record.id) else { Issue.record("job missing"); return }
        try cancelled.move(to: .cancelled, at: 3)
        _ = try await other.update(cancelled)
        var next = record
        next.update { $0.resizedImageKey = "late" }
        await #expect { try await owner.update(next) } throws: { ($0 as? ServiceError)?.code == .storeConflict }
    }

    @Test func idempotencyAndPagingMatchTheSQLiteStore() async throws {
        let store = try replica(try database())
        let first = try await store.create(newJob(owner: "a", key: "k", created: 1))
        let again = try await store.create(newJob(owner: "a", key: "k", created: 2))
        #expect(first.created && !again.created && again.record.id == first.record.id)
        var ids: [String] = []
        for created in [5, 1, 3, 3, 9] as [Int64] { ids.append(try await store.create(newJob(owner: "p", created: created)).record.id) }
        var seen: [String] = []
        var token: PageToken?
        repeat {
            let page = try await store.list(JobQuery(owner: "p", pageSize: 2, after: token))
            seen += page.jobs.map(\.id)
            token = page.nextPageToken.isEmpty ? nil : try PageToken(parsing: page.nextPageToken)
        } while token != nil
        let threes = [ids[2], ids[3]].sorted(by: >)
        #expect(seen == [ids[4], ids[0]] + threes + [ids[1]])
        #expect(try await store.list(JobQuery(owner: "p", status: .completed)).jobs.isEmpty)
    }

    @Test func inFlightSlotsHoldAcrossReplicasAndBelongToChunks() async throws {
        let url = try database()
        let a = try replica(url), b = try replica(url)
        let slotsA = try a.inFlightSlots(capacity: 2), slotsB = try b.inFlightSlots(capacity: 2)
        let job1 = try await a.create(newJob(created: 1)).record.id
        let job2 = try await b.create(newJob(created: 2)).record.id
        try await slotsA.acquire(job: job1, chunk: 0)
        try await slotsB.acquire(job: job2, chunk: 0)
        // Full: B's next chunk waits until A gives one back.
        let waiting = Task { try await slotsB.acquire(job: job2, chunk: 1) }
        try await Task.sleep(for: .milliseconds(300))
        #expect(try await (slotsA as! PostgresInFlightSlots).inUse() == 2)
        await slotsA.release(job: job1, chunk: 0)
        try await waiting.value
        // A chunk that holds a slot gets it again at once — on any replica (a takeover).
        try await slotsA.acquire(job: job2, chunk: 1)
        #expect(try await (slotsA as! PostgresInFlightSlots).inUse() == 2)
        // A job that ended frees its slots even if nobody released them.
        guard var ended = try await b.get(job2) else { Issue.record("job missing"); return }
        try ended.move(to: .cancelled, at: 5)
        _ = try await b.update(ended)
        try await slotsA.acquire(job: job1, chunk: 1)
        try await slotsA.acquire(job: job1, chunk: 2)
        #expect(try await (slotsA as! PostgresInFlightSlots).inUse() == 2)
    }

    @Test func theRequestBudgetHoldsAcrossReplicas() async throws {
        let url = try database()
        let limit = 20, window = 1.0
        let gates = [try replica(url).requestGate(route: "status", limit: limit, window: window),
                     try replica(url).requestGate(route: "status", limit: limit, window: window)]
        let times = try await withThrowingTaskGroup(of: Double.self) { group in
            for request in 0..<50 {
                group.addTask {
                    try await gates[request % 2].acquire()
                    return Date().timeIntervalSinceReferenceDate
                }
            }
            return try await group.reduce(into: [Double]()) { $0.append($1) }.sorted()
        }
        // The times are when each task saw its grant, not when the database made it: under a sanitizer on two cores
        // a task resumes up to a few hundred milliseconds late, and grants made apart can be seen together. So the
        // window is 0.8 of RunPod's: the gate's own bound there is burst + rate × 0.8 = 2 + 18 × 0.8 = 16, which
        // leaves 0.2 s of lateness before a correct gate could look like `limit` + 1, while a gate that let through
        // a third more than its rate (or kept a bucket per replica: twice) still shows more than `limit`.
        var busiest = 0, start = 0
        for end in times.indices {
            while times[end] - times[start] >= window * 0.8 { start += 1 }
            busiest = max(busiest, end - start + 1)
        }
        #expect(busiest <= limit)
        // And over the whole run: 50 grants at 18 a second after a burst of 2 take 48 / 18 = 2.7 s; even a full window's
        // worth at once and `limit` a second after it would take 1.5 s, and less than that is over the budget.
        #expect(times.last! - times.first! >= Double(50 - limit) / Double(limit) * window)
    }

    @Test func aReplicaTakesBudgetTokensInBatchesAndOneRoundTripServesThem() async throws {
        let url = try database()
        // RunPod's /status limit: a bucket of 180 − 162 × 0.5 = 99 tokens, taken 16 at a time.
        let gate = try replica(url).requestGate(route: "status", limit: 1800, window: 10)
        let db = try PostgresConnection(url: url)
        func row() throws -> (tokens: Double, updated: String) {
            let result = try db.execute("SELECT tokens, updated::text FROM runpod_budget WHERE route = 'status'")
            return (result.double(0, 0), result.text(0, 1))
        }
        #expect(try row().tokens == 99)
        try await gate.acquire()
        let first = try row()
        #expect(first.tokens == 83)
        for _ in 0..<15 { try await gate.acquire() }
        // Fifteen more requests, no write: the row is as the first fetch left it.
        let after = try row()
        #expect(after.tokens == first.tokens && after.updated == first.updated)
        try await gate.acquire()
        #expect(try row().updated != first.updated)
    }

    @Test func retentionDeletesBlobsThenJobsAndKeepsTombstones() async throws {
        let clock = ManualClock()
        clock.now = 9_000
        try await checkRetentionRules(try PostgresJobStore(url: try database(), connections: 2, clock: clock), now: 9_000)
    }

    @Test func pendingWebhooksAreFoundWhenDue() async throws {
        try await checkWebhookQueue(try PostgresJobStore(url: try database(), connections: 2))
    }

    @Test func oneReplicaSweepsAtATime() async throws {
        let url = try database()
        let a = try replica(url), b = try replica(url)
        // Leases that must hold are an hour long: the database's clock is the wall clock, and a CI
        // machine once stalled for over a minute between two statements here (a 60 s lease ran out).
        #expect(try await a.claimSweep(seconds: 3_600))
        #expect(try await !b.claimSweep(seconds: 3_600))
        #expect(try await a.claimSweep(seconds: 0.5))  // the holder keeps it by sweeping again (for a shorter time here)
        try await Task.sleep(for: .milliseconds(1_500))
        #expect(try await b.claimSweep(seconds: 3_600))  // a holder gone quiet loses it
        #expect(try await !a.claimSweep(seconds: 3_600))
    }

    @Test func notificationsCarryEveryStoredVersion() async throws {
        let url = try database()
        let writer = try replica(url), reader = try replica(url)
        let seen = ChangeLog()
        reader.observe { seen.add($0) }
        try await Task.sleep(for: .milliseconds(200))
        var record = try await writer.create(newJob()).record
        try record.move(to: .running, at: 2)
        record = try await writer.update(record)
        let deadline = Date().addingTimeInterval(5)
        while seen.versions(of: record.id).count < 2 && Date() < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(seen.versions(of: record.id) == [1, 2])
        _ = try await writer.heartbeat()  // lease renewals are not changes
        try await Task.sleep(for: .milliseconds(200))
        #expect(seen.versions(of: record.id) == [1, 2])
    }

    @Test func concurrentWritesGoInBatchesEachWithItsOwnAnswer() async throws {
        let url = try database()
        let store = try replica(url)
        var records: [JobRecord] = []
        for created in 1...60 { records.append(try await store.create(newJob(created: Int64(created))).record) }
        // 60 writes at once, a third of them stale (a version already written): the stale ones
        // are refused as conflicts, the others stored, whichever batch each rode in.
        for index in records.indices where index % 3 == 0 {
            var first = records[index]
            try first.move(to: .running, at: 2)
            _ = try await store.update(first, asHolder: true)
        }
        let before = store.batcher.totals
        let outcomes = try await withThrowingTaskGroup(of: (Int, Bool).self) { group in
            for (index, record) in records.enumerated() {
                group.addTask {
                    var next = record
                    next.update { $0.resizedImageKey = "image-\(index)" }
                    do {
                        _ = try await store.update(next, asHolder: true)
                        return (index, true)
                    } catch let error as ServiceError where error.code == .storeConflict {
                        return (index, false)
                    }
                }
            }
            return try await group.reduce(into: [Int: Bool]()) { $0[$1.0] = $1.1 }
        }
        for (index, record) in records.enumerated() {
            #expect(outcomes[index] == (index % 3 != 0))
            let stored = try #require(try await store.get(record.id))
            #expect(stored.job.resizedImageKey == (index % 3 == 0 ? "" : "image-\(index)"))
        }
        // Fewer batches than statements: writes that arrived together went together.
        let after = store.batcher.totals
        #expect(after.statements - before.statements == 60)
        #expect(after.batches - before.batches < 60)
    }

    @Test func statementsQueuedOnTheWorkflowThreadGoWhenItRunsOutOfWork() async throws {
        let store = try replica(try database())
        let workflow = WorkflowExecutor(name: "workflow-test")
        // A hold far longer than the test: only running out of work (or `most`) sends them.
        let batcher = try PostgresBatcher(pool: store.pool, most: 8, workflow: workflow, holdNanoseconds: 60_000_000_000)
        let whileBusy = await Task(executorPreference: workflow) {
            for _ in 0..<3 { batcher.send("SELECT 1", []) }
            usleep(50_000)  // still busy: nothing has gone
            return batcher.totals
        }.value
        #expect(whileBusy.batches == 0 && whileBusy.statements == 0)
        for _ in 0..<200 where batcher.totals.statements < 3 { try await Task.sleep(for: .milliseconds(5)) }
        #expect(batcher.totals.batches == 1 && batcher.totals.statements == 3)  // one batch once idle
        // A statement from another thread goes at once (after the batch in flight: once it is
        // answered, so is that one).
        #expect(try await batcher.execute("SELECT 2", []) { $0.int64(0, 0) } == 2)
        #expect(batcher.totals.batches == 2 && batcher.totals.statements == 4)
        // `most` waiting go at once, busy or not.
        let atMost = await Task(executorPreference: workflow) {
            for _ in 0..<8 { batcher.send("SELECT 1", []) }
            usleep(50_000)
            return batcher.totals
        }.value
        #expect(atMost.batches == 3 && atMost.statements == 12)
    }

    @Test func aBatchOnAConnectionTheServerDroppedFailsAndTheNextReconnects() async throws {
        let url = try database()
        let store = try replica(url)
        let batcher = try PostgresBatcher(pool: store.pool)
        let before = try await batcher.execute("SELECT pg_backend_pid()", []) { $0.int64(0, 0) }
        let admin = try PostgresConnection(url: url)
        #expect(try admin.execute("SELECT pg_terminate_backend($1)", [.int(before)]).text(0, 0) == "t")
        // The statements sent on the dropped connection fail, all of them, as the store being
        // unavailable (whether such a write committed is unknown, as for any lost connection).
        let outcomes = await withTaskGroup(of: String.self) { group -> [String] in
            for _ in 0..<10 {
                group.addTask {
                    do {
                        try await batcher.execute("SELECT 1", []) { _ in }
                        return "ok"
                    } catch {
                        return (error as? ServiceError)?.code.rawValue ?? "\(error)"
                    }
                }
            }
            var all: [String] = []
            for await outcome in group { all.append(outcome) }
            return all
        }
        #expect(outcomes.count == 10)
        #expect(outcomes.contains(ErrorCode.storeUnavailable.rawValue))
        #expect(outcomes.allSatisfy { $0 == "ok" || $0 == ErrorCode.storeUnavailable.rawValue })
        // The next batch goes on a new connection.
        let after = try await batcher.execute("SELECT pg_backend_pid()", []) { $0.int64(0, 0) }
        #expect(after != before)
    }

    @Test func aFailingStatementInABatchTakesNoneOfTheOthersWithIt() async throws {
        let url = try database()
        let store = try replica(url)
        let db = try PostgresConnection(url: url)
        try db.execute("CREATE TABLE batch_probe (n integer PRIMARY KEY)")
        let batcher = try PostgresBatcher(pool: store.pool)
        // Forty inserts and, among them, five that break the primary key: the five fail with
        // their own error, the others are stored, batched or not.
        let results = await withTaskGroup(of: (Int, Bool).self) { group in
            for n in 0..<45 {
                group.addTask {
                    let value = n < 40 ? n : n - 40  // 40…44 repeat 0…4
                    do {
                        try await batcher.execute("INSERT INTO batch_probe (n) VALUES ($1)", [.int(value)]) { _ in }
                        return (n, true)
                    } catch {
                        return (n, false)
                    }
                }
            }
            return await group.reduce(into: [Int: Bool]()) { $0[$1.0] = $1.1 }
        }
        #expect(try db.execute("SELECT count(*) FROM batch_probe").int64(0, 0) == 40)
        // For each repeated value exactly one of its two inserts won.
        for value in 0..<5 { #expect(results[value]! != results[value + 40]!) }
        #expect((5..<40).allSatisfy { results[$0] == true })
    }

    @Test func aReplicaIsNotToldOfItsOwnWritesButOfOthers() async throws {
        let url = try database()
        let owner = try replica(url), other = try replica(url)
        let seen = ChangeLog()
        owner.observe { seen.add($0) }
        try await Task.sleep(for: .milliseconds(200))
        var record = try await owner.create(newJob()).record
        for step in 0..<20 {
            record.update { $0.resizedImageKey = "step-\(step)" }
            record = try await owner.update(record, asHolder: true)
        }
        // A bystander's write (a cancel on another replica) is a change the owner hears of.
        try record.move(to: .cancelled, at: 3)
        let cancelled = try await other.update(record)
        let deadline = Date().addingTimeInterval(5)
        while seen.versions(of: record.id).isEmpty && Date() < deadline { try await Task.sleep(for: .milliseconds(20)) }
        try await Task.sleep(for: .milliseconds(100))
        #expect(seen.versions(of: record.id) == [cancelled.job.version])
    }

    @Test func aListenerWhoseConnectionDropsReconnectsAndTellsToReRead() async throws {
        let url = try database()
        let admin = try PostgresConnection(url: url)
        let owner = try replica(url)
        // The owner's listener is the one connection on this database that has run LISTEN.
        let listening = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        var pids: [Int64] = []
        for _ in 0..<200 {
            let result = try admin.execute(listening)
            pids = (0..<result.rows).map { result.int64($0, 0) }
            if !pids.isEmpty { break }
            try await Task.sleep(for: .milliseconds(10))
        }
        try #require(pids.count == 1)
        let other = try replica(url)
        let seen = ChangeLog()
        owner.observe { seen.add($0) }
        var record = try await owner.create(newJob()).record
        #expect(try admin.execute("SELECT pg_terminate_backend($1)", [.int(pids[0])]).text(0, 0) == "t")
        // Until it is back (at least half a second), the thread watches no closed descriptor: a
        // closed one would make its every poll return at once.
        let executor = owner.batcher.executor
        var closedWatched: [Int32] = []
        let deadline = Date().addingTimeInterval(10)
        while !seen.contains(.resynchronize) && Date() < deadline {
            let watched = await Task(executorPreference: executor) { executor.watchedDescriptors }.value
            closedWatched += watched.filter { fcntl($0, F_GETFD) == -1 }
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(seen.contains(.resynchronize))
        #expect(closedWatched.isEmpty)
        // Listening again: another replica's write is heard.
        try record.move(to: .cancelled, at: 3)
        let cancelled = try await other.update(record)
        while seen.versions(of: record.id).isEmpty && Date() < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(seen.versions(of: record.id) == [cancelled.job.version])
    }

    @Test func anUnreachableServerIsStoreUnavailable() async throws {
        #expect { try PostgresJobStore(url: "postgres://postgres:secret@127.0.0.1:9/none?connect_timeout=2") } throws: { error in
            guard let error = error as? ServiceError else { return false }
            return error.code == .storeUnavailable && !"\(error)".contains("secret")
        }
    }
}

final class ChangeLog: @unchecked Sendable {
    private let lock = NSLock()
    private var changes: [StoreChange] = []
    func add(_ change: StoreChange) { lock.withLock { changes.append(change) } }
    func contains(_ change: StoreChange) -> Bool { lock.withLock { changes.contains(change) } }
    func versions(of id: String) -> [Int64] {
        lock.withLock { changes.compactMap { if case .job(id, let version) = $0 { return version } else { return nil } } }
    }
}
