import Foundation
import Glibc
import TalkMeshBase
import TalkMeshCore

/// A job-creation request's body as read: the two files (in scratch files, sniffed) and the
/// small fields, whatever the encoding.
package final class UploadForm {
    var image: UploadSink?
    var audio: UploadSink?
    /// Small fields: JSON values (JSON bodies) or text (multipart).
    var fields: [String: FieldValue] = [:]
    let store: any BlobStore
    let limits: UploadLimits

    package init(store: any BlobStore, limits: UploadLimits) {
        self.store = store
        self.limits = limits
    }

    /// A sink for the file field `name` (JSON: `image_base64`/`audio_base64`; multipart:
    /// `image`/`audio`), or nil for any other field. A file field given twice is an error.
    func sink(for name: String) throws -> UploadSink? {
        guard let kind = kind(of: name) else { return nil }
        let existing = kind == .image ? image : audio
        guard existing == nil else { throw ServiceError(.invalidRequest, "\(name) is given more than once") }
        let sink = UploadSink(kind: kind, field: name, store: store, limit: kind == .image ? limits.imageBytes : limits.audioBytes)
        if kind == .image { image = sink } else { audio = sink }
        return sink
    }

    /// Removes whatever was uploaded (the request failed).
    package func discard() {
        image?.discard()
        audio?.discard()
    }
}

/// Upload limits (IMAGE_MAX_BYTES, AUDIO_MAX_BYTES, the request's MAX_UPLOAD_BYTES).
public struct UploadLimits: Sendable {
    public var imageBytes = 10 << 20
    public var audioBytes = 50 << 20
    public var requestBytes = 80 << 20
    /// Small fields (prompt and the like), each.
    public var fieldBytes = 64 << 10
    public init() {}
}

