import ArgumentParser
import TalkMeshService

/// `talkmesh-gateway`: TalkMesh's public REST API for API-key clients.
@main
struct GatewayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-gateway",
        abstract: "TalkMesh's public REST API for API-key clients.",
        discussion: settingsDiscussion)

    @OptionGroup var options: ServiceOptions

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-gateway", defaultPort: 8080, options: options) { _ in
            // The /v1 REST API arrives with the Gateway issue; health, /healthz, /readyz and /metrics are served now.
        }
    }
}
