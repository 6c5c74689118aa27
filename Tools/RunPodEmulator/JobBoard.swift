import Foundation
import TalkMeshCore
import TalkMeshBase

/// RunPod's job lifecycle, emulated: IN_QUEUE → IN_PROGRESS → COMPLETED | FAILED | CANCELLED |
/// TIMED_OUT, a pool of simulated workers with cold starts and audio-proportional processing,
/// results kept for a retention period, ttl and executionTimeout honoured, faults injected.
actor JobBoard {
    struct Settings: Sendable {
        var workers = 2
        var coldStartSeconds = 0.0
        /// Seconds of processing per second of audio (0: instant).
        var speed = 0.0
        var retentionSeconds = 1800.0
        var failRate = 0.0
        var missingOutputRate = 0.0
        var hangRate = 0.0
        var seed: UInt64 = 1
    }

    struct Job: Sendable {
        let id: String
        var status: String
        let submittedAt: Double
        var startedAt: Double?
        var finishedAt: Double?
        var outputJSON: String?
        var errorText: String?
        var workerID: String?
        let executionTimeout: Double
        let ttl: Double
        let input: JobInput
        var attempt = 0
        /// Where the job's end is POSTed (RunPod's `webhook`).
        var webhook: String?
    }

    struct JobInput: Sendable {
        /// The media, given inline (base64) or fetched by the worker when it starts (`*_url`).
        var image: [UInt8]
        var wav: [UInt8]
        var imageURL: String?
        var wavURL: String?
        var width: Int32
        var height: Int32
        var hash: String
    }

    let settings: Settings
    private var jobs: [String: Job] = [:]
    private var queue: [String] = []
    private var waiting: [CheckedContinuation<String, Never>] = []
    private var submissions: [String: Int] = [:]
    private var counters = ["completed": 0, "failed": 0, "retried": 0]
    /// What tests look at besides submissions: URL inputs, webhooks sent and failed.
    private var events = ["url_inputs": 0, "webhooks_sent": 0, "webhooks_failed": 0]
    private var busyWorkers = 0
    /// Jobs IN_QUEUE or IN_PROGRESS now, and the most there ever were (what a caller's in-flight
    /// cap is checked against).
    private var inFlight = 0
    private var peakInFlight = 0
    private var random: SplitMix
    /// What submission, start, finish, ttl and retention are timed on.
    private let clock: any TickSource

    init(settings: Settings, clock: any TickSource = SystemTicks()) {
        self.settings = settings
        self.clock = clock
        random = SplitMix(state: settings.seed)
    }

    // MARK: Requests

    func submit(_ input: JobInput, executionTimeout: Double, ttl: Double, webhook: String? = nil) -> Job {
        let id = Self.newID()
        var job = Job(id: id, status: "IN_QUEUE", submittedAt: clock.seconds(), executionTimeout: executionTimeout, ttl: ttl, input: input)
        job.webhook = webhook
        if input.imageURL != nil { events["url_inputs", default: 0] += 1 }
        jobs[id] = job
        submissions[input.hash, default: 0] += 1
        entered()
        enqueue(id)
        return job
    }

    func job(_ id: String) -> Job? {
        expire()
        return jobs[id]
    }

    func cancel(_ id: String) -> Job? {
        expire()
        guard var job = jobs[id] else { return nil }
        if ["IN_QUEUE", "IN_PROGRESS"].contains(job.status) {
            inFlight -= 1
            job.status = "CANCELLED"
            job.finishedAt = clock.seconds()
            jobs[id] = job
            queue.removeAll { $0 == id }
        }
        return job
    }

    func retry(_ id: String) -> Job? {
        expire()
        guard var job = jobs[id], ["FAILED", "TIMED_OUT"].contains(job.status) else { return nil }
        job.status = "IN_QUEUE"
        job.outputJSON = nil
        job.errorText = nil
        job.startedAt = nil
        job.finishedAt = nil
        job.attempt += 1
        jobs[id] = job
        counters["retried", default: 0] += 1
        entered()
        enqueue(id)
        return job
    }

    func purge() -> Int {
        let removed = queue.count
        for id in queue where jobs[id]?.status == "IN_QUEUE" {
            jobs[id]?.status = "CANCELLED"
            inFlight -= 1
        }
        queue.removeAll()
        return removed
    }

    func health() -> String {
        let inQueue = jobs.values.filter { $0.status == "IN_QUEUE" }.count
        let inProgress = jobs.values.filter { $0.status == "IN_PROGRESS" }.count
        return "{\"jobs\":{\"completed\":\(counters["completed"]!),\"failed\":\(counters["failed"]!),\"inProgress\":\(inProgress),"
            + "\"inQueue\":\(inQueue),\"retried\":\(counters["retried"]!)},\"workers\":{\"idle\":\(settings.workers - busyWorkers),\"running\":\(busyWorkers)}}"
    }

    func stats() -> String {
        let entries = submissions.sorted { $0.key < $1.key }.map { "\"\($0.key)\":\($0.value)" }.joined(separator: ",")
        return "{\"submissions\":{\(entries)},\"total\":\(submissions.values.reduce(0, +)),\"jobs\":\(jobs.count),"
            + "\"in_flight\":\(inFlight),\"peak_in_flight\":\(peakInFlight),"
            + events.sorted { $0.key < $1.key }.map { "\"\($0.key)\":\($0.value)" }.joined(separator: ",") + "}"
    }

    /// Results and expired jobs go away: 404 afterwards, as RunPod does.
    private func expire() {
        let now = clock.seconds()
        for (id, job) in jobs {
            let retained = job.finishedAt.map { now - $0 > settings.retentionSeconds } ?? false
            if now - job.submittedAt > job.ttl || retained {
                if ["IN_QUEUE", "IN_PROGRESS"].contains(job.status) { inFlight -= 1 }
                jobs.removeValue(forKey: id)
            }
        }
    }

    private func entered() {
        inFlight += 1
        peakInFlight = max(peakInFlight, inFlight)
    }

    // MARK: Workers

    private func enqueue(_ id: String) {
        if !waiting.isEmpty {
            waiting.removeFirst().resume(returning: id)
        } else {
            queue.append(id)
        }
    }

    /// The next queued job for a worker (waits when none).
    func next() async -> String {
        if !queue.isEmpty { return queue.removeFirst() }
        return await withCheckedContinuation { waiting.append($0) }
    }

    /// Marks a job started; nil when it was cancelled or expired meanwhile.
    func start(_ id: String, worker: String) -> Job? {
        expire()
        guard var job = jobs[id], job.status == "IN_QUEUE" else { return nil }
        job.status = "IN_PROGRESS"
        job.startedAt = clock.seconds()
        job.workerID = worker
        jobs[id] = job
        busyWorkers += 1
        return job
    }

    enum Fault { case none, fail, missingOutput, hang }

    func drawFault() -> Fault {
        let draw = random.unit()
        if draw < settings.hangRate { return .hang }
        if draw < settings.hangRate + settings.failRate { return .fail }
        if draw < settings.hangRate + settings.failRate + settings.missingOutputRate { return .missingOutput }
        return .none
    }

    func finish(_ id: String, status: String, outputJSON: String?, error: String?) {
        busyWorkers -= 1
        guard var job = jobs[id], job.status == "IN_PROGRESS" else { return }
        job.status = status
        job.outputJSON = outputJSON
        job.errorText = error
        job.finishedAt = clock.seconds()
        jobs[id] = job
        inFlight -= 1
        if status == "COMPLETED" { counters["completed", default: 0] += 1 }
        if status == "FAILED" { counters["failed", default: 0] += 1 }
    }

    func releaseWorker() { busyWorkers -= 1 }

    func count(_ event: String) { events[event, default: 0] += 1 }

    static func newID() -> String {
        let alphabet = Array("0123456789abcdef")
        var generator = SystemRandomNumberGenerator()
        let parts = [8, 4, 4, 4, 12].map { length in String((0..<length).map { _ in alphabet[Int.random(in: 0..<16, using: &generator)] }) }
        return "sync-" + parts.joined(separator: "-") + "-e1"
    }
}

/// A small seeded generator (fault injection is reproducible with --seed).
struct SplitMix: Sendable {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func unit() -> Double { Double(next() >> 11) / Double(1 << 53) }
}
