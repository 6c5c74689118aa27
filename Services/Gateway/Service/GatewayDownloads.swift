import Foundation
import Glibc
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

extension Gateway {
    func installDownloadRoutes(into router: inout HTTPRouter) {
        router.add("GET", "/v1/jobs/{id}/video") { [self] request in
            let job = try await ownJob(request.pathParameters["id"] ?? "")
            guard job.status == .completed, !job.videoKey.isEmpty else {
                throw ServiceError(.jobNotCompleted, "job \(job.id) is \(JobJSON.status(job.status)); the video exists once it is completed")
            }
            try Self.requireVideo(job)
            return try await video(job, request)
        }
        router.add("GET", "/v1/jobs/{id}/events") { [self] request in
            let job = try await ownJob(request.pathParameters["id"] ?? "")
            return events(job, lastEventID: request.header("last-event-id").flatMap { Int64($0.trimmingCharacters(in: .whitespaces)) })
        }
    }

    // MARK: Video

    /// The MP4 streamed from the BlobStore with an ETag, `Range` (one range → 206) and
    /// `If-None-Match` (→ 304): read slice by slice on the blob threads, so a download holds
    /// one slice of memory whatever the video's size, on either store.
    private func video(_ job: Job, _ request: HTTPRequest) async throws -> HTTPResponse {
        let key = try BlobKey(job.videoKey)
        let blobs = self.blobs, blobIO = self.blobIO
        guard let info = try await blobIO.run({ _ in try blobs.info(key) }) else {
            throw ServiceError(.notFound, "the video of job \(job.id) is gone")
        }
        let size = info.size
        let etag = "\"\(Digest.sha256Hex(job.videoKey + ":\(size):" + info.etag).prefix(32))\""
        var headers: [(name: String, value: String)] = [("content-type", "video/mp4"), ("etag", etag), ("accept-ranges", "bytes"),
                                                        ("cache-control", "private, max-age=3600")]
        if let match = request.header("if-none-match"), match.split(separator: ",").contains(where: {
            let tag = $0.trimmingCharacters(in: .whitespaces)
            return tag == etag || tag == "W/" + etag || tag == "*"
        }) {
            return HTTPResponse(status: 304, headers: headers.filter { $0.name != "content-type" })
        }
        var status = 200
        var range = 0..<size
        if let header = request.header("range") {
            guard let requested = Self.byteRange(header, size: size) else {
                var response = JobJSON.error(416, "RANGE_NOT_SATISFIABLE", "the video has \(size) bytes; Range \(header) asks for none of them")
                response.headers.append(("content-range", "bytes */\(size)"))
                return response
            }
            status = 206
            range = requested
            headers.append(("content-range", "bytes \(range.lowerBound)-\(range.upperBound - 1)/\(size)"))
        }
        headers.append(("content-length", String(range.count)))
        var response = HTTPResponse(status: status, headers: headers)
        let sent = range
        response.streamBody = { writer in
            var offset = sent.lowerBound
            while offset < sent.upperBound {
                let slice = offset..<min(sent.upperBound, offset + Self.videoSlice)
                let bytes = try await blobIO.run { _ in try blobs.read(key, range: slice) }
                guard !bytes.isEmpty else { throw ServiceError(.storageFailed, "the video ended early") }
                try await writer.write(bytes)
                offset += bytes.count
            }
        }
        return response
    }

    /// Bytes read from the store per step of a download.
    static let videoSlice = 1 << 20

    /// One `bytes=a-b`, `bytes=a-` or `bytes=-n` range within `size`; nil when unsatisfiable.
    /// (Several ranges are answered with the first.)
    package static func byteRange(_ header: String, size: Int) -> Range<Int>? {
        let text = header.trimmingCharacters(in: .whitespaces)
        guard text.lowercased().hasPrefix("bytes="), size > 0 else { return nil }
        let first = text.dropFirst(6).split(separator: ",").first.map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        let parts = first.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 2 else { return nil }
        if parts[0].isEmpty {
            guard let suffix = Int(parts[1]), suffix > 0 else { return nil }
            return max(0, size - suffix)..<size
        }
        guard let start = Int(parts[0]), start >= 0, start < size else { return nil }
        if parts[1].isEmpty { return start..<size }
        guard let end = Int(parts[1]), end >= start else { return nil }
        return start..<min(end, size - 1) + 1  // `end` may be Int.max: no `end + 1`
    }

    // MARK: Events

    /// Server-Sent Events from `WatchJob`: one `job` event per stored change (its id is the job's
    /// version, so `Last-Event-ID` skips what the client saw), keep-alive comments between them,
    /// and the end of the stream once the job is terminal. Each change also refreshes the job
    /// cache, so a poll after an event never answers an older state than the event showed.
    private func events(_ job: Job, lastEventID: Int64?) -> HTTPResponse {
        var response = HTTPResponse(status: 200, headers: [("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                                                           ("x-accel-buffering", "no")])
        let dispatcher = self.dispatcher, cache = jobCache, keepAlive = configuration.keepAliveNanoseconds, id = job.id
        response.streamBody = { writer in
            try await writer.write(Array("retry: 2000\n\n".utf8))
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    while true {
                        try await Task.sleep(nanoseconds: UInt64(keepAlive))
                        try await writer.write(Array(": keep-alive\n\n".utf8))
                    }
                }
                group.addTask {
                    var request = WatchJobRequest()
                    request.id = id
                    var seen = lastEventID ?? -1
                    let stream = try await dispatcher.serverStreaming(DispatcherService.watchJob, request)
                    for try await job in stream {
                        if job.version > seen {
                            seen = job.version
                            let data = String(decoding: cache.store(job).body, as: UTF8.self)
                            try await writer.write(Array("id: \(job.version)\nevent: job\ndata: \(data)\n\n".utf8))
                        }
                        if JobJSON.isTerminal(job.status) { return }
                    }
                }
                // The watch ends the stream (terminal job, or an error); the keep-alive goes with it.
                try await group.next()
                group.cancelAll()
            }
        }
        return response
    }
}
