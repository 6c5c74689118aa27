import ArgumentParser
import TalkMeshService

/// `talkmesh-dispatcher`: TalkMesh dispatcher: owns every job and drives it through RunPod.
@main
struct DispatcherCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-dispatcher",
        abstract: "TalkMesh dispatcher: owns every job and drives it through RunPod.",
        discussion: settingsDiscussion)

    @OptionGroup var options: ServiceOptions

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-dispatcher", defaultPort: 50053, options: options) { _ in
            // talkmesh.v1.DispatcherService arrives with the Dispatcher issue; until then its methods answer UNIMPLEMENTED.
        }
    }
}