/// Reads a JSON object body as it streams: the base64 file fields are decoded straight into
/// their sinks, any other member is kept (up to `fieldBytes` of JSON) and parsed at the end.
/// Unknown members are ignored; anything not a JSON object is INVALID_REQUEST.
package struct JSONUploadReader {
    private enum State {
        case start, keyOrEnd, key, inKey, colon, value, afterValue, done
        case fileString(escape: Bool)
        case smallValue
    }

    private var state = State.start
    private var key: [UInt8] = []
    private var keyEscape = false
    private var small: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var stringEscape = false
    private var sink: UploadSink?
    private var decoder = Base64Stream()
    private var decoded: [UInt8] = []
    private let form: UploadForm

    package init(form: UploadForm) {
        self.form = form
    }

    private func invalid(_ message: String) -> ServiceError { ServiceError(.invalidRequest, message) }

    package mutating func feed(_ piece: [UInt8]) throws {
        try piece.withUnsafeBufferPointer { bytes in
            var index = 0
            while index < bytes.count {
                let byte = bytes[index]
                let space = byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09
                switch state {
                case .start:
                    if !space {
                        guard byte == UInt8(ascii: "{") else { throw invalid("the body must be a JSON object") }
                        state = .keyOrEnd
                    }
                case .keyOrEnd, .key:
                    if space { break }
                    if byte == UInt8(ascii: "}"), case .keyOrEnd = state {
                        state = .done
                    } else if byte == UInt8(ascii: "\"") {
                        key.removeAll()
                        keyEscape = false
                        state = .inKey
                    } else {
                        throw invalid("malformed JSON: expected a member name")
                    }
                case .inKey:
                    if keyEscape {
                        keyEscape = false
                        key.append(byte)
                    } else if byte == UInt8(ascii: "\\") {
                        keyEscape = true
                    } else if byte == UInt8(ascii: "\"") {
                        state = .colon
                    } else {
                        key.append(byte)
                        guard key.count <= 256 else { throw invalid("malformed JSON: a member name is too long") }
                    }
                case .colon:
                    if space { break }
                    guard byte == UInt8(ascii: ":") else { throw invalid("malformed JSON: expected ':'") }
                    state = .value
                case .value:
                    if space { break }
                    let name = String(decoding: key, as: UTF8.self)
                    if byte == UInt8(ascii: "\""), let fileSink = try form.sink(for: name) {
                        sink = fileSink
                        decoder = Base64Stream()
                        state = .fileString(escape: false)
                    } else {
                        guard form.kind(of: name) == nil else { throw invalid("\(name) must be a base64 string") }
                        small = [byte]
                        depth = byte == UInt8(ascii: "{") || byte == UInt8(ascii: "[") ? 1 : 0
                        inString = byte == UInt8(ascii: "\"")
                        stringEscape = false
                        state = .smallValue
                    }
                case .fileString:
                    // Runs of plain base64 go to the decoder at once; escapes are rare (`\/`, `\n`).
                    if case .fileString(true) = state {
                        // The byte after a backslash: `\/` is '/', `\n` and the like are whitespace.
                        state = .fileString(escape: false)
                        let unescaped: [UInt8] = [byte == UInt8(ascii: "/") ? byte : 0x20]
                        try unescaped.withUnsafeBufferPointer { try decodeFile($0) }
                        index += 1
                        continue
                    }
                    var end = index
                    while end < bytes.count && bytes[end] != UInt8(ascii: "\"") && bytes[end] != UInt8(ascii: "\\") { end += 1 }
                    if end > index { try decodeFile(UnsafeBufferPointer(rebasing: bytes[index..<end])) }
                    index = end
                    guard index < bytes.count else { continue }
                    if bytes[index] == UInt8(ascii: "\\") {
                        state = .fileString(escape: true)
                    } else {
                        try endFile()
                        state = .afterValue
                    }
                case .smallValue:
                    if try smallValueEnds(byte) { continue }  // the byte ends the value and is read again
                case .afterValue:
                    if space { break }
                    if byte == UInt8(ascii: ",") {
                        state = .key
                    } else if byte == UInt8(ascii: "}") {
                        state = .done
                    } else {
                        throw invalid("malformed JSON: expected ',' or '}'")
                    }
                case .done:
                    guard space else { throw invalid("malformed JSON: data after the object") }
                }
                index += 1
            }
        }
    }

    /// Adds a byte of a small value; true when the value ended before it (a number or literal ends
    /// at the next delimiter, which is then read as the object's).
    private mutating func smallValueEnds(_ byte: UInt8) throws -> Bool {
        if inString {
            small.append(byte)
            if stringEscape {
                stringEscape = false
            } else if byte == UInt8(ascii: "\\") {
                stringEscape = true
            } else if byte == UInt8(ascii: "\"") {
                inString = false
                if depth == 0 { try keepSmall() }
            }
        } else if depth == 0 {
            if byte == UInt8(ascii: ",") || byte == UInt8(ascii: "}") || byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09 {
                try keepSmall()
                return true
            }
            small.append(byte)
        } else {
            small.append(byte)
            if byte == UInt8(ascii: "\"") {
                inString = true
            } else if byte == UInt8(ascii: "{") || byte == UInt8(ascii: "[") {
                depth += 1
            } else if byte == UInt8(ascii: "}") || byte == UInt8(ascii: "]") {
                depth -= 1
                if depth == 0 { try keepSmall() }
            }
        }
        guard small.count <= form.limits.fieldBytes else {
            throw ServiceError(.payloadTooLarge, "\(String(decoding: key, as: UTF8.self)) is larger than \(form.limits.fieldBytes) bytes")
        }
        return false
    }

    private mutating func keepSmall() throws {
        let name = String(decoding: key, as: UTF8.self)
        guard let parsed = try? JSONSerialization.jsonObject(with: Data(small), options: [.fragmentsAllowed]) else {
            throw invalid("malformed JSON in \(name)")
        }
        // The type is read from the JSON text itself (Foundation's bridging blurs Bool and number).
        switch small.first {
        case UInt8(ascii: "\""): form.fields[name] = .text(parsed as? String ?? "")
        case UInt8(ascii: "t"): form.fields[name] = .bool(true)
        case UInt8(ascii: "f"): form.fields[name] = .bool(false)
        case UInt8(ascii: "n"): form.fields[name] = .null
        case UInt8(ascii: "{"), UInt8(ascii: "["): form.fields[name] = .other
        default: form.fields[name] = .number((parsed as? NSNumber)?.doubleValue ?? .nan)
        }
        small = []
        state = .afterValue
    }

    private mutating func decodeFile(_ bytes: UnsafeBufferPointer<UInt8>) throws {
        decoded.removeAll(keepingCapacity: true)
        do { try decoder.feed(bytes, into: &decoded) } catch {
            throw invalid("\(sink?.field ?? "a file field") is not valid base64")
        }
        try sink?.write(decoded)
    }

    private mutating func endFile() throws {
        decoded.removeAll(keepingCapacity: true)
        do { try decoder.finish(into: &decoded) } catch {
            throw invalid("\(sink?.field ?? "a file field") is not valid base64")
        }
        try sink?.write(decoded)
        sink = nil
    }

    package func finish() throws {
        guard case .done = state else { throw invalid("the JSON body ended before the object did") }
    }
}

extension UploadForm {
    /// The file a field name is for, or nil for a small field.
    func kind(of name: String) -> UploadKind? {
        switch name {
        case "image", "image_base64": return .image
        case "audio", "audio_base64": return .audio
        default: return nil
        }
    }
}

/// A small field's value.
enum FieldValue {
    case text(String)
    case number(Double)
    case bool(Bool)
    case null
    /// An object or array (no field takes one).
    case other
}
