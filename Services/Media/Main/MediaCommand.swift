import ArgumentParser
import TalkMeshCore
import TalkMeshMediaService
import TalkMeshService

/// `talkmesh-media`: TalkMesh media service: resize images, stitch videos, probe media.
@main
struct MediaCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-media",
        abstract: "TalkMesh media service: resize images, stitch videos, probe media.",
        discussion: settingsDiscussion + """

              BLOB_STORE                 --blob-store                 where blobs live (default file:///var/lib/talkmesh/blobs)
              MAX_IMAGE_PIXELS           --max-image-pixels           largest image accepted, pixels (default 50000000)
              WORKERS                    --workers                    concurrent media jobs, 0 = one per core (default 0)
            """)

    @OptionGroup var options: ServiceOptions
    @Option(help: "Blob store URL (env BLOB_STORE, default file:///var/lib/talkmesh/blobs).")
    var blobStore: String?
    @Option(help: "Largest image accepted, in pixels (env MAX_IMAGE_PIXELS, default 50000000).")
    var maxImagePixels: String?
    @Option(help: "Concurrent media jobs; 0 = one per core (env WORKERS, default 0).")
    var workers: String?

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-media", defaultPort: 50051, options: options) { setup in
            let settings = SettingsReader()
            let store = try BlobStores.open(settings.string(blobStore, "BLOB_STORE") ?? "file:///var/lib/talkmesh/blobs")
            var configuration = ImageResizer.Configuration()
            configuration.maxPixels = try settings.integer(maxImagePixels, "MAX_IMAGE_PIXELS", 50_000_000, 1...1_000_000_000)
            let pool = BlockingWorkPool(threads: try settings.integer(workers, "WORKERS", 0, 0...256))
            MediaHandlers(store: store, pool: pool, resizer: ImageResizer(store: store, configuration: configuration))
                .register(into: &setup.services)
        }
    }
}
