import Foundation
import TalkMeshBase
import Testing
import TalkMeshCore
import TalkMeshRPC
@testable import TalkMeshDispatcherService

@Suite("RunPod wire format")
struct RunPodWireTests {
    func parse(_ json: String) throws -> RunPodJob { try RunPodJob.parse(Array(json.utf8)) }

    @Test("every status maps to the enum")
    func statuses() throws {
        for status in ["IN_QUEUE", "IN_PROGRESS", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"] {
            let job = try parse(#"{"id":"a","status":"\#(status)","output":{"video":"AAAA"}}"#)
            #expect(job.status.rawValue == status)
        }
        #expect(throws: ServiceError.self) { try parse(#"{"id":"a","status":"EXPLODED"}"#) }
        #expect(throws: ServiceError.self) { try parse("<html>bad gateway</html>") }
        #expect(RunPodStatus.completed.isTerminal && !RunPodStatus.inProgress.isTerminal)
    }

    @Test("raw base64 and data: URIs, URLs and volume paths")
    func outputs() throws {
        #expect(try parse(#"{"id":"a","status":"COMPLETED","output":{"video":"AAECAw=="}}"#).video == .base64(Array("AAECAw==".utf8)[...]))
        #expect(try parse(#"{"id":"a","status":"COMPLETED","output":{"video":"data:video/mp4;base64,AAECAw=="}}"#).video == .base64(Array("AAECAw==".utf8)[...]))
        #expect(try parse(#"{"id":"a","status":"COMPLETED","output":{"video_url":"https://x/y.mp4"}}"#).video == .url("https://x/y.mp4"))
        #expect(try parse(#"{"id":"a","status":"COMPLETED","output":{"status":"success","video":{"url":"https://x/z.mp4","mime":"video/mp4"}}}"#).video == .url("https://x/z.mp4"))
        #expect(try parse(#"{"id":"a","status":"COMPLETED","output":{"video_path":"/runpod-volume/out.mp4"}}"#).video == .volumePath("/runpod-volume/out.mp4"))
    }

    @Test("missing results and worker errors are failures with stable codes")
    func failures() throws {
        #expect(try parse(#"{"id":"a","status":"COMPLETED"}"#).failure?.code == .runpodResultMissing)
        #expect(try parse(#"{"id":"a","status":"COMPLETED","output":null}"#).failure?.code == .runpodResultMissing)
        #expect(try parse(#"{"id":"a","status":"COMPLETED","output":{"other":1}}"#).failure?.code == .runpodResultMissing)
        let errorStatus = try parse(#"{"id":"a","status":"COMPLETED","output":{"status":"error","error":"face not found"}}"#)
        #expect(errorStatus.failure?.code == .runpodJobFailed && errorStatus.failure?.message == "face not found")
        let sdk = #"{\"error_type\": \"<class 'RuntimeError'>\", \"error_message\": \"CUDA out of memory\", \"error_traceback\": \"...\"}"#
        let failed = try parse(#"{"id":"a","status":"FAILED","error":"\#(sdk)"}"#)
        #expect(failed.failure?.code == .runpodJobFailed && failed.failure?.message == "CUDA out of memory")
        #expect(try parse(#"{"id":"a","status":"FAILED","error":"plain text"}"#).failure?.message == "plain text")
        #expect(try parse(#"{"id":"a","status":"FAILED","error":{"message":"out of memory"}}"#).failure?.message == "out of memory")
        #expect(try parse(#"{"id":"a","status":"FAILED","error":null}"#).failure?.message == "the job failed without a message")
        #expect(try parse(#"{"id":"a","status":"FAILED","error":[1, 2]}"#).failure?.message == "[1, 2]")
    }

    @Test("timings, the worker, escapes and a video with escapes or line breaks")
    func fields() throws {
        let job = try parse(#" {"delayTime": 1200, "executionTime": 3.4e3, "workerId": "w\u00e9", "id": "j\"1", "status": "IN_PROGRESS"} "#)
        #expect(job.id == "j\"1" && job.delayTimeMs == 1200 && job.executionTimeMs == 3400 && job.workerID == "wé")
        #expect(try parse(#"{"id":"a","status":"RUNNING","executionTime":1.5}"#).executionTimeMs == nil)
        // "\/" is "/" and a JSON "\n" in base64 is a line break, which the decoder skips.
        let escaped = try parse(#"{"id":"a","status":"COMPLETED","output":{"video":"AA\/B\nCw=="}}"#)
        #expect(escaped.video == .base64(Array("AA/B\nCw==".utf8)[...]))
        for bad in [#"{"id":"a","status":"RUNNING""#, #"{"id":"a","status":"RUNNING"} x"#, #"{"id":"a\x","status":"RUNNING"}"#,
                    #"{"id":1,"status":"RUNNING"}"#, #"{"id":"a","status":"RUNNING","delayTime":01}"#, "[]", ""] {
            #expect(throws: ServiceError.self) { try parse(bad) }
        }
    }

    @Test("a base64 video is decoded in slices into the store, line breaks skipped; other bytes are RUNPOD_BAD_RESPONSE")
    func storesBase64() async throws {
        let store = try FileBlobStore(root: NSTemporaryDirectory() + "talkmesh-wire-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        defer { try? FileManager.default.removeItem(atPath: store.root) }
        let client = RunPodClient(configuration: .init(endpointID: "e"))
        // Over 3 MB: several 1 MB slices, groups of four split across them.
        let video = (0..<3_000_001).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) }
        let encoded = Array(Base64.encode(video).utf8)
        var wrapped = ""
        for start in stride(from: 0, to: encoded.count, by: 76) {
            wrapped += String(decoding: encoded[start..<min(encoded.count, start + 76)], as: UTF8.self) + "\\n"
        }
        let body = #"{"id":"a","status":"COMPLETED","output":{"video":"data:video/mp4;base64,\#(wrapped)"}}"#
        try await client.storeVideo(of: try parse(body), in: store, as: try BlobKey("v.mp4"))
        #expect(try store.get(try BlobKey("v.mp4")) == video)
        // Over a retired file larger than the video (a rendered chunk's audio): the stored video
        // is the video exactly, the rest of the old file cut off.
        let audio = try BlobKey("jobs/a/chunks/0000.wav")
        try store.put(audio, [UInt8](repeating: 0xAA, count: 200_000))
        try store.retire(audio)
        let small = #"{"id":"a","status":"COMPLETED","output":{"video":"\#(Base64.encode(Array(video.prefix(1000))))"}}"#
        try await client.storeVideo(of: try parse(small), in: store, as: try BlobKey("small.mp4"))
        #expect(try store.get(try BlobKey("small.mp4")) == Array(video.prefix(1000)))
        for bad in ["AAA*", "A", "AA=A"] {
            let job = try parse(#"{"id":"a","status":"COMPLETED","output":{"video":"\#(bad)"}}"#)
            await #expect(throws: ServiceError.self) { try await client.storeVideo(of: job, in: store, as: try BlobKey("bad.mp4")) }
            #expect(try store.exists(try BlobKey("bad.mp4")) == false)
        }
    }

    @Test("the /run body carries raw base64, the policy and the worker's fields")
    func runBody() throws {
        let input = InfiniteTalkInput(prompt: "talking", image: [1, 2, 3], wav: [4, 5], width: 384, height: 576)
        let body = try JSONSerialization.jsonObject(with: Data(input.runBody(executionTimeoutMs: 120_000, ttlMs: 3_600_000, webhook: nil).bytes)) as! [String: Any]
        let fields = body["input"] as! [String: Any]
        #expect(fields["image_base64"] as? String == "AQID" && fields["wav_base64"] as? String == "BAU=")
        #expect(fields["input_type"] as? String == "image" && fields["person_count"] as? String == "single")
        #expect(fields["width"] as? Int == 384 && fields["network_volume"] as? Bool == false)
        #expect((body["policy"] as! [String: Any])["executionTimeout"] as? Int == 120_000)
        // An image of a real size goes into the body as a piece of its own.
        let image = (0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let large = InfiniteTalkInput(prompt: "p", image: image, wav: Array(repeating: 9, count: 3001), width: 8, height: 8)
            .runBody(executionTimeoutMs: 1, ttlMs: 1, webhook: nil)
        let parsed = try JSONSerialization.jsonObject(with: Data(large.bytes)) as! [String: Any]
        let largeFields = parsed["input"] as! [String: Any]
        #expect(Data(base64Encoded: largeFields["image_base64"] as! String) == Data(image))
        #expect(Data(base64Encoded: largeFields["wav_base64"] as! String) == Data(Array(repeating: 9, count: 3001)))
        #expect(large.count == large.requestBytes.count && largeFields["prompt"] as? String == "p")
    }

    @Test("the hand-written /run body is JSON with every field, whatever the prompt holds")
    func runBodyEscapes() throws {
        let prompt = "quote \" backslash \\ newline \n tab \t bell \u{07} é 🙂"
        var input = InfiniteTalkInput(prompt: prompt, image: [1, 2, 3], wav: Array(repeating: 255, count: 1000), width: 64, height: 4096)
        input.forceOffload = false
        let body = try JSONSerialization.jsonObject(with: Data(input.runBody(executionTimeoutMs: 5, ttlMs: 6, webhook: "http://h/\"x").bytes)) as! [String: Any]
        let fields = body["input"] as! [String: Any]
        #expect(fields["prompt"] as? String == prompt)
        #expect(fields["image_base64"] as? String == Data([1, 2, 3]).base64EncodedString())
        #expect(Data(base64Encoded: fields["wav_base64"] as! String) == Data(Array(repeating: 255, count: 1000)))
        #expect(fields["force_offload"] as? Bool == false && fields["height"] as? Int == 4096)
        #expect(body["webhook"] as? String == "http://h/\"x")
        let urls = InfiniteTalkInput(prompt: "", imageURL: "https://a/i.png", wavURL: "https://a/w.wav", width: 64, height: 64)
        let other = try JSONSerialization.jsonObject(with: Data(urls.runBody(executionTimeoutMs: 1, ttlMs: 1, webhook: nil).bytes)) as! [String: Any]
        #expect((other["input"] as! [String: Any])["wav_url"] as? String == "https://a/w.wav")
        #expect(other["webhook"] == nil)
    }

    @Test("the request budget never lets more than its limit through in any window, and waits only as long as it must")
    func budget() async throws {
        let clock = ManualTicks()
        let budget = RequestBudget(limit: 5, window: 0.2, clock: clock)
        let times = try await withThrowingTaskGroup(of: Double.self) { group in
            for _ in 0..<20 {
                group.addTask {
                    try await budget.take()  // the instant granted, not when this task next runs
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }.sorted()
        }
        for (index, time) in times.enumerated() {
            let inWindow = times[index...].prefix { $0 - time < 0.2 }.count
            #expect(inWindow <= 5)
        }
        // 20 requests at 5 per 0.2 s: the last is granted three windows after the first, not later.
        let span = times.last! - times.first!
        #expect(span >= 0.6 && span < 0.7)
        #expect(clock.sleeps.withLock { $0 } > 0)
    }

    @Test("Retry-After is clamped and checked before it becomes a sleep", arguments: [
        ("3", 3.0), (" 1.5 ", 1.5), ("0", 0.0), ("1e300", RetryAfter.longestSeconds), ("99999999999", RetryAfter.longestSeconds),
    ])
    func retryAfter(header: String, seconds: Double) {
        #expect(RetryAfter.seconds(header) == seconds)
    }

    @Test("a Retry-After that is not a finite non-negative number falls back to backoff",
          arguments: ["-1", "inf", "nan", "Wed, 21 Oct 2015 07:28:00 GMT", ""])
    func retryAfterRejected(header: String) {
        #expect(RetryAfter.seconds(header) == nil)
    }
}
