import TalkMeshCore

/// Where blobs live (every service that reads or writes them), and S3's own settings, which the
/// S3 store reads and checks itself (`S3Settings`); listed here so `--help` and the README show them.
extension Setting {
    public static let blobStore = Setting("BLOB_STORE", default: "file:///var/lib/talkmesh/blobs", readBy: "Gateway, Media, Audio, Dispatcher, `talkmesh blobs`",
                                          help: "where blobs live: `file:///dir` (one directory shared by all) or `s3://bucket/prefix`")
    static let s3 = "with `s3://`"
    public static let s3Settings: [Setting] = [
        Setting("S3_ENDPOINT", shown: "`https://s3.<region>.amazonaws.com`", flag: nil, readBy: s3,
                help: "the S3 API's `http(s)://host[:port]` (R2, MinIO, a test server)"),
        Setting("S3_REGION", shown: "`AWS_REGION`, else `us-east-1`", flag: nil, readBy: s3, help: "the signing region"),
        Setting("S3_PATH_STYLE", shown: "`true` when `S3_ENDPOINT` is set, else `false`", flag: nil, readBy: s3,
                help: "`endpoint/bucket/key` instead of `bucket.endpoint/key`"),
        Setting("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN", flag: nil, readBy: s3, help: "credentials"),
        Setting("AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE", shown: "`~/.aws/credentials`, `default`", flag: nil, readBy: s3,
                help: "credentials from an AWS credentials file instead"),
        Setting("S3_MULTIPART_THRESHOLD, S3_PART_SIZE", shown: "`16MiB`, `8MiB`", flag: nil, readBy: s3,
                help: "uploads larger than the threshold go in parts of this size (5 MiB–5 GiB)"),
        Setting("S3_MAX_ATTEMPTS", shown: "`5`", flag: nil, readBy: s3, help: "attempts per request on throttling, 5xx or a lost connection (1–20)"),
        Setting("S3_SCRATCH_DIR", shown: "`$TMPDIR/talkmesh-scratch`", flag: nil, readBy: s3,
                help: "local copies of blobs while libav reads them, outputs on their way up"),
    ]
    /// Read by the Gateway (before it stores an upload) and Audio (before it decodes one).
    public static let maxAudioSec = Setting("MAX_AUDIO_SEC", .integer(1...86_400), default: "1800",
                                            help: "longest audio accepted (`AUDIO_TOO_LONG`), seconds")
    public static let workers = Setting("WORKERS", .integer(0...256), default: "0", help: "concurrent media jobs / decodes, 0 = one per core")
}

/// The blob store and the work pool, from their settings.
public enum BlobSettings {
    /// `BLOB_STORE` and the S3 rows.
    public static let table: [Setting] = [.blobStore] + Setting.s3Settings

    /// Opens the blob store (`BLOB_STORE`; the S3 settings from the environment).
    public static func makeStore(_ settings: Settings) throws -> any BlobStore {
        let environment = settings.environment
        let url = try settings.string(.blobStore) ?? "file:///var/lib/talkmesh/blobs"
        let store = try BlobStores.open(url, setting: { environment[$0].flatMap { $0.isEmpty ? nil : $0 } })
        return MeteredBlobStore(store, kind: url.hasPrefix("s3://") ? "s3" : "file")
    }

    /// Starts the work pool (`WORKERS`).
    public static func makePool(_ settings: Settings) throws -> BlockingWorkPool {
        BlockingWorkPool(threads: try settings.integer(.workers), name: "work-pool")
    }
}
