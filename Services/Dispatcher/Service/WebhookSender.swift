import Foundation
import Logging
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages

/// How outgoing webhooks are sent.
public struct WebhookConfiguration: Sendable {
    /// Private, loopback and link-local targets are allowed (`WEBHOOK_ALLOW_PRIVATE`): for
    /// receivers inside the cluster, and tests.
    public var allowPrivate = false
    /// The wait after a first failed attempt (`WEBHOOK_BACKOFF_INITIAL`), doubling up to `backoffMaxSeconds`.
    public var backoffInitialSeconds = 10.0
    public var backoffMaxSeconds = 3600.0
    /// How long an event is retried after its first attempt (`WEBHOOK_MAX_AGE`, default 24 h).
    public var maxAgeSeconds = 86_400.0
    /// One attempt's budget (`WEBHOOK_TIMEOUT`), milliseconds.
    public var timeoutMs = 10_000
    /// How often the store is asked for deliveries that are due, seconds.
    public var intervalSeconds = 1.0
    /// Deliveries handled at once.
    public var batch = 32
    /// How long a presigned video URL in a webhook stays valid (S3 stores), seconds.
    public var videoURLSeconds = 6 * 3600
    /// Attempts kept in a job's delivery log.
    public static let logLength = 20

    public init() {}

    /// The wait before attempt `attempt + 1` after `attempt` failed: exponential, capped, with ±20 % jitter.
    public func backoff(afterAttempt attempt: Int) -> Double {
        let base = min(backoffMaxSeconds, backoffInitialSeconds * pow(2, Double(max(0, attempt - 1))))
        return base * Double.random(in: 0.8...1.2)
    }
}

/// Delivers the webhooks jobs queue (`JobRecord.queueWebhook`: on a terminal state, and on progress
/// when asked). The pending delivery lives in the job's row, so it survives restarts and any
/// replica may send it: a sender first claims it with a compare-and-swap write that moves its due
/// time past the attempt's timeout (another replica skips it; a crash mid-send means it is sent
/// again later), then POSTs, then records the attempt in the job's delivery log and either clears
/// the pending event or schedules the next attempt with backoff, for up to `maxAgeSeconds`.
///
/// Each POST carries `TalkMesh-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
/// under the job's webhook key, `TalkMesh-Event` and `TalkMesh-Delivery` (the same for every
/// attempt of one event, for receivers that deduplicate). A 2xx answer is a delivery; anything
/// else is retried, except a target that resolves to a private address (refused for good).
public struct WebhookSender: Sendable {
    public let context: DispatcherContext
    public let configuration: WebhookConfiguration
    let engine: CurlEngine

    public init(context: DispatcherContext, configuration: WebhookConfiguration, engine: CurlEngine = CurlEngine()) {
        self.context = context
        self.configuration = configuration
        self.engine = engine
    }

    /// Sends what is due until the task is cancelled.
    public func run() async {
        while !Task.isCancelled {
            do { _ = try await deliverDue() } catch {
                context.logger.warning("webhook round failed; trying again", metadata: ["error": "\(error)"])
            }
            guard (try? await Task.sleep(nanoseconds: UInt64(configuration.intervalSeconds * 1e9))) != nil else { return }
        }
    }

    /// One round: every due delivery (up to `batch`), at once. Returns how many were attempted.
    @discardableResult
    public func deliverDue() async throws -> Int {
        let due = try await context.store.webhooksDue(at: context.clock.nowUnixMs(), limit: configuration.batch)
        return await withTaskGroup(of: Bool.self) { group in
            for record in due { group.addTask { await self.deliver(record) } }
            var attempted = 0
            for await sent in group where sent { attempted += 1 }
            return attempted
        }
    }

