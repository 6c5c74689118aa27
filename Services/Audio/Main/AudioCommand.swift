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
        discussion: settingsDiscussion + WorkerOptions.discussion + """

              MAX_AUDIO_SEC              --max-audio-sec              longest audio accepted, seconds (default 1800)
            """)

    @OptionGroup var options: ServiceOptions
    @OptionGroup var work: WorkerOptions
    @Option(help: "Longest audio accepted, in seconds (env MAX_AUDIO_SEC, default 1800).")
    var maxAudioSec: String?

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-audio", defaultPort: 50052, options: options) { setup in
            let settings = SettingsReader()
            var configuration = AudioSplitter.Configuration()
            configuration.maxAudioSeconds = Double(try settings.integer(maxAudioSec, "MAX_AUDIO_SEC", 1800, 1...86_400))
            let splitter = AudioSplitter(store: try work.makeStore(settings), configuration: configuration)
            AudioHandlers(splitter: splitter, pool: try work.makePool(settings)).register(into: &setup.services)
        }
    }
}
