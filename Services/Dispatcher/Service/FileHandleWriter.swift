import Glibc
import TalkMeshCore

/// Writes a new file piece by piece (decoded bytes as they come). Its one owner closes the
/// descriptor when it goes, thrown out of or not. A failed write is kept and thrown again by
/// every later `write`.
final class FileHandleWriter {
    private let fd: Int32
    let path: String
    private var failure: ServiceError?

    init(path: String) throws {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FileBlobStore.failure("open", path) }
    }

    deinit { Glibc.close(fd) }

    func write(_ bytes: [UInt8]) throws(ServiceError) {
        if let failure { throw failure }
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let written = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
                if written < 0 {
                    if errno == EINTR { continue }
                    failure = FileBlobStore.failure("write", path)
                    return
                }
                offset += written
            }
        }
        if let failure { throw failure }
    }
}
