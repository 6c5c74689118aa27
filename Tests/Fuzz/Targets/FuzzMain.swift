import CTalkMesh
import Glibc
import TalkMeshCore

/// `talkmesh-fuzz <target> …`: one binary for every fuzz target.
///
/// Built with `scripts/fuzz` (libFuzzer and AddressSanitizer, `-D FUZZING`), the arguments after
/// the target are libFuzzer's (corpus directories, `-max_total_time=…`). Built normally, it replays
/// the files and directories given through the target: the committed corpora and every crash ever
/// found run in `make test` as regression inputs.
@main
struct FuzzMain {
    static func main() {
        let arguments = CommandLine.arguments
        #if FUZZING
        // libFuzzer re-executes argv[0] with its own arguments (-merge, -fork): the target travels in
        // the environment, and libFuzzer is given the real program name and the arguments after the target.
        let inherited = getenv("TALKMESH_FUZZ_TARGET").map { String(cString: $0) }
        let name = inherited ?? (arguments.count >= 2 ? arguments[1] : "")
        #else
        let name = arguments.count >= 2 ? arguments[1] : ""
        #endif
        guard let target = FuzzTargets.all[name] else {
            let names = FuzzTargets.all.keys.sorted().joined(separator: ", ")
            standardError("usage: talkmesh-fuzz <target> [inputs or libFuzzer flags]\ntargets: \(names)\n")
            exit(64)
        }
        FuzzTargets.selected = target
        target.setUp?()
        #if FUZZING
        var argc = CommandLine.argc
        var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
        if inherited == nil {
            setenv("TALKMESH_FUZZ_TARGET", name, 1)
            let rewritten = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: Int(argc))  // lives as long as the process
            rewritten[0] = CommandLine.unsafeArgv[0]
            for index in 2..<Int(argc) { rewritten[index - 1] = CommandLine.unsafeArgv[index] }
            rewritten[Int(argc) - 1] = nil
            argc -= 1
            argv = rewritten
        }
        exit(LLVMFuzzerRunDriver(&argc, &argv) { data, size in
            FuzzTargets.selected!.run(UnsafeBufferPointer(start: data, count: size))
            return 0
        })
        #else
        var count = 0
        for path in arguments.dropFirst(2) {
            for file in files(at: path) {
                let bytes: [UInt8]
                do {
                    bytes = try FileBlobStore.readAll(file)
                } catch {
                    standardError("talkmesh-fuzz: cannot read \(file): \(error)\n")
                    exit(66)
                }
                bytes.withUnsafeBufferPointer { target.run($0) }
                count += 1
            }
        }
        print("\(arguments[1]): \(count) inputs replayed, no crash")
        exit(0)
        #endif
    }

    /// The regular files at `path` (itself, or those directly inside it), sorted.
    static func files(at path: String) -> [String] {
        var info = stat()
        guard stat(path, &info) == 0 else {
            standardError("talkmesh-fuzz: cannot read \(path)\n")
            exit(66)
        }
        guard info.st_mode & S_IFMT == S_IFDIR else { return [path] }
        guard let directory = opendir(path) else { return [] }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if !name.hasPrefix(".") { names.append("\(path)/\(name)") }
        }
        return names.sorted()
    }
}

/// One fuzz target: what runs once before the inputs, and what runs for each.
struct FuzzTarget: Sendable {
    var setUp: (@Sendable () -> Void)?
    var run: @Sendable (UnsafeBufferPointer<UInt8>) -> Void
}

/// A property the code under test broke: reported like a crash, so libFuzzer keeps the input.
func require(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String, file: StaticString = #fileID, line: UInt = #line) {
    if !condition() {
        standardError("talkmesh-fuzz: property violated at \(file):\(line): \(message())\n")
        abort()
    }
}

/// Writes `text` to standard error.
func standardError(_ text: String) {
    var bytes = Array(text.utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}
