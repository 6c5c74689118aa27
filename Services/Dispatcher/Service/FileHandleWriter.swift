import Foundation
import Glibc
import TalkMeshCore

/// Writes a new file piece by piece (decoded bytes as they come). Its one owner closes the
/// descriptor when it goes, thrown out of or not.
final class FileHandleWriter {
    private let fd: Int32
    let path: String

    init(path: String) throws {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FileBlobStore.failure("open", path) }
    }

    deinit { Glibc.close(fd) }

    func write(_ data: Data) throws {
        try data.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let written = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
                if written < 0 {
                    if errno == EINTR { continue }
                    throw FileBlobStore.failure("write", path)
                }
                offset += written
            }
        }
    }
}
