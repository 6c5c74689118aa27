import Testing
import TalkMeshMessages

@Suite("Swift value types ⇄ protobuf-c")
struct ProtoMessageTests {
    func sampleJob() -> Job {
        var job = Job()
        job.id = "job-1"
        job.status = .running
        job.progress = 0.25
        job.createdAtUnixMs = 1_790_000_000_000
        job.videoKey = "jobs/job-1/final.mp4"
        job.width = 384
        job.height = 576
        var error = JobError()
        error.code = "RUNPOD_UNAVAILABLE"
        error.message = "temporarily unavailable — retrying"
        job.error = error
        job.chunks = (0..<3).map { index in
            var chunk = JobChunk()
            chunk.index = Int32(index)
            chunk.audioKey = "jobs/job-1/chunks/\(index).wav"
            chunk.startSec = Double(index) * 45
            chunk.durationSec = 45
            chunk.status = index == 0 ? .chunkCompleted : .chunkPending
            chunk.runpodJobId = index == 0 ? "rp-123" : ""
            return chunk
        }
        return job
    }

    @Test("a nested message with repeated children, enums and an optional child round-trips")
    func jobRoundTrip() throws {
        let job = sampleJob()
        let bytes = job.serializedBytes()
        #expect(!bytes.isEmpty)
        let decoded = try Job(serializedBytes: bytes)
        #expect(decoded == job)
        #expect(decoded.chunks[2].audioKey == "jobs/job-1/chunks/2.wav")
        #expect(decoded.error?.code == "RUNPOD_UNAVAILABLE")
        #expect(decoded.chunks[0].error == nil)
    }

    @Test("a message spanning many arena slabs, with long and non-ASCII strings, round-trips")
    func arenaSlabs() throws {
        var job = sampleJob()
        job.prompt = String(repeating: "é🙂 long prompt ", count: 400)  // a block of its own
        job.chunks = (0..<300).map { index in
            var chunk = JobChunk()
            chunk.index = Int32(index)
            chunk.audioKey = String(repeating: "k", count: index % 1500) + "/ü\(index)"
            chunk.runpodJobId = index % 2 == 0 ? "" : "rp-\(index)"
            chunk.durationSec = Double(index) / 7
            return chunk
        }
        let decoded = try Job(serializedBytes: job.serializedBytes(reservingPrefix: 5).dropFirst(5).map { $0 })
        #expect(decoded == job)
        #expect(decoded.chunks[299].audioKey.hasSuffix("/ü299") && decoded.prompt == job.prompt)
    }

    /// The encoding of `job` with the first occurrence of `text` changed by `change` (same length).
    func corrupt(_ job: Job, _ text: String, _ change: ([UInt8]) -> [UInt8]) -> [UInt8] {
        var bytes = job.serializedBytes()
        let needle = Array(text.utf8)
        let start = (0...(bytes.count - needle.count)).first { Array(bytes[$0..<($0 + needle.count)]) == needle }!
        bytes.replaceSubrange(start..<(start + needle.count), with: change(needle))
        return bytes
    }

    @Test("a string with a NUL or invalid UTF-8 is refused, naming the field, even nested")
    func invalidStrings() {
        let job = sampleJob()
        let cases: [(String, String, ([UInt8]) -> [UInt8])] = [
            ("job-1", "id", { $0.dropLast() + [0] }),
            ("jobs/job-1/chunks/2.wav", "chunks.audio_key", { [$0[0], 0] + $0.dropFirst(2) }),
            ("jobs/job-1/chunks/2.wav", "chunks.audio_key", { [0xC3, 0x28] + $0.dropFirst(2) }),
        ]
        for (text, field, change) in cases {
            #expect(throws: ProtoDecodingError.self) { try Job(serializedBytes: corrupt(job, text, change)) }
            do {
                _ = try Job(serializedBytes: corrupt(job, text, change))
            } catch {
                #expect(error.invalidStringField == field)
            }
        }
    }

    @Test("repeated strings and bytes round-trip")
    func repeatedAndBytes() throws {
        var request = StitchVideosRequest()
        request.videoKeys = ["a.mp4", "", "c/ü.mp4"]
        request.audioKey = "audio.wav"
        request.forceReencode = true
        #expect(try StitchVideosRequest(serializedBytes: request.serializedBytes()) == request)

        var echo = EchoRequest()
        echo.payload = (0...255).map { UInt8($0) }
        #expect(try EchoRequest(serializedBytes: echo.serializedBytes()) == echo)
    }

    @Test("the encoding is protobuf's: a known byte layout")
    func knownEncoding() throws {
        var request = HealthCheckRequest()
        request.service = "abc"
        #expect(request.serializedBytes() == [0x0A, 0x03, 0x61, 0x62, 0x63])
        var response = HealthCheckResponse()
        response.status = .notServing
        #expect(response.serializedBytes() == [0x08, 0x02])
        #expect(try HealthCheckResponse(serializedBytes: [0x08, 0x01]).status == .serving)
    }

    @Test("an empty message encodes to no bytes and decodes from none")
    func emptyMessage() throws {
        #expect(HealthCheckRequest().serializedBytes() == [])
        #expect(try HealthCheckRequest(serializedBytes: []) == HealthCheckRequest())
    }

    @Test("unknown enum values survive (open proto3 enums)")
    func unknownEnum() throws {
        var job = Job()
        job.status = JobStatus(rawValue: 42)
        let decoded = try Job(serializedBytes: job.serializedBytes())
        #expect(decoded.status.rawValue == 42)
        #expect(decoded.status.description == "42")
        #expect(JobStatus.timedOut.description == "TIMED_OUT")
    }

    @Test("invalid bytes throw instead of crashing", arguments: [[UInt8]([0xFF, 0xFF, 0xFF]), [0x0A, 0x10, 0x61], [0x08]])
    func invalidBytes(bytes: [UInt8]) {
        #expect(throws: ProtoDecodingError.self) { try Job(serializedBytes: bytes) }
    }

    @Test("method descriptors carry the gRPC paths of the contract")
    func descriptors() {
        #expect(MediaService.resizeImage.path == "/talkmesh.v1.MediaService/ResizeImage")
        #expect(MediaService.stitchVideos.path == "/talkmesh.v1.MediaService/StitchVideos")
        #expect(AudioService.splitAudio.path == "/talkmesh.v1.AudioService/SplitAudio")
        #expect(DispatcherService.watchJob.kind == .serverStreaming)
        #expect(DispatcherService.createJob.kind == .unary)
        #expect(Health.check.path == "/grpc.health.v1.Health/Check")
        #expect(Health.watch.kind == .serverStreaming)
    }
}
