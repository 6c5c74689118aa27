import ArgumentParser
import Glibc
import TalkMeshBase
import TalkMeshMessages
import TalkMeshRPC
import TalkMeshService

/// `talkmesh`: the command-line tool.
@main
struct TalkMeshCLI: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh",
        abstract: "TalkMesh's command-line tool.",
        subcommands: [UpCommand.self, SubmitCommand.self, StatusCommand.self, JobsCommand.self, CancelCommand.self, WatchCommand.self,
                      TimelineCommand.self, HealthCommand.self, KeysCommand.self, BlobsCommand.self])
}

/// Client TLS flags shared by the commands that call a service.
struct ClientTLSOptions: ParsableArguments {
    @Flag(help: "Use TLS (ALPN h2), verifying the server against --ca-file or the system roots.")
    var tls = false
    @Option(help: "CA certificates (PEM) to verify the server (env TLS_CA_FILE).")
    var caFile: String?
    @Option(help: "Client certificate (PEM) for mutual TLS (env TLS_CERT_FILE).")
    var certFile: String?
    @Option(help: "Client private key (PEM) for mutual TLS (env TLS_KEY_FILE).")
    var keyFile: String?
    @Option(help: "Server name to send and verify, when it differs from the target.")
    var authority: String?

    func makeTLS() throws -> ClientTLS? {
        let environment = ProcessEnvironment.current()
        let ca = caFile ?? environment["TLS_CA_FILE"]
        let certificate = certFile ?? environment["TLS_CERT_FILE"]
        let key = keyFile ?? environment["TLS_KEY_FILE"]
        guard tls || caFile != nil || certFile != nil else { return nil }
        return try ClientTLS(caFile: ca, certificateFile: certificate, keyFile: key)
    }
}

/// `talkmesh health TARGET`: like grpc_health_probe, usable as a Kubernetes exec probe.
struct HealthCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "health",
        abstract: "Calls grpc.health.v1.Health/Check and prints the status.",
        discussion: """
            Exit codes: 0 SERVING; 1 bad arguments; 2 cannot connect; 3 the call failed; 4 not serving \
            (NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN).
            TARGET: host:port, dns:///name:port, dns://server/name:port, ipv4:a:p,b:p.
            """)

    @Argument(help: "The service address.")
    var target: String
    @Option(help: "The service name to check; empty is the whole server.")
    var service = ""
    @Option(help: "How long to wait (e.g. 1s, 500ms).")
    var timeout = "1s"
    @OptionGroup var tlsOptions: ClientTLSOptions
    @Flag(help: "Print {\"status\": \"SERVING\"} (or {\"error\": {\"code\", \"message\"}}) for scripts.") var json = false

    func run() async throws {
        guard let timeoutNanoseconds = DurationSetting.parseNanoseconds(timeout), timeoutNanoseconds > 0 else {
            StandardStream.write(2, "talkmesh health: --timeout \(timeout) is not a duration\n")
            throw ExitCode(1)
        }
        let client: RPCClient
        do {
            var configuration = RPCClient.Configuration(target: target, tls: try tlsOptions.makeTLS())
            configuration.authorityOverride = tlsOptions.authority
            configuration.connectTimeoutNanoseconds = timeoutNanoseconds
            configuration.maxTransparentRetries = 0
            client = try RPCClient(configuration: configuration)
        } catch {
            StandardStream.write(2, "talkmesh health: \(error)\n")
            throw ExitCode(1)
        }
        defer { client.close() }
        var request = HealthCheckRequest()
        request.service = service
        do {
            let response = try await client.unary(Health.check, request, options: CallOptions(timeoutNanoseconds: timeoutNanoseconds))
            if json { JSONOutput.print(["status": response.status.description]) } else { print(response.status.description) }
            if response.status != .serving { throw ExitCode(4) }
        } catch let error as RPCError {
            StandardStream.write(2, "talkmesh health: \(target): \(error.code): \(error.message)\n")
            if json { JSONOutput.print(["error": ["code": "\(error.code)", "message": error.message]]) }
            throw ExitCode(error.code == .unavailable ? 2 : error.code == .notFound ? 4 : 3)
        }
    }
}
