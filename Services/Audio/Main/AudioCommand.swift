import ArgumentParser
import TalkMeshAudioService
import TalkMeshCore
import TalkMeshService

/// `talkmesh-audio`: TalkMesh audio service: split speech at silences into RunPod-sized chunks.
@main
struct AudioCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-audio",
        abstract: "TalkMesh audio service: split speech at silences into RunPod-sized chunks.",
        discussion: settingsDiscussion + """

              BLOB_STORE                 --blob-store                 where blobs live (default file:///var/lib/talkmesh/blobs)
              MAX_AUDIO_SEC              --max-audio-sec              longest audio accepted, seconds (default 1800)
              WORKERS                    --workers                    concurrent decodes, 0 = one per core (default 0)
            """)

    @OptionGroup var options: ServiceOptions
    @Option(help: "Blob store URL (env BLOB_STORE, default file:///var/lib/talkmesh/blobs).")
    var blobStore: String?
    @Option(help: "Longest audio accepted, in seconds (env MAX_AUDIO_SEC, default 1800).")
    var maxAudioSec: String?
    @Option(help: "Concurrent decodes; 0 = one per core (env WORKERS, default 0).")
    var workers: String?

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-audio", defaultPort: 50052, options: options) { setup in
            let settings = SettingsReader()
            let store = try BlobStores.open(settings.string(blobStore, "BLOB_STORE") ?? "file:///var/lib/talkmesh/blobs")
            var configuration = AudioSplitter.Configuration()
            configuration.maxAudioSeconds = Double(try settings.integer(maxAudioSec, "MAX_AUDIO_SEC", 1800, 1...86_400))
            let pool = BlockingWorkPool(threads: try settings.integer(workers, "WORKERS", 0, 0...256))
            AudioHandlers(splitter: AudioSplitter(store: store, configuration: configuration), pool: pool).register(into: &setup.services)
        }
    }
}
