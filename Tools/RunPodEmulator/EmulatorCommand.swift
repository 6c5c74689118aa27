import Glibc
import TalkMeshCore
import TalkMeshService

/// The emulator's own settings: a flag each (as before), and an `EMULATOR_` variable.
extension Setting {
    private static let fraction = Kind.number(0...1)
    static let emulatorWorkers = Setting("EMULATOR_WORKERS", .integer(1...256), default: "2", flag: "--workers", help: "simulated workers")
    static let coldStart = Setting("EMULATOR_COLD_START", .duration(.zero ... .seconds(3600)), default: "0s", flag: "--cold-start",
                                   help: "cold-start delay of a worker's first job")
    static let speed = Setting("EMULATOR_SPEED", .number(0...1000), default: "0", flag: "--speed",
                               help: "seconds of processing per second of audio (0: instant)")
    static let retention = Setting("EMULATOR_RETENTION", .duration(.zero ... .seconds(30 * 86_400)), default: "30m", flag: "--retention",
                                   help: "how long results are kept after completion")
    static let failRate = Setting("EMULATOR_FAIL_RATE", fraction, default: "0", flag: "--fail-rate", help: "fraction of jobs that end FAILED")
    static let missingOutputRate = Setting("EMULATOR_MISSING_OUTPUT_RATE", fraction, default: "0", flag: "--missing-output-rate",
                                           help: "fraction of jobs COMPLETED without output")
    static let hangRate = Setting("EMULATOR_HANG_RATE", fraction, default: "0", flag: "--hang-rate", help: "fraction of jobs that never finish")
    static let http429Rate = Setting("EMULATOR_HTTP_429_RATE", fraction, default: "0", flag: "--http-429-rate",
                                     help: "fraction of requests answered 429")
    static let http500Rate = Setting("EMULATOR_HTTP_500_RATE", fraction, default: "0", flag: "--http-500-rate",
                                     help: "fraction of requests answered 500")
    static let slowStatus = Setting("EMULATOR_SLOW_STATUS", .duration(.zero ... .seconds(3600)), default: "0s", flag: "--slow-status",
                                    help: "delay of every status response")
    static let webhookRetry = Setting("EMULATOR_WEBHOOK_RETRY", .duration(.zero ... .seconds(600)), default: "10s", flag: "--webhook-retry",
                                      help: "wait between the three tries of a job's webhook (RunPod: 10 s)")
    static let seed = Setting("EMULATOR_SEED", .integer(0...Int.max), default: "1", flag: "--seed", help: "seed of the fault draws")
}

/// `talkmesh-runpod-emulator`: RunPod's serverless API on loopback, with workers that really render.
@main
enum EmulatorCommand {
    static let settings: [Setting] = [
        .emulatorWorkers, .coldStart, .speed, .retention, .failRate, .missingOutputRate, .hangRate, .http429Rate, .http500Rate, .slowStatus,
        .seed, .webhookRetry, .runPodAPIKey,
    ]

    static func main() {
        ServiceRunner.run(name: "talkmesh-runpod-emulator",
                          abstract: "Emulates RunPod Serverless (/v2/{endpoint}/run, status, cancel, retry, health, purge-queue) with InfiniteTalk-shaped rendering.",
                          defaultPort: 8090, settings: settings) { setup, values in
            func seconds(_ setting: Setting) throws -> Double { Double(try values.duration(setting).nanosecondsClamped) / 1e9 }
            var settings = JobBoard.Settings()
            settings.workers = try values.integer(.emulatorWorkers)
            settings.coldStartSeconds = try seconds(.coldStart)
            settings.speed = try values.number(.speed)
            settings.retentionSeconds = try seconds(.retention)
            settings.failRate = try values.number(.failRate)
            settings.missingOutputRate = try values.number(.missingOutputRate)
            settings.hangRate = try values.number(.hangRate)
            settings.seed = UInt64(try values.integer(.seed))
            let board = JobBoard(settings: settings)
            // Renders pass through files here (each removed after its render); the directory goes
            // when the emulator stops, so runs do not leave one behind each.
            let scratch = "\(getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp")/talkmesh-runpod-emulator-\(getpid())"
            mkdir(scratch, 0o700)
            let renderer = StillVideoRenderer(scratch: scratch)
            setup.onStop.append { await renderer.close(waitingUpTo: 10) }
            var workers = EmulatedWorkers(board: board, renderer: renderer, pool: BlockingWorkPool())
            workers.webhookRetrySeconds = try seconds(.webhookRetry)
            workers.start()
            let apiKey = try values.string(.runPodAPIKey).flatMap { $0.isEmpty ? nil : $0 }
            let faults = EmulatorAPI.Faults(http429Rate: try values.number(.http429Rate), http500Rate: try values.number(.http500Rate),
                                            slowStatusSeconds: try seconds(.slowStatus))
            EmulatorAPI(board: board, apiKey: apiKey, faults: faults).register(into: &setup.router)
        }
    }
}
