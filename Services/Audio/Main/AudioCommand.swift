import TalkMeshAudioService
import TalkMeshCore
import TalkMeshService

/// `talkmesh-audio`: TalkMesh audio service: split speech at silences into RunPod-sized chunks.
@main
enum AudioCommand {
    static let settings: [Setting] = BlobSettings.table + [.workers, .maxAudioSec]

    static func main() {
        ServiceRunner.run(name: "talkmesh-audio", abstract: "TalkMesh audio service: split speech at silences into RunPod-sized chunks.",
                          defaultPort: 50052, settings: settings) { setup, settings in
            var configuration = AudioSplitter.Configuration()
            configuration.maxAudioSeconds = Double(try settings.integer(.maxAudioSec))
            let splitter = AudioSplitter(store: try BlobSettings.makeStore(settings), configuration: configuration)
            let pool = try BlobSettings.makePool(settings)
            setup.metricsSources.append { pool.prometheusText() }
            let handlers = AudioHandlers(splitter: splitter, pool: pool)
            handlers.register(into: &setup.services)
            setup.metricsSources.append { handlers.operations.render() }
        }
    }
}
