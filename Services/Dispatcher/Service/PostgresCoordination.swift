import TalkMeshBase
import TalkMeshCore

/// The deployment-wide cap on RunPod jobs in flight: `capacity` rows in `runpod_slots`, each free
/// or held by one chunk (job id, chunk index). A slot is the chunk's, not the replica's: whoever
/// drives the job next finds it held and keeps it. A slot whose job has ended is free even if
/// nobody released it (a replica died between the two writes).
///
/// Waiters queue in the process; only the head of the queue asks the database, woken when any
/// replica frees a slot (NOTIFY) or after a short pause, so a thousand waiting chunks cost one
/// query at a time, not a thousand. The queue's own tasks run on `executor` (the Dispatcher's
/// workflow thread, where the waiters are): on Swift's pool each freed slot woke a pool thread.
final class PostgresInFlightSlots: InFlightSlots {
    private let pool: PostgresPool
    private let batcher: PostgresBatcher
    private let replica: String
    let capacity: Int
    private let queue: SlotQueue
    private let executor: (any TaskExecutor)?
    /// A wake of the queue is on its way: notices that come meanwhile add nothing to it.
    private let wakePending = Locked(false)

    /// Makes sure the table has `capacity` slots (every replica must use the same number).
    init(pool: PostgresPool, batcher: PostgresBatcher, replica: String, capacity: Int, executor: (any TaskExecutor)? = nil) throws {
        self.pool = pool
        self.batcher = batcher
        self.replica = replica
        self.capacity = max(1, capacity)
        self.executor = executor
        queue = SlotQueue(executor: executor)
        let db = try PostgresConnection(url: pool.url)
        try db.execute("INSERT INTO runpod_slots (slot) SELECT generate_series(1, $1::integer) ON CONFLICT DO NOTHING", [.int(self.capacity)])
        try db.execute("DELETE FROM runpod_slots WHERE slot > $1 AND job_id IS NULL", [.int(self.capacity)])
    }

    func acquire(job: String, chunk: Int) async throws {
        try Task.checkCancellation()
        if try await claim(job: job, chunk: chunk) { return }
        try await queue.wait(job: job, chunk: chunk) { job, chunk in try await self.claimTelling(job: job, chunk: chunk) }
    }

    /// The chunk's slot (held already, or a free one taken now); false when none is free.
    func claim(job: String, chunk: Int) async throws -> Bool {
        try await claimTelling(job: job, chunk: chunk).claimed
    }

    /// `claim`, and whether another slot was free beside the one taken: the queue asks for the
    /// next waiter at once only then, not to be told "none" once per freed slot.
    func claimTelling(job: String, chunk: Int) async throws -> (claimed: Bool, more: Bool) {
        let replica = self.replica, capacity = self.capacity
        return try await batcher.execute("""
                WITH mine AS (SELECT slot FROM runpod_slots WHERE job_id = $1 AND chunk = $2),
                free AS (
                    SELECT s.slot FROM runpod_slots s
                    WHERE s.slot <= $4 AND (s.job_id IS NULL
                        OR NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = s.job_id AND j.status IN (1, 2)))
                    ORDER BY s.slot LIMIT 2 FOR UPDATE SKIP LOCKED),
                taken AS (
                    UPDATE runpod_slots SET job_id = $1, chunk = $2, holder = $3, taken_at = now()
                    WHERE NOT EXISTS (SELECT 1 FROM mine) AND slot = (SELECT min(slot) FROM free)
                    RETURNING slot)
                SELECT slot, (SELECT count(*) FROM free) > 1 FROM mine UNION ALL SELECT slot, (SELECT count(*) FROM free) > 1 FROM taken
                """, [.text(job), .int(chunk), .text(replica), .int(capacity)]) { result in
            (result.rows > 0, result.rows > 0 && result.text(0, 1) == "t")
        }
    }

    func release(job: String, chunk: Int) async {
        free("job_id = $1 AND chunk = $2", [.text(job), .int(chunk)])
    }

    func releaseAll(job: String) async {
        free("job_id = $1", [.text(job)])
    }

    /// Frees slots in the next batch, without waiting: nothing the caller does next depends on it
    /// (its own next chunk claims like any other). A release that fails is not lost: a slot
    /// whose job has ended is free for the next claim anyway.
    private func free(_ condition: String, _ values: [PGValue]) {
        batcher.send("""
            WITH freed AS (UPDATE runpod_slots SET job_id = NULL, chunk = NULL, holder = NULL, taken_at = NULL WHERE \(condition) RETURNING slot)
            SELECT pg_notify('talkmesh_slots', '') FROM freed
            """, values)
    }

