import ArgumentParser
import TalkMeshCore

/// The settings of services that do blocking media work on blobs (Media, Audio).
public struct WorkerOptions: ParsableArguments {
    @OptionGroup var blobs: BlobStoreOptions
    @Option(help: "Concurrent jobs; 0 = one per core (env WORKERS, default 0).")
    var workers: String?

    public init() {}

    /// The `--help` rows of these settings.
    public static let discussion = BlobStoreOptions.discussion + """

          WORKERS                    --workers                    concurrent jobs, 0 = one per core (default 0)
        """

    /// Opens the blob store (BLOB_STORE).
    public func makeStore(_ settings: SettingsReader) throws -> any BlobStore {
        try blobs.makeStore(settings)
    }

    /// Starts the work pool (WORKERS).
    public func makePool(_ settings: SettingsReader) throws -> BlockingWorkPool {
        BlockingWorkPool(threads: try settings.integer(workers, "WORKERS", 0, 0...256))
    }
}
