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
        discussion: settingsDiscussion + WorkerOptions.discussion + """

              MAX_IMAGE_PIXELS           --max-image-pixels           largest image accepted, pixels (default 50000000)
            """)

    @OptionGroup var options: ServiceOptions
    @OptionGroup var work: WorkerOptions
    @Option(help: "Largest image accepted, in pixels (env MAX_IMAGE_PIXELS, default 50000000).")
    var maxImagePixels: String?

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-media", defaultPort: 50051, options: options) { setup in
            let settings = SettingsReader()
            let store = try work.makeStore(settings)
            var configuration = ImageResizer.Configuration()
            configuration.maxPixels = try settings.integer(maxImagePixels, "MAX_IMAGE_PIXELS", 50_000_000, 1...1_000_000_000)
            MediaHandlers(store: store, pool: try work.makePool(settings), resizer: ImageResizer(store: store, configuration: configuration))
                .register(into: &setup.services)
        }
    }
}