    /// A slot was freed somewhere: the head of the queue asks again now. Notices come in bursts
    /// (one per freed slot); one task carries all that come before it runs.
    func wake() {
        guard wakePending.withLock({ pending in defer { pending = true }; return !pending }) else { return }
        Task(executorPreference: executor) { [queue, wakePending] in
            wakePending.withLock { $0 = false }
            await queue.wake()
        }
    }

    /// Slots held in the whole deployment (for tests and metrics).
    func inUse() async throws -> Int {
        try await pool.with { db in
            Int(try db.execute("""
                SELECT count(*) FROM runpod_slots s WHERE s.job_id IS NOT NULL
                AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = s.job_id AND j.status IN (1, 2))
                """).int64(0, 0))
        }
    }
}

/// Chunks waiting for a slot, first come first served; one pump asks the database for the head.
/// When no slot is free it waits for a freed slot's notice, or the next tick of a 250 ms ticker
/// (a notice may be lost while the listener reconnects): one timer for the pump's whole run, not
/// one per wait. Waiters are kept from `head` on: a thousand may wait, and taking the first shifts
/// none.
private actor SlotQueue {
    private let executor: (any TaskExecutor)?

    init(executor: (any TaskExecutor)?) {
        self.executor = executor
    }

    private struct Waiter {
        let id: UInt64
        let job: String
        let chunk: Int
        let continuation: CheckedContinuation<Void, any Error>
    }

    private var waiters: [Waiter?] = []
    private var head = 0
    private var next: UInt64 = 0
    private var pumping = false
    private var woken = false
    private var sleeper: CheckedContinuation<Void, Never>?

    func wait(job: String, chunk: Int, claim: @escaping @Sendable (String, Int) async throws -> (claimed: Bool, more: Bool)) async throws {
        next += 1
        let id = next
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                waiters.append(Waiter(id: id, job: job, chunk: chunk, continuation: continuation))
                if !pumping {
                    pumping = true
                    Task(executorPreference: executor) { await self.pump(claim) }
                }
            }
        } onCancel: {
            Task(executorPreference: executor) { await self.cancel(id) }
        }
    }

    /// The first waiter, skipping the places of those gone.
    private func first() -> Waiter? {
        while head < waiters.count {
            if let waiter = waiters[head] { return waiter }
            head += 1
        }
        return nil
    }

    /// Takes the waiter `id` out of the line.
    private func remove(_ id: UInt64) -> Waiter? {
        guard let index = waiters[head...].firstIndex(where: { $0?.id == id }), let waiter = waiters[index] else { return nil }
        waiters[index] = nil
        if index == head { head += 1 }
        if head >= 64 && head * 2 >= waiters.count {
            waiters.removeFirst(head)
            head = 0
        }
        return waiter
    }

    private func pump(_ claim: @Sendable (String, Int) async throws -> (claimed: Bool, more: Bool)) async {
        let ticker = Task(executorPreference: executor) { [weak self] in
            while (try? await Task.sleep(nanoseconds: 250_000_000)) != nil {
                await self?.tick()
            }
        }
        defer { ticker.cancel() }
        while let head = first() {
            woken = false
            let (claimed, more) = (try? await claim(head.job, head.chunk)) ?? (false, false)
            if claimed {
                // A waiter cancelled while its claim ran keeps the slot under its chunk; its job's
                // end frees it.
                remove(head.id)?.continuation.resume()
                // None was left free: the next waiter waits for a freed slot's notice (or the pause).
                if more || woken { continue }
            }
            if !woken { await withCheckedContinuation { sleeper = $0 } }
        }
        pumping = false
    }

    /// A slot was freed: the head asks again now (or as soon as its claim in flight is answered).
    func wake() {
        woken = true
        tick()
    }

    /// The pause ends (the ticker's tick, or a wake).
    private func tick() {
        sleeper?.resume()
        sleeper = nil
    }

    private func cancel(_ id: UInt64) {
        remove(id)?.continuation.resume(throwing: CancellationError())
    }
}

