import Glibc
import Logging
import TalkMeshAudioService
import TalkMeshCore
import TalkMeshGatewayService
import TalkMeshMessages
import TalkMeshRPC

/// A scratch directory for the process, removed at exit.
enum Scratch {
    nonisolated(unsafe) static var directory = ""

    static func make() -> String {
        if directory.isEmpty {
            var template = Array("/tmp/talkmesh-fuzz-XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else { fatalError("mkdtemp failed: errno \(errno)") }
            directory = String(cString: made)
            atexit { _ = system("rm -rf '\(Scratch.directory)'") }
        }
        return directory
    }
}

/// The Gateway's upload readers (multipart and JSON) over a file BlobStore; every input's
/// scratch files are removed after it.
enum UploadHarness {
    nonisolated(unsafe) static var store: FileBlobStore?
    static let limits: UploadLimits = {
        var limits = UploadLimits()
        limits.imageBytes = 64 << 10
        limits.audioBytes = 64 << 10
        limits.fieldBytes = 1024
        return limits
    }()

    static func setUp() {
        store = try! FileBlobStore(root: Scratch.make())
    }

    static func multipart(_ data: UnsafeBufferPointer<UInt8>) {
        let form = UploadForm(store: store!, limits: limits)
        defer { form.discard() }
        var reader = MultipartReader(boundary: "fuzz-boundary", form: form)
        do {
            for piece in FuzzTargets.pieces(data) { try reader.feed(Array(piece)) }
            try reader.finish()
        } catch {}
    }

    static func json(_ data: UnsafeBufferPointer<UInt8>) {
        let form = UploadForm(store: store!, limits: limits)
        defer { form.discard() }
        var reader = JSONUploadReader(form: form)
        do {
            for piece in FuzzTargets.pieces(data) { try reader.feed(Array(piece)) }
            try reader.finish()
        } catch {}
    }
}

/// The Audio service's decoder (libav, in process) on any bytes as an uploaded file.
enum AudioHarness {
    nonisolated(unsafe) static var path = ""

    static func setUp() {
        path = Scratch.make() + "/input"
    }

    static func decode(_ data: UnsafeBufferPointer<UInt8>) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { return }
        if let base = data.baseAddress { _ = write(fd, base, data.count) }
        close(fd)
        let flag = CancellationFlag()
        guard let probe = try? AudioDecoding.probe(path: path, flag: flag) else { return }
        require(probe.sampleRate > 0 && probe.channels > 0, "probe gave \(probe.sampleRate) Hz × \(probe.channels)")
        if let decoded = try? AudioDecoding.decode(path: path, flag: flag, outputRate: 16000, outputChannels: 1, maxSeconds: 30) {
            require(decoded.converted.count <= 16000 * 31, "decoded past maxSeconds: \(decoded.converted.count) samples")
        }
    }
}

/// A real server in this process (one event loop, gRPC echo and HTTP routes, small limits) and,
/// per input, one TCP connection that sends the bytes (after the HTTP/2 preface for HTTP/2),
/// half-closes, and reads until the server closes.
enum ServerHarness {
    nonisolated(unsafe) static var port: UInt16 = 0
    nonisolated(unsafe) static var server: RPCServer?
    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    /// TALKMESH_FUZZ_ANSWERS=1: the server's answers go to standard output (triage, tests).
    static let showAnswers = getenv("TALKMESH_FUZZ_ANSWERS") != nil

    static func setUp() {
        var configuration = RPCServer.Configuration()
        configuration.host = "127.0.0.1"
        configuration.eventLoops = 1
        configuration.maxReceiveMessageBytes = 64 << 10
        configuration.maxBodyBytes = 64 << 10
        configuration.maxHeaderBytes = 8 << 10
        configuration.maxConcurrentStreams = 64
        configuration.bodyTimeoutNanoseconds = 2_000_000_000
        configuration.idleTimeoutNanoseconds = 2_000_000_000
        var registry = RPCServiceRegistry()
        registry.register(EchoService.echo) { request, _ in
            var response = EchoResponse()
            response.payload = request.payload
            response.text = request.text
            return response
        }
        registry.register(EchoService.expand) { request, _, writer in
            for index in 0..<min(8, max(0, Int(request.count))) {
                var response = EchoResponse()
                response.sequence = Int32(index)
                try await writer.write(response)
            }
        }
        var router = HTTPRouter()
        router.add("POST", "/echo", maxBodyBytes: 16 << 10) { request in
            HTTPResponse(status: 200, headers: [("content-type", "application/octet-stream")], body: request.body)
        }
        router.add("GET", "/items/{id}") { request in .text(200, request.pathParameters["id"] ?? "") }
        router.addStreaming("POST", "/upload", maxBodyBytes: 64 << 10) { request in
            var total = 0
            while let piece = try await request.bodyStream?.next() { total += piece.count }
            return .text(200, "\(total)\n")
        }
        var logger = Logger(label: "fuzz")
        logger.logLevel = .critical
        let server = try! RPCServer(configuration: configuration, services: registry, router: router, logger: logger)
        port = UInt16(try! server.bind())
        self.server = server
        var thread = pthread_t()
        pthread_create(&thread, nil, { _ in
            ServerHarness.server!.run()
            return nil
        }, nil)
    }

    static func exchange(_ data: UnsafeBufferPointer<UInt8>, http2: Bool) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { return }
        var sent = http2 ? preface : []
        sent += data
        var offset = 0
        if sent.isEmpty { shutdown(fd, Int32(SHUT_WR)) }
        var scratch = [UInt8](repeating: 0, count: 65536)
        // Write and read together: a server that answers as it reads must not deadlock us.
        while true {
            var poller = pollfd(fd: fd, events: Int16(POLLIN) | (offset < sent.count ? Int16(POLLOUT) : 0), revents: 0)
            guard poll(&poller, 1, 2000) > 0 else { return }  // the server holds the connection: give up
            if poller.revents & Int16(POLLOUT) != 0, offset < sent.count {
                let written = sent[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                guard written > 0 else { return }
                offset += written
                if offset == sent.count { shutdown(fd, Int32(SHUT_WR)) }
            }
            if poller.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                let count = recv(fd, &scratch, scratch.count, 0)
                if count <= 0 { return }
                if showAnswers { _ = scratch.withUnsafeBytes { Glibc.write(1, $0.baseAddress, count) } }
            }
        }
    }
}
