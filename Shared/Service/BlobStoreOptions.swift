import ArgumentParser
import TalkMeshCore

/// The blob store setting of every service that reads or writes blobs (Media, Audio, Dispatcher).
public struct BlobStoreOptions: ParsableArguments {
    @Option(help: "Blob store URL: file:///dir or s3://bucket/prefix (env BLOB_STORE, default file:///var/lib/talkmesh/blobs).")
    var blobStore: String?

    public init() {}

    /// The `--help` row of this setting.
    public static let discussion = """

          BLOB_STORE                 --blob-store                 where blobs live: file:///dir or s3://bucket/prefix (default file:///var/lib/talkmesh/blobs)
          S3_ENDPOINT                                             S3 API endpoint, http(s)://host[:port] (default AWS's regional one)
          S3_REGION                                               signing region (default AWS_REGION or us-east-1)
          S3_PATH_STYLE                                           endpoint/bucket/key instead of bucket.endpoint/key (default true with S3_ENDPOINT)
          AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN   S3 credentials (or AWS_SHARED_CREDENTIALS_FILE + AWS_PROFILE)
          S3_MULTIPART_THRESHOLD, S3_PART_SIZE                    uploads above the threshold go in parts (default 16MiB, 8MiB)
          S3_MAX_ATTEMPTS                                         attempts per S3 request on throttling, 5xx or a lost connection (default 5)
          S3_SCRATCH_DIR                                          local copies and outputs on their way in (default $TMPDIR/talkmesh-scratch)
        """

    /// Opens the blob store (BLOB_STORE).
    public func makeStore(_ settings: SettingsReader) throws -> any BlobStore {
        try BlobStores.open(settings.string(blobStore, "BLOB_STORE") ?? "file:///var/lib/talkmesh/blobs", setting: { settings.string(nil, $0) })
    }
}
