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
        // The split is a span and a metric with the input's size and the chunks' total, read by
        // the split's own pool job.
        let store = splitter.store
        registry.register(AudioService.splitAudio) { request, _ in
            try await WorkSpans.run("libav.split_audio", attributes: ["talkmesh.input_key": request.audioKey], metrics: operations) {
                try await pool.run { flag in
                    let response = try splitter.split(request, flag: flag)
                    return (response, store.totalSize([request.audioKey]), store.totalSize(response.chunks.map(\.key)))
                }
            }
        }
        registry.register(AudioService.probeAudio) { request, _ in
            try await pool.run { flag in try splitter.probe(request, flag: flag) }
        }
    }
}
