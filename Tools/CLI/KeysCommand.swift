import ArgumentParser
import Foundation
import TalkMeshGatewayService
import TalkMeshService

/// `talkmesh keys create|list|revoke`: the Gateway's API-key file (only hashes are stored).
struct KeysCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keys",
        abstract: "Manages the Gateway's API keys (the file from --keys-file or API_KEYS_FILE).",
        subcommands: [Create.self, List.self, Revoke.self])

    struct FileOption: ParsableArguments {
        @Option(help: "The API key file (env API_KEYS_FILE).") var keysFile: String?

        func path() throws -> String {
            guard let path = keysFile ?? ProcessEnvironment.current()["API_KEYS_FILE"], !path.isEmpty else {
                throw ValidationError("give --keys-file or set API_KEYS_FILE")
            }
            return path
        }
    }

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Creates a key; prints it once (the last line is the key alone) and stores only its hash.")
        @OptionGroup var file: FileOption
        @Option(help: "A name for the key.") var name: String
        @Option(help: "Requests per second.") var rate = 10.0
        @Option(help: "Requests at once (bucket size).") var burst = 20.0
        @Option(help: "Job creations per second.") var jobRate = 1.0
        @Option(help: "Job creations at once.") var jobBurst = 5.0
        @Option(help: "Unfinished jobs at once.") var maxActiveJobs = 5
        @Flag(help: "Print {\"id\", \"name\", \"key\"} for scripts.") var json = false

        func validate() throws {
            guard rate > 0, burst >= 1, jobRate > 0, jobBurst >= 1, maxActiveJobs >= 1 else {
                throw ValidationError("rates must be positive, bursts and --max-active-jobs at least 1")
            }
        }

        func run() async throws {
            let path = try file.path()
            var keys = try APIKeyFile.load(path)
            let (secret, record) = try APIKeyFile.newKey(name: name, rate: rate, burst: burst, jobRate: jobRate, jobBurst: jobBurst,
                                                         maxActiveJobs: maxActiveJobs)
            keys.append(record)
            try APIKeyFile.save(keys, to: path)
            if json {
                JSONOutput.print(["id": record.id, "name": name, "key": secret])
                return
            }
            print("created \(record.id) (\(name)) in \(path); the key is shown once:")
            print(secret)
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Lists the keys (ids, names, limits; never the keys).")
        @OptionGroup var file: FileOption
        @Flag(help: "Print {\"keys\": [...]} for scripts.") var json = false

        func run() async throws {
            let keys = try APIKeyFile.load(try file.path())
            if json {
                JSONOutput.print(["keys": keys.map {
                    ["id": $0.id, "name": $0.name, "rate": $0.rate, "burst": $0.burst, "job_rate": $0.jobRate, "job_burst": $0.jobBurst,
                     "max_active_jobs": $0.maxActiveJobs, "revoked": $0.revoked, "created_at": $0.createdAt] as [String: Any]
                }])
                return
            }
            for key in keys {
                print("\(key.id)\t\(key.name)\trate=\(key.rate)/s burst=\(key.burst) job_rate=\(key.jobRate)/s job_burst=\(key.jobBurst) "
                      + "max_active_jobs=\(key.maxActiveJobs)\t\(key.revoked ? "revoked" : "active")\t\(key.createdAt)")
            }
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Revokes a key by id (running Gateways reload the file).")
        @OptionGroup var file: FileOption
        @Argument(help: "The key's id (key_…).") var id: String

        func run() async throws {
            let path = try file.path()
            var keys = try APIKeyFile.load(path)
            guard let index = keys.firstIndex(where: { $0.id == id }) else { throw ValidationError("no key \(id) in \(path)") }
            keys[index].revoked = true
            try APIKeyFile.save(keys, to: path)
            print("revoked \(id)")
        }
    }
}
