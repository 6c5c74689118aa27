import Glibc
import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

/// `talkmesh.v1.MediaService` on the RPC runtime; the work runs on the blocking pool.
public struct MediaHandlers: Sendable {
    public let resizer: ImageResizer
    public let stitcher: VideoStitcher
    public let store: any BlobStore
    public let pool: BlockingWorkPool

    public init(store: any BlobStore, pool: BlockingWorkPool, resizer: ImageResizer? = nil) {
        self.store = store
        self.pool = pool
        self.resizer = resizer ?? ImageResizer(store: store)
        self.stitcher = VideoStitcher(store: store)
    }

    /// Each operation's duration and sizes, for `/metrics`.
    public let operations = OperationMetrics()

    public func register(into registry: inout RPCServiceRegistry) {
        let operations = self.operations
        let resizer = self.resizer, stitcher = self.stitcher, store = self.store, pool = self.pool
        // Each libav operation is a span and a metric with its input and output sizes, read from
        // the store by the operation's own pool job (no second job, no wait behind other work).
        registry.register(MediaService.resizeImage) { request, _ in
            try await WorkSpans.run("libav.resize_image", attributes: ["talkmesh.input_key": request.imageKey], metrics: operations) {
                try await pool.run { flag in
                    let response = try resizer.resize(request, flag: flag)
                    return (response, store.totalSize([request.imageKey]), store.totalSize([response.imageKey]))
                }
            }
        }
        registry.register(MediaService.stitchVideos) { request, _ in
            try await WorkSpans.run("libav.stitch_videos", attributes: ["talkmesh.parts": "\(request.videoKeys.count)"], metrics: operations) {
                try await pool.run { flag in
                    let response = try stitcher.stitch(request, flag: flag)
                    return (response, store.totalSize(request.videoKeys + (request.audioKey.isEmpty ? [] : [request.audioKey])), store.totalSize([response.videoKey]))
                }
            }
        }
        let audioEncoder = AudioEncoder(store: store)
        registry.register(MediaService.encodeAudio) { request, _ in
            try await WorkSpans.run("libav.encode_audio", metrics: operations) {
                try await pool.run { flag in
                    let response = try audioEncoder.encode(request, flag: flag)
                    return (response, store.totalSize([request.audioKey]), store.totalSize([response.audioKey]))
                }
            }
        }
        registry.register(MediaService.probeMedia) { request, _ in
            try await pool.run { flag in
                guard !request.key.isEmpty else { throw ServiceError(.invalidArgument, "key: required") }
                let key = try BlobKey(request.key)
                return try store.withLocalFile(key) { path in
                    var info = stat()
                    stat(path, &info)
                    return try MediaProbe.probe(path: path, size: Int64(info.st_size), flag: flag)
                }
            }
        }
    }
}
