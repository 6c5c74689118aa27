import TalkMeshCore
import TalkMeshMediaService
import TalkMeshService

extension Setting {
    static let maxImagePixels = Setting("MAX_IMAGE_PIXELS", .integer(1...1_000_000_000), default: "50000000",
                                        help: "largest source image, pixels")
}

/// `talkmesh-media`: TalkMesh media service: resize images, stitch videos, probe media.
@main
enum MediaCommand {
    static let settings: [Setting] = BlobSettings.table + [.workers, .maxImagePixels]

    static func main() {
        ServiceRunner.run(name: "talkmesh-media", abstract: "TalkMesh media service: resize images, stitch videos, probe media.",
                          defaultPort: 50051, settings: settings) { setup, settings in
            let store = try BlobSettings.makeStore(settings)
            var configuration = ImageResizer.Configuration()
            configuration.maxPixels = try settings.integer(.maxImagePixels)
            let pool = try BlobSettings.makePool(settings)
            setup.metricsSources.append { pool.prometheusText() }
            let handlers = MediaHandlers(store: store, pool: pool, resizer: ImageResizer(store: store, configuration: configuration))
            handlers.register(into: &setup.services)
            setup.metricsSources.append { handlers.operations.render() }
        }
    }
}
