import Foundation
import Testing
import TalkMeshBase
import TalkMeshCore
import TalkMeshMessages
@testable import TalkMeshDispatcherService

@Suite struct WebhookTests {
    func record(progress: Bool = false) throws -> JobRecord {
        var job = Job()
        job.id = "job_0123456789abcdef01234567"
        job.chunks = (0..<2).map { var chunk = JobChunk(); chunk.index = Int32($0); return chunk }
        job.webhook = JobWebhook()
        job.webhook!.url = "https://example.com/hook"
        job.webhook!.progress = progress
        var record = JobRecord(new: job)
        try record.move(to: .running, at: 1)
        return record
    }

    @Test func aTerminalStateQueuesItsEventDueAtOnce() throws {
        for (status, event) in [(JobStatus.completed, "job.completed"), (.failed, "job.failed"), (.cancelled, "job.cancelled"), (.timedOut, "job.timed_out")] {
            var record = try record()
            try record.move(to: status, at: 700)
            #expect(record.job.webhook?.pendingEvent == event)
            #expect(record.webhookDueUnixMs == 700 && record.job.webhook?.pendingSinceUnixMs == 700)
        }
        var plain = try record()
        plain.update { _ in }
        #expect(plain.webhookDueUnixMs == nil, "no event before one happens")
        var none = JobRecord(new: Job())
        try none.move(to: .cancelled, at: 5)
        #expect(none.job.webhook == nil && none.webhookDueUnixMs == nil, "a job without a webhook queues nothing")
    }

    @Test func aTerminalEventReplacesPendingProgressAndProgressNeverReplacesIt() throws {
        var record = try record(progress: true)
        record.queueWebhook(JobRecord.progressEvent, at: 10)
        record.updateWebhook { $0.pendingAttempts = 2; $0.dueUnixMs = 5_000 }  // failing, backing off
        record.queueWebhook(JobRecord.progressEvent, at: 20)
        #expect(record.job.webhook?.pendingAttempts == 2 && record.webhookDueUnixMs == 5_000, "newer progress keeps the backoff")
        try record.move(to: .completed, at: 30)
        #expect(record.job.webhook?.pendingEvent == "job.completed" && record.job.webhook?.pendingAttempts == 0)
        #expect(record.webhookDueUnixMs == 30 && record.job.webhook?.pendingSinceUnixMs == 30)
        record.queueWebhook(JobRecord.progressEvent, at: 40)
        #expect(record.job.webhook?.pendingEvent == "job.completed")
    }

    @Test func theSignatureIsHMACSHA256OfTimestampDotBody() {
        // RFC 4231 test case 2's key and data, as "<t>.<body>" = "what do ya want for nothing?" split at the dot.
        let signature = WebhookSender.signature(secret: "Jefe", timestamp: 0, body: Array("what do ya want for nothing?".utf8))
        let expected = Hex.encode(Digest.hmacSHA256(key: Array("Jefe".utf8), Array("0.what do ya want for nothing?".utf8)))
        #expect(signature == "t=0,v1=\(expected)")
        let rfc = Hex.encode(Digest.hmacSHA256(key: Array("Jefe".utf8), Array("what do ya want for nothing?".utf8)))
        #expect(rfc == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    }

    @Test func backoffDoublesWithJitterUpToItsCap() {
        var configuration = WebhookConfiguration()
        configuration.backoffInitialSeconds = 10
        configuration.backoffMaxSeconds = 60
        for (attempt, base) in [(1, 10.0), (2, 20.0), (3, 40.0), (4, 60.0), (12, 60.0)] {
            let wait = configuration.backoff(afterAttempt: attempt)
            #expect(wait >= base * 0.8 && wait <= base * 1.2, "attempt \(attempt): \(wait)")
        }
    }

    @Test func theWebhookBodyIsTheJobAsTheAPIShowsItWithoutTheLog() throws {
        var record = try record()
        try record.move(to: .failed, error: JobError(code: "RUNPOD_JOB_FAILED", message: "boom"), at: 1_000)
        let body = WebhookSender.body(record.job, event: "job.failed", at: 2_000, videoURL: nil)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any])
        #expect(object["event"] as? String == "job.failed")
        let job = try #require(object["job"] as? [String: Any])
        #expect(job["status"] as? String == "failed" && job["webhook"] == nil)
        #expect((job["error"] as? [String: Any])?["code"] as? String == "RUNPOD_JOB_FAILED")
    }

    @Test(arguments: ["ftp://example.com/x", "http://", "example.com/hook", "http://user:pw@example.com/", String(repeating: "a", count: 3000),
                      "http://127.0.0.1/", "http://localhost:8080/", "http://[::1]/", "http://169.254.169.254/", "http://0x7f000001/",
                      "http://10.0.0.8/", "http://[fd00::1]/", "http://[::ffff:127.0.0.1]/"])
    func aWebhookURLThatIsMalformedOrPrivateIsRefused(url: String) {
        #expect(throws: ServiceError.self) { try WebhookURL.validate(url, allowPrivate: false) }
    }

    @Test func privateTargetsPassWhenAllowed() throws {
        try WebhookURL.validate("http://127.0.0.1:9/hook", allowPrivate: true)
        try WebhookURL.validate("http://[::1]:9/hook", allowPrivate: true)
        #expect(throws: ServiceError.self) { try WebhookURL.validate("ftp://127.0.0.1/", allowPrivate: true) }
    }

    @Test func publicAddressesPass() throws {
        try WebhookURL.validate("https://93.184.216.34/hook", allowPrivate: false)
        try WebhookURL.validate("https://[2606:4700::1111]/hook", allowPrivate: false)
    }
}
