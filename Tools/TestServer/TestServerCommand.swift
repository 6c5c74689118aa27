import ArgumentParser
import Glibc
import TalkMeshMessages
import TalkMeshRPC
import TalkMeshService

/// `talkmesh-testserver`: hosts `talkmesh.testing.v1.EchoService` on the real runtime, so tests and
/// benchmarks exercise it from real clients (grpcio, h2load, curl, raw sockets).
@main
struct TestServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-testserver",
        abstract: "Serves talkmesh.testing.v1.EchoService for the runtime's tests and benchmarks.",
        discussion: settingsDiscussion)

    @OptionGroup var options: ServiceOptions

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-testserver", defaultPort: 50099, options: options) { setup in
            EchoHandlers(counters: CallCounters()).register(into: &setup.services)
        }
    }
}
