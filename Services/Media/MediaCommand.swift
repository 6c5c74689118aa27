import ArgumentParser
import TalkMeshService

/// `talkmesh-media`: TalkMesh media service: resize images, stitch videos, probe media.
@main
struct MediaCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-media",
        abstract: "TalkMesh media service: resize images, stitch videos, probe media.",
        discussion: settingsDiscussion)

    @OptionGroup var options: ServiceOptions

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-media", defaultPort: 50051, options: options) { _ in
            // talkmesh.v1.MediaService arrives with the Media issue; until then its methods answer UNIMPLEMENTED.
        }
    }
}