    /// Claims, sends and records one pending delivery; false when another writer came first.
    private func deliver(_ pending: JobRecord) async -> Bool {
        guard let webhook = pending.job.webhook, !webhook.pendingEvent.isEmpty else { return false }
        let claimedAt = context.clock.nowUnixMs()
        var claim = pending
        claim.updateWebhook {
            $0.pendingAttempts += 1
            $0.dueUnixMs = claimedAt + Int64(configuration.timeoutMs) + 30_000
        }
        let claimed: JobRecord
        do { claimed = try await context.store.update(claim) } catch {
            return false  // a conflict: the job changed (or another replica claimed it); the next round re-reads
        }
        context.events.publish(claimed.job)
        let sent = claimed.job.webhook ?? webhook
        let started = MonotonicClock.nanoseconds()
        let outcome = await post(claimed.job, event: sent.pendingEvent, delivery: "\(claimed.id).\(sent.pendingEvent).\(sent.pendingSinceUnixMs)")
        var entry = WebhookDelivery()
        entry.event = sent.pendingEvent
        entry.attempt = sent.pendingAttempts
        entry.atUnixMs = claimedAt
        entry.durationMs = (MonotonicClock.nanoseconds() - started) / 1_000_000
        entry.httpStatus = Int32(outcome.status)
        entry.error = outcome.error ?? ""
        entry.delivered = outcome.error == nil
        let now = context.clock.nowUnixMs()
        let expired = Double(now - sent.pendingSinceUnixMs) / 1000 >= configuration.maxAgeSeconds
        entry.abandoned = !entry.delivered && (outcome.refused || expired)
        context.counters.count(event: entry.delivered ? "webhooks_delivered" : entry.abandoned ? "webhooks_abandoned" : "webhooks_failed_attempts")
        let metadata: Logger.Metadata = ["job_id": "\(claimed.id)", "event": "\(entry.event)", "attempt": "\(entry.attempt)",
                                         "http_status": "\(entry.httpStatus)"]
        if entry.delivered {
            context.logger.info("webhook delivered", metadata: metadata)
        } else {
            context.logger.warning(entry.abandoned ? "webhook abandoned" : "webhook attempt failed",
                                   metadata: metadata.merging(["error": "\(entry.error)"]) { $1 })
        }
        await record(entry, for: claimed, sentSince: sent.pendingSinceUnixMs, at: now)
        return true
    }

    /// Adds the attempt to the job's log and clears or reschedules its pending event, re-reading
    /// on conflicts (the job's driver writes too, while it runs).
    private func record(_ entry: WebhookDelivery, for claimed: JobRecord, sentSince: Int64, at now: Int64) async {
        var current = claimed
        for _ in 0..<8 {
            var next = current
            next.updateWebhook { webhook in
                webhook.deliveries.append(entry)
                if webhook.deliveries.count > WebhookConfiguration.logLength {
                    webhook.deliveries.removeFirst(webhook.deliveries.count - WebhookConfiguration.logLength)
                }
                // A newer event queued meanwhile stays pending, due as it was queued.
                guard webhook.pendingEvent == entry.event, webhook.pendingSinceUnixMs == sentSince else { return }
                if entry.delivered || entry.abandoned {
                    webhook.pendingEvent = ""
                    webhook.dueUnixMs = 0
                    webhook.pendingAttempts = 0
                } else {
                    webhook.dueUnixMs = now + Int64(configuration.backoff(afterAttempt: Int(entry.attempt)) * 1000)
                }
            }
            do {
                let stored = try await context.store.update(next)
                context.events.publish(stored.job)
                return
            } catch let error as ServiceError where error.code == .storeConflict {
                guard let reread = try? await context.store.get(current.id), reread.job.expiredAtUnixMs == 0 else { return }
                current = reread
            } catch {
                // The claim's due time brings the event back after the timeout: it is sent again then.
                context.logger.warning("could not record a webhook attempt", metadata: ["job_id": "\(claimed.id)", "error": "\(error)"])
                return
            }
        }
    }

