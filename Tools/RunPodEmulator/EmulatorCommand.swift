import ArgumentParser
import Glibc
import TalkMeshCore
import TalkMeshService

/// `talkmesh-runpod-emulator`: RunPod's serverless API on loopback, with workers that really render.
@main
struct EmulatorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "talkmesh-runpod-emulator",
        abstract: "Emulates RunPod Serverless (/v2/{endpoint}/run, status, cancel, retry, health, purge-queue) with InfiniteTalk-shaped rendering.",
        discussion: settingsDiscussion + "\n\n  RUNPOD_API_KEY: when set, requests must carry Authorization: Bearer <key>.")

    @OptionGroup var options: ServiceOptions
    @Option(help: "Simulated workers.") var workers = 2
    @Option(help: "Cold-start delay of a worker's first job (e.g. 2s).") var coldStart = "0s"
    @Option(help: "Seconds of processing per second of audio (0: instant).") var speed = 0.0
    @Option(help: "How long results are kept after completion.") var retention = "30m"
    @Option(help: "Fraction of jobs that end FAILED.") var failRate = 0.0
    @Option(help: "Fraction of jobs COMPLETED without output.") var missingOutputRate = 0.0
    @Option(help: "Fraction of jobs that never finish.") var hangRate = 0.0
    @Option(name: .customLong("http-429-rate"), help: "Fraction of requests answered 429.") var http429Rate = 0.0
    @Option(name: .customLong("http-500-rate"), help: "Fraction of requests answered 500.") var http500Rate = 0.0
    @Option(help: "Delay of every status response (e.g. 500ms).") var slowStatus = "0s"
    @Option(help: "Seed of the fault draws.") var seed: UInt64 = 1

    static func main() { mainExitingTwoOnError() }

    func run() throws {
        ServiceRunner.run(name: "talkmesh-runpod-emulator", defaultPort: 8090, options: options) { setup in
            func seconds(_ text: String, _ name: String) throws -> Double {
                guard let value = DurationSetting.parseNanoseconds(text) else {
                    throw ServiceOptions.InvalidSetting(description: "--\(name)=\(text): expected a duration such as 500ms or 2s")
                }
                return Double(value) / 1e9
            }
            for (value, name) in [(failRate, "fail-rate"), (missingOutputRate, "missing-output-rate"), (hangRate, "hang-rate"),
                                  (http429Rate, "http-429-rate"), (http500Rate, "http-500-rate")] where !(0...1).contains(value) {
                throw ServiceOptions.InvalidSetting(description: "--\(name)=\(value): expected a fraction from 0 to 1")
            }
            guard (1...256).contains(workers) else { throw ServiceOptions.InvalidSetting(description: "--workers=\(workers): expected 1…256") }
            var settings = JobBoard.Settings()
            settings.workers = workers
            settings.coldStartSeconds = try seconds(coldStart, "cold-start")
            settings.speed = max(0, speed)
            settings.retentionSeconds = try seconds(retention, "retention")
            settings.failRate = failRate
            settings.missingOutputRate = missingOutputRate
            settings.hangRate = hangRate
            settings.seed = seed
            let board = JobBoard(settings: settings)
            let scratch = "/tmp/talkmesh-runpod-emulator-\(getpid())"
            mkdir(scratch, 0o700)
            EmulatedWorkers(board: board, renderer: StillVideoRenderer(scratch: scratch), pool: BlockingWorkPool()).start()
            let apiKey = ProcessEnvironment.current()["RUNPOD_API_KEY"].flatMap { $0.isEmpty ? nil : $0 }
            let faults = EmulatorAPI.Faults(http429Rate: http429Rate, http500Rate: http500Rate, slowStatusSeconds: try seconds(slowStatus, "slow-status"))
            EmulatorAPI(board: board, apiKey: apiKey, faults: faults).register(into: &setup.router)
        }
    }
}
