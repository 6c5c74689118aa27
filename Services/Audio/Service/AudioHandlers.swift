import TalkMeshCore
import TalkMeshMessages
import TalkMeshRPC

/// `talkmesh.v1.AudioService` on the RPC runtime: each call runs on the blocking work pool;
/// a deadline or a cancelled call stops the work (the pool's cancellation flag).
public struct AudioHandlers: Sendable {
    public let splitter: AudioSplitter
    public let pool: BlockingWorkPool

    public init(splitter: AudioSplitter, pool: BlockingWorkPool) {
        self.splitter = splitter
        self.pool = pool
    }

    /// Each operation's duration and sizes, for `/metrics`.
    public let operations = OperationMetrics()

    public func register(into registry: inout RPCServiceRegistry) {
        let operations = self.operations
        let splitter = self.splitter
        let pool = self.pool
        // The split is a span with the input's size and the chunks' total (read only when traced).
        let store = splitter.store
        let size: @Sendable ([String]) async -> Int? = { keys in
            try? await pool.run { _ in try keys.reduce(0) { $0 + (try store.info(try BlobKey($1))?.size ?? 0) } }
        }
        registry.register(AudioService.splitAudio) { request, _ in
            try await WorkSpans.run("libav.split_audio", attributes: ["talkmesh.input_key": request.audioKey], metrics: operations,
                                    sizes: { (await size([request.audioKey]), await size($0.chunks.map(\.key))) }) {
                try await pool.run { flag in try splitter.split(request, flag: flag) }
            }
        }
        registry.register(AudioService.probeAudio) { request, _ in
            try await pool.run { flag in try splitter.probe(request, flag: flag) }
        }
    }
}