    /// One POST: the status (0 without an answer), an error unless 2xx, and whether the target was refused.
    private func post(_ job: Job, event: String, delivery: String) async -> (status: Int, error: String?, refused: Bool) {
        guard let webhook = job.webhook else { return (0, "no webhook", true) }
        let now = context.clock.nowUnixMs()
        let body = Self.body(job, event: event, at: now, videoURL: videoURL)
        let timestamp = now / 1000
        let headers = [
            "Content-Type: application/json", "User-Agent: TalkMesh-Webhooks/1",
            "TalkMesh-Event: \(event)", "TalkMesh-Delivery: \(delivery)",
            "TalkMesh-Signature: \(Self.signature(secret: webhook.secret, timestamp: timestamp, body: body))",
        ]
        do {
            let exchange = try await engine.perform(method: "POST", url: webhook.url, headers: headers, body: body,
                                                    timeoutMilliseconds: configuration.timeoutMs, bodyLimit: 64 << 10,
                                                    publicOnly: !configuration.allowPrivate)
            if (200...299).contains(exchange.status) { return (exchange.status, nil, false) }
            return (exchange.status, "the receiver answered HTTP \(exchange.status)", false)
        } catch let error as CurlError where error.refusedAddress {
            return (0, "refused: the target resolves to a private, loopback or link-local address (WEBHOOK_ALLOW_PRIVATE is off)", true)
        } catch let error as CurlError {
            return (0, error.message, false)
        } catch {
            return (0, "\(error)", false)
        }
    }

    private var videoURL: JobJSON.VideoURL {
        let blobs = context.blobs
        return JobJSON.presignedVideoURL(seconds: configuration.videoURLSeconds) { key, seconds in
            (try? BlobKey(key)).flatMap { blobs.presignedURL($0, expiresSeconds: seconds) }
        }
    }

    /// `{"event", "created_at", "job": <the job as GET /v1/jobs/{id} shows it>}`.
    static func body(_ job: Job, event: String, at now: Int64, videoURL: JobJSON.VideoURL?) -> [UInt8] {
        var object = JobJSON.object(job, videoURL: videoURL)
        object["webhook"] = nil
        return JSONWriter.encode(["event": event, "created_at": JobJSON.time(now), "job": object])
    }

    /// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
    public static func signature(secret: String, timestamp: Int64, body: [UInt8]) -> String {
        let signed = Array("\(timestamp).".utf8) + body
        return "t=\(timestamp),v1=\(Hex.encode(Digest.hmacSHA256(key: Array(secret.utf8), signed)))"
    }
}

/// Checks a job's `webhook_url` when the job is created.
public enum WebhookURL {
    /// INVALID_WEBHOOK_URL unless `url` is http(s) with a host that resolves — to public addresses
    /// only, unless `allowPrivate`. The check is repeated on the address each delivery connects to.
    /// Resolves names: blocks.
    public static func validate(_ url: String, allowPrivate: Bool) throws(ServiceError) {
        func invalid(_ message: String) -> ServiceError { ServiceError(.invalidWebhookURL, "webhook_url \(message)") }
        guard url.utf8.count <= 2048 else { throw invalid("must be at most 2048 bytes") }
        guard let parts = URLComponents(string: url), let scheme = parts.scheme?.lowercased(), scheme == "http" || scheme == "https",
              var host = parts.host, !host.isEmpty else {
            throw invalid("must be an absolute http or https URL")
        }
        guard parts.user == nil, parts.password == nil else { throw invalid("must not carry credentials") }
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if allowPrivate { return }
        let addresses = NetworkAddress.resolve(host)
        guard !addresses.isEmpty else { throw invalid("names a host that does not resolve (\(host))") }
        guard addresses.allSatisfy(NetworkAddress.isPublic) else {
            throw invalid("names a private, loopback or link-local address; such targets are refused unless WEBHOOK_ALLOW_PRIVATE=true")
        }
    }
}
