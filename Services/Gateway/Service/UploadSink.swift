import Glibc
import TalkMeshCore

/// What an upload must be, checked by its content (its first bytes), never by name or type.
public enum UploadKind: String, Sendable {
    case image, audio

    var invalidCode: ErrorCode { self == .image ? .invalidImage : .invalidAudio }

    /// The file extension for the sniffed format, or nil when the bytes are none of the accepted.
    static func sniff(_ kind: UploadKind, _ head: [UInt8]) -> String? {
        func starts(_ magic: [UInt8], at offset: Int = 0) -> Bool {
            head.count >= offset + magic.count && Array(head[offset..<offset + magic.count]) == magic
        }
        let riff = starts(Array("RIFF".utf8))
        switch kind {
        case .image:
            if starts([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) { return "png" }
            if starts([0xFF, 0xD8, 0xFF]) { return "jpg" }
            if riff && starts(Array("WEBP".utf8), at: 8) { return "webp" }
        case .audio:
            if riff && starts(Array("WAVE".utf8), at: 8) { return "wav" }
            if starts(Array("ID3".utf8)) || (head.count >= 2 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0) { return "mp3" }
            if starts(Array("ftyp".utf8), at: 4) { return "m4a" }
            if starts(Array("OggS".utf8)) { return "ogg" }
            if starts(Array("fLaC".utf8)) { return "flac" }
        }
        return nil
    }

    /// Bytes needed to decide (a RIFF header's type is at 8–11).
    static let sniffLength = 12
}

/// One uploaded file on its way into the BlobStore: written to a scratch file as it is decoded,
/// refused the moment it goes past its limit or its first bytes are not an accepted format, and
/// moved in under its key only when complete. Anything left unfinished is removed.
final class UploadSink {
    let kind: UploadKind
    let field: String
    private let store: any BlobStore
    private let limit: Int
    private var fd: Int32 = -1
    private var path = ""
    private var head: [UInt8] = []
    private(set) var format: String?
    private(set) var size = 0

    init(kind: UploadKind, field: String, store: any BlobStore, limit: Int) {
        self.kind = kind
        self.field = field
        self.store = store
        self.limit = limit
    }

    deinit {
        discard()
    }

    func write(_ bytes: [UInt8]) throws {
        guard !bytes.isEmpty else { return }
        size += bytes.count
        guard size <= limit else {
            throw ServiceError(.payloadTooLarge, "\(field) is larger than \(limit) bytes")
        }
        if format == nil {
            head += bytes.prefix(UploadKind.sniffLength - head.count)
            if head.count >= UploadKind.sniffLength { try decide() }
        }
        if fd < 0 {
            path = try store.scratchPath(suffix: "." + kind.rawValue)
            fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw FileBlobStore.failure("open", path) }
        }
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if written < 0 && errno == EINTR { continue }
            guard written > 0 else {
                throw FileBlobStore.failure("write", path)
            }
            offset += written
        }
    }

    private func decide() throws {
        guard let format = UploadKind.sniff(kind, head) else {
            throw ServiceError(kind.invalidCode, kind == .image ? "\(field) is not a PNG, JPEG or WebP image"
                                                               : "\(field) is not WAV, MP3, M4A, OGG or FLAC audio")
        }
        self.format = format
    }

    /// The upload is complete: checks it, and hands over its scratch file's path (still the
    /// sink's to remove until `store(under:)`).
    func finish() throws -> String {
        guard size > 0 else { throw ServiceError(kind.invalidCode, "\(field) is empty") }
        if format == nil { try decide() }
        return path
    }

    /// Hands the complete file's path over to the caller, who stores or removes it; the sink
    /// forgets it (nil when already handed over).
    func handOver() -> String? {
        if fd >= 0 { close(fd) }
        fd = -1
        defer { path = "" }
        return path.isEmpty ? nil : path
    }

    /// Removes what was written (a failed request keeps nothing).
    func discard() {
        if fd >= 0 { close(fd) }
        fd = -1
        if !path.isEmpty { unlink(path) }
        path = ""
    }
}