/// A deployment-wide request budget for one RunPod route: a token bucket in one row, taken from
/// atomically by every replica. RunPod counts requests in a sliding window of `window` seconds.
///
/// A replica takes up to `batch` tokens at a time and spends them within `hold` (0.05 × `window`),
/// dropping any left: one round trip to the database per `batch` requests instead of per request
/// (at 40 chunks a second that was most of the Dispatcher's CPU on PostgreSQL). A token spent in a
/// window was taken at most `hold` before it, so the bucket holds `limit`/10 − rate × `hold`
/// tokens refilled at rate = 0.9 × `limit`/`window` per second: burst + rate × (`window` + `hold`)
/// = `limit`, never more in any window.
final class PostgresRequestGate: RequestGate {
    private let pool: PostgresPool
    private let route: String
    private let burst: Double
    private let rate: Double
    private let holdNanoseconds: Int64
    let batch: Int
    private let reservoir: TokenReservoir

    init(pool: PostgresPool, route: String, limit: Int, window: Double, batch: Int = 16, executor: (any TaskExecutor)? = nil) throws {
        reservoir = TokenReservoir(executor: executor)
        self.pool = pool
        self.route = route
        rate = max(0.01, 0.9 * Double(limit) / window)
        let hold = 0.05 * window
        burst = max(1, Double(limit) / 10 - rate * hold)
        holdNanoseconds = Int64(hold * 1e9)
        self.batch = max(1, batch)
        let db = try PostgresConnection(url: pool.url)
        try db.execute("INSERT INTO runpod_budget (route, tokens, updated) VALUES ($1, $2, clock_timestamp()) ON CONFLICT DO NOTHING",
                       [.text(route), .text("\(burst)")])
    }

    func acquire() async throws {
        while true {
            guard let wait = try await reservoir.take(hold: holdNanoseconds, fetch: { try await self.fetch() }) else { return }
            // Short of tokens: wait until one has accrued.
            try await Task.sleep(nanoseconds: UInt64(max(0.002, wait) * 1e9))
        }
    }

    /// Takes up to `batch` whole tokens from the shared bucket: how many, and when none, the
    /// seconds until one accrues.
    private func fetch() async throws -> (granted: Int, wait: Double) {
        let route = self.route, burst = "\(self.burst)", perSecond = "\(rate)", batch = self.batch, rate = self.rate
        return try await pool.with { db in
            let result = try db.execute("""
                WITH b AS (SELECT least($2::float8, tokens + $3::float8 * extract(epoch FROM clock_timestamp() - updated)) AS now_tokens
                           FROM runpod_budget WHERE route = $1 FOR UPDATE),
                g AS (SELECT now_tokens, least($4::float8, floor(now_tokens)) AS granted FROM b),
                taken AS (UPDATE runpod_budget SET tokens = (SELECT now_tokens - granted FROM g), updated = clock_timestamp()
                          WHERE route = $1 AND (SELECT granted FROM g) >= 1 RETURNING tokens)
                SELECT CASE WHEN EXISTS (SELECT 1 FROM taken) THEN (SELECT granted FROM g) ELSE 0 END, (SELECT now_tokens FROM g)
                """, [.text(route), .text(burst), .text(perSecond), .int(batch)])
            guard result.rows == 1, !result.isNull(0, 0), !result.isNull(0, 1) else { return (0, 0.01) }
            let granted = Int(result.double(0, 0))
            return (granted, granted > 0 ? 0 : max(0, 1 - result.double(0, 1)) / rate)
        }
    }
}

/// Tokens one replica took and has not spent yet. One fetch at a time: callers that find the
/// reservoir empty while a fetch runs wait for it instead of asking the database too.
private actor TokenReservoir {
    /// Where the fetch runs (the waiters' thread).
    private let executor: (any TaskExecutor)?
    private var tokens = 0
    private var expires: Int64 = 0
    private var fetching: Task<Double, any Error>?

    init(executor: (any TaskExecutor)?) {
        self.executor = executor
    }

    /// nil when a token is the caller's; else the seconds to wait before asking again.
    func take(hold: Int64, fetch: @escaping @Sendable () async throws -> (granted: Int, wait: Double)) async throws -> Double? {
        while true {
            if tokens > 0 && MonotonicClock.nanoseconds() < expires {
                tokens -= 1
                return nil
            }
            tokens = 0
            let task: Task<Double, any Error>
            if let fetching {
                task = fetching
            } else {
                task = Task(executorPreference: executor) {
                    do {
                        let (granted, wait) = try await fetch()
                        await self.filled(granted, hold: hold)
                        return granted > 0 ? 0 : wait
                    } catch {
                        await self.filled(0, hold: hold)
                        throw error
                    }
                }
                fetching = task
            }
            let wait = try await task.value
            if wait > 0 { return wait }
        }
    }

    private func filled(_ granted: Int, hold: Int64) {
        tokens = granted
        expires = MonotonicClock.nanoseconds() + hold
        fetching = nil
    }
}
