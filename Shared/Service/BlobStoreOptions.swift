import ArgumentParser
import TalkMeshCore

/// The blob store setting of every service that reads or writes blobs (Media, Audio, Dispatcher).
public struct BlobStoreOptions: ParsableArguments {
    @Option(help: "Blob store URL (env BLOB_STORE, default file:///var/lib/talkmesh/blobs).")
    var blobStore: String?

    public init() {}

    /// The `--help` row of this setting.
    public static let discussion = """

          BLOB_STORE                 --blob-store                 where blobs live (default file:///var/lib/talkmesh/blobs)
        """

    /// Opens the blob store (BLOB_STORE).
    public func makeStore(_ settings: SettingsReader) throws -> any BlobStore {
        try BlobStores.open(settings.string(blobStore, "BLOB_STORE") ?? "file:///var/lib/talkmesh/blobs")
    }
}
