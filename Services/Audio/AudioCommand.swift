import ArgumentParser
import TalkMeshService

/// `talkmesh-audio`: TalkMesh audio service: split speech at silences into RunPod-sized chunks.
@main
struct AudioCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-audio",
        abstract: "TalkMesh audio service: split speech at silences into RunPod-sized chunks.",
        discussion: settingsDiscussion)

    @OptionGroup var options: ServiceOptions

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-audio", defaultPort: 50052, options: options) { _ in
            // talkmesh.v1.AudioService arrives with the Audio issue; until then its methods answer UNIMPLEMENTED.
        }
    }
}
