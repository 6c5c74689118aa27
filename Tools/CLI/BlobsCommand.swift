import ArgumentParser
import Foundation
import TalkMeshCore
import TalkMeshService

/// `talkmesh blobs put|get|stat|rm|ls|presign`: the blob store the services use (BLOB_STORE and,
/// for S3, its settings), from a shell — to inspect a job's files, seed a store, or compare its
/// speed with other tools. Files stream both ways: nothing is held whole in memory.
struct BlobsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blobs",
        abstract: "Reads and writes the blob store (--blob-store or BLOB_STORE; S3 settings from the environment).",
        discussion: "Settings (environment variable, flag):\n" + BlobSettings.table.map { "  \($0.name)  \($0.flag ?? "")  \($0.help)" }
            .joined(separator: "\n"),
        subcommands: [Put.self, Get.self, Stat.self, Remove.self, List.self, Presign.self])

    struct StoreOption: ParsableArguments {
        @Option(help: "Blob store URL: file:///dir or s3://bucket/prefix (env BLOB_STORE, default file:///var/lib/talkmesh/blobs).")
        var blobStore: String?

        func open() throws -> any BlobStore {
            let settings = Settings(table: BlobSettings.table, flags: blobStore.map { [Setting.blobStore.name: $0] } ?? [:])
            do { return try BlobSettings.makeStore(settings) } catch let error as ServiceError {
                throw ValidationError(error.description)
            }
        }
    }

    struct Put: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Uploads a local file under a key (in parts when large); the file stays.")
        @OptionGroup var store: StoreOption
        @Argument(help: "The local file.") var file: String
        @Argument(help: "The blob key.") var key: String

        func run() throws {
            let blobs = try store.open()
            let key = try BlobKey(self.key)
            // store(_:fromFile:) takes the file it is given: hand it a copy (a hard link when it can).
            let staged = try blobs.scratchPath(suffix: ".put")
            if link(file, staged) != 0 {
                guard let input = InputStream(fileAtPath: file), let output = OutputStream(toFileAtPath: staged, append: false) else {
                    throw ValidationError("cannot read \(file)")
                }
                try Self.copy(input, output)
            }
            defer { unlink(staged) }
            try blobs.store(key, fromFile: staged)
        }

        static func copy(_ input: InputStream, _ output: OutputStream) throws {
            input.open(); output.open()
            defer { input.close(); output.close() }
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            while true {
                let count = input.read(&buffer, maxLength: buffer.count)
                if count < 0 { throw ValidationError("read failed") }
                if count == 0 { return }
                guard output.write(buffer, maxLength: count) == count else { throw ValidationError("write failed") }
            }
        }
    }

    struct Get: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Downloads a blob to a local file (or - for standard output), streamed.")
        @OptionGroup var store: StoreOption
        @Argument(help: "The blob key.") var key: String
        @Argument(help: "The local file, or - for standard output.") var file: String

        func run() throws {
            let blobs = try store.open()
            let fd = file == "-" ? STDOUT_FILENO : open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw ValidationError("cannot create \(file)") }
            defer { if fd != STDOUT_FILENO { close(fd) } }
            try blobs.stream(try BlobKey(key), range: nil) { bytes in
                var done = 0
                while done < bytes.count {
                    let wrote = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
                    if wrote < 0 && errno == EINTR { continue }
                    guard wrote > 0 else { throw ServiceError(.storageFailed, "cannot write \(file)", cause: String(cString: strerror(errno))) }
                    done += wrote
                }
            }
        }
    }

    struct Stat: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Prints a blob's size and entity tag; exits 1 when it does not exist.")
        @OptionGroup var store: StoreOption
        @Argument(help: "The blob key.") var key: String
        @Flag(help: "Print {\"key\", \"size\", \"etag\"}.") var json = false

        func run() throws {
            guard let info = try store.open().info(try BlobKey(key)) else {
                FileHandle.standardError.write(Data("no blob \(key)\n".utf8))
                throw ExitCode(1)
            }
            if json { JSONOutput.print(["key": key, "size": info.size, "etag": info.etag]) } else { print("\(key)\t\(info.size)\t\(info.etag)") }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Deletes blobs (absent ones are no error).")
        @OptionGroup var store: StoreOption
        @Argument(help: "The blob keys.") var keys: [String]

        func run() throws {
            let blobs = try store.open()
            for key in keys { try blobs.delete(try BlobKey(key)) }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "Lists blobs whose key starts with a prefix.")
        @OptionGroup var store: StoreOption
        @Argument(help: "The key prefix (default: every blob).") var prefix = ""
        @Flag(help: "Print {\"blobs\": [{\"key\", \"size\"}]}.") var json = false

        func run() throws {
            let listed = try store.open().list(prefix: prefix)
            if json {
                JSONOutput.print(["blobs": listed.map { ["key": $0.key.rawValue, "size": $0.size] as [String: Any] }])
                return
            }
            for blob in listed { print("\(blob.key)\t\(blob.size)") }
        }
    }

    struct Presign: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Prints a URL anyone may GET the blob from until it expires (S3 stores).")
        @OptionGroup var store: StoreOption
        @Argument(help: "The blob key.") var key: String
        @Option(help: "Seconds the URL works (1–604800).") var expires = 21_600

        func run() throws {
            guard (1...604_800).contains(expires) else { throw ValidationError("--expires: 1 to 604800 seconds") }
            guard let url = try store.open().presignedURL(try BlobKey(key), expiresSeconds: expires) else {
                throw ValidationError("this blob store has no URLs of its own (a local directory)")
            }
            print(url)
        }
    }
}
