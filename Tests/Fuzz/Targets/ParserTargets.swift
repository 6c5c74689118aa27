import Glibc
import TalkMeshAudioService
import TalkMeshCore
import TalkMeshDispatcherService
import TalkMeshGatewayService
import TalkMeshMediaService
import TalkMeshMessages
import TalkMeshRPC

enum FuzzTargets {
    /// The target this process runs (libFuzzer's callback is a C function pointer: no context).
    nonisolated(unsafe) static var selected: FuzzTarget?

    static let all: [String: FuzzTarget] = [
        "grpc-message-reader": FuzzTarget(run: grpcMessageReader),
        "grpc-timeout": FuzzTarget(run: grpcTimeout),
        "percent-decoding": FuzzTarget(run: percentDecoding),
        "protobuf": FuzzTarget(run: protobuf),
        "exif": FuzzTarget(run: exif),
        "image-header": FuzzTarget(run: imageHeader),
        "runpod-json": FuzzTarget(run: runPodJSON),
        "byte-range": FuzzTarget(run: byteRange),
        "multipart": FuzzTarget(setUp: UploadHarness.setUp, run: UploadHarness.multipart),
        "json-upload": FuzzTarget(setUp: UploadHarness.setUp, run: UploadHarness.json),
        "audio-decode": FuzzTarget(setUp: AudioHarness.setUp, run: AudioHarness.decode),
        "http1-session": FuzzTarget(setUp: ServerHarness.setUp, run: { ServerHarness.exchange($0, http2: false) }),
        "http2-session": FuzzTarget(setUp: ServerHarness.setUp, run: { ServerHarness.exchange($0, http2: true) }),
        // Fails on an input starting with "crash": shows that a failure reaches the exit status.
        "self-test": FuzzTarget(run: { require(!$0.starts(with: Array("crash".utf8)), "the self-test input") }),
    ]

    /// The first byte says how to cut the rest into pieces (as a socket would deliver them).
    static func pieces(_ data: UnsafeBufferPointer<UInt8>) -> [UnsafeBufferPointer<UInt8>] {
        guard let first = data.first else { return [] }
        let rest = UnsafeBufferPointer(rebasing: data.dropFirst())
        let size = Int(first) + 1
        return stride(from: 0, to: rest.count, by: size).map { UnsafeBufferPointer(rebasing: rest[$0..<min($0 + size, rest.count)]) }
    }

    /// gRPC length-prefixed messages arriving in pieces: what comes out is what went in.
    static func grpcMessageReader(_ data: UnsafeBufferPointer<UInt8>) {
        var reader = GRPCMessageReader(maxMessageBytes: 4096)
        var delivered = 0
        for piece in pieces(data) {
            do {
                try reader.append(piece)
            } catch {
                return
            }
            for message in reader.takeMessages() {
                require(message.count <= 4096, "a message over the limit came out")
                delivered += message.count + 5
            }
        }
        require(delivered <= max(0, data.count - 1), "more bytes came out than went in")
    }

    /// `grpc-timeout`: never negative, never past the clamp, and what it encodes parses again.
    static func grpcTimeout(_ data: UnsafeBufferPointer<UInt8>) {
        guard let value = GRPCTimeout.parse(data) else { return }
        require(value >= 0 && value <= GRPCTimeout.maximumNanoseconds, "timeout out of range: \(value)")
        let again = GRPCTimeout.parse(GRPCTimeout.encode(nanoseconds: value))
        require(again != nil && again! >= value, "the encoded timeout does not parse back")
    }

    /// `grpc-message` percent-decoding: any text decodes; an encoded text decodes back.
    static func percentDecoding(_ data: UnsafeBufferPointer<UInt8>) {
        let text = String(decoding: data, as: UTF8.self)
        _ = PercentEncoding.decode(text)
        require(PercentEncoding.decode(PercentEncoding.encode(text)) == text, "percent-encoding does not round-trip")
    }

    static let messageTypes: [any ProtoMessage.Type] = [
        HealthCheckRequest.self, HealthCheckResponse.self, EchoRequest.self, EchoResponse.self, ExpandRequest.self,
        HoldRequest.self, StatsRequest.self, StatsResponse.self, SplitAudioRequest.self, AudioChunk.self, SilenceRange.self,
        SplitAudioResponse.self, ProbeAudioRequest.self, ProbeAudioResponse.self, JobOptions.self, JobError.self, JobChunk.self,
        Job.self, CreateJobRequest.self, CreateJobResponse.self, GetJobRequest.self, ListJobsRequest.self, ListJobsResponse.self,
        CancelJobRequest.self, WatchJobRequest.self, ResizeImageRequest.self, ResizeImageResponse.self, StitchVideosRequest.self,
        StitchVideosResponse.self, ProbeMediaRequest.self, MediaStream.self, ProbeMediaResponse.self, EncodeAudioRequest.self,
        EncodeAudioResponse.self,
    ]

    /// Every message through the protobuf-c bridge (first byte: which one): what decodes,
    /// encodes to bytes that decode to the same message.
    static func protobuf(_ data: UnsafeBufferPointer<UInt8>) {
        guard let first = data.first else { return }
        messageTypes[Int(first) % messageTypes.count].fuzzRoundTrip(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: data.dropFirst())))
    }

    /// The EXIF orientation of any JPEG is 1…8, and the sizes it implies stay positive.
    static func exif(_ data: UnsafeBufferPointer<UInt8>) {
        let orientation = ExifOrientation.read(Array(data))
        require((1...8).contains(orientation), "orientation \(orientation)")
        let (width, height) = ExifOrientation.outputSize(orientation: orientation, width: 7, height: 3)
        require(width * height == 21, "orientation \(orientation) changed the pixel count")
    }

    /// Image dimensions from the header alone: positive when found.
    static func imageHeader(_ data: UnsafeBufferPointer<UInt8>) {
        if case .success(let header) = ImageHeader.read(Array(data)) {
            require(header.width > 0 && header.height > 0, "dimensions \(header.width)×\(header.height)")
        }
    }

    /// A RunPod status response (and a `Retry-After` value) from a hostile or broken peer.
    static func runPodJSON(_ data: UnsafeBufferPointer<UInt8>) {
        _ = try? RunPodJob.parse(Array(data))
        if let wait = RetryAfter.seconds(String(decoding: data.prefix(40), as: UTF8.self)) {
            require(wait >= 0 && wait <= RetryAfter.longestSeconds, "Retry-After \(wait)")
        }
    }

    /// `Range: bytes=…` against a size from the first eight bytes: inside the video, never empty.
    static func byteRange(_ data: UnsafeBufferPointer<UInt8>) {
        guard data.count >= 8 else { return }
        var size = 0
        for byte in data.prefix(8) { size = size << 8 | Int(byte) }
        size = Int(UInt64(bitPattern: Int64(size)) % (1 << 40))
        let header = String(decoding: data.dropFirst(8), as: UTF8.self)
        if let range = Gateway.byteRange(header, size: size) {
            require(range.lowerBound >= 0 && range.upperBound <= size && !range.isEmpty, "range \(range) of \(size)")
        }
    }
}

extension ProtoMessage {
    static func fuzzRoundTrip(_ bytes: UnsafeRawBufferPointer) {
        let type = Self.self
        guard let message = try? Self(serializedBytes: bytes) else { return }
        let encoded = message.serializedBytes()
        let again: Self
        do {
            again = try Self(serializedBytes: encoded)
        } catch {
            require(false, "\(type) re-encoded to bytes that do not decode: \(error)")
            return
        }
        require(again.serializedBytes() == encoded, "\(type) does not round-trip")
    }
}
