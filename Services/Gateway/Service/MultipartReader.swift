import Glibc
import TalkMeshCore

/// Reads a `multipart/form-data` body (RFC 7578) as it streams: file parts go straight into
/// their sinks, other parts are kept as text (each up to `fieldBytes`). The delimiter is found
/// across piece boundaries however the body was split.
package struct MultipartReader {
    private enum State { case preamble, afterDelimiter, headers, body, epilogue }

    private let delimiter: [UInt8]
    private var state = State.preamble
    /// Bytes read but not yet settled (they may begin a delimiter).
    private var carry: [UInt8]
    private var partName = ""
    private var sink: UploadSink?
    private var text: [UInt8] = []
    private let form: UploadForm

    /// The boundary from a `Content-Type: multipart/form-data; boundary=…` header.
    static func boundary(in contentType: String) -> String? {
        for parameter in contentType.split(separator: ";").dropFirst() {
            let pair = parameter.split(separator: "=", maxSplits: 1)
            guard pair.count == 2, pair[0].trimmingCharacters(in: .whitespaces).lowercased() == "boundary" else { continue }
            var value = pair[1].trimmingCharacters(in: .whitespaces)
            if value.hasPrefix("\""), value.hasSuffix("\""), value.count >= 2 { value = String(value.dropFirst().dropLast()) }
            return (1...70).contains(value.utf8.count) ? value : nil
        }
        return nil
    }

    package init(boundary: String, form: UploadForm) {
        delimiter = Array("\r\n--\(boundary)".utf8)
        carry = Array("\r\n".utf8)  // so a delimiter at the very start is found like the others
        self.form = form
    }

    private func invalid(_ message: String) -> ServiceError { ServiceError(.invalidRequest, message) }

    package mutating func feed(_ piece: [UInt8]) throws {
        carry += piece
        var start = 0
        defer { carry.removeFirst(start) }
        while start < carry.count {
            switch state {
            case .preamble, .body:
                let found = find(delimiter, from: start)
                let available: Int
                if let found {
                    available = found
                } else {
                    // Keep what could be the start of a delimiter for the next piece.
                    available = max(start, carry.count - (delimiter.count - 1))
                }
                if state == .body, available > start { try partBytes(Array(carry[start..<available])) }
                start = available
                guard found != nil else { return }
                if state == .body { try endPart() }
                start += delimiter.count
                state = .afterDelimiter
            case .afterDelimiter:
                // "--" ends the body; otherwise optional whitespace and CRLF start a part.
                guard carry.count - start >= 2 else { return }
                if carry[start] == UInt8(ascii: "-") && carry[start + 1] == UInt8(ascii: "-") {
                    state = .epilogue
                    start = carry.count
                    return
                }
                guard let lineEnd = find(Array("\r\n".utf8), from: start) else {
                    guard carry.count - start < 256 else { throw invalid("malformed multipart body: no line end after a boundary") }
                    return
                }
                guard carry[start..<lineEnd].allSatisfy({ $0 == 0x20 || $0 == 0x09 }) else {
                    throw invalid("malformed multipart body: bytes after a boundary")
                }
                start = lineEnd + 2
                state = .headers
            case .headers:
                guard let end = find(Array("\r\n\r\n".utf8), from: start) else {
                    // A part with no header lines at all has its blank line right away.
                    if carry.count - start >= 2 && carry[start] == 0x0D && carry[start + 1] == 0x0A {
                        throw invalid("malformed multipart body: a part has no Content-Disposition")
                    }
                    guard carry.count - start <= 8192 else { throw invalid("malformed multipart body: part headers over 8 KiB") }
                    return
                }
                try beginPart(headers: String(decoding: carry[start..<end], as: UTF8.self))
                start = end + 4
                state = .body
            case .epilogue:
                start = carry.count
            }
        }
    }

    /// Where `needle` first occurs in `carry` from `start` (memchr for its first byte, then memcmp).
    private func find(_ needle: [UInt8], from start: Int) -> Int? {
        carry.withUnsafeBytes { buffer in
            needle.withUnsafeBytes { pattern in
                let base = buffer.baseAddress!
                var from = start
                while buffer.count - from >= pattern.count {
                    guard let hit = memchr(base + from, Int32(needle[0]), buffer.count - from - pattern.count + 1) else { return nil }
                    let offset = hit - UnsafeMutableRawPointer(mutating: base)
                    if memcmp(base + offset, pattern.baseAddress!, pattern.count) == 0 { return offset }
                    from = offset + 1
                }
                return nil
            }
        }
    }

    private mutating func beginPart(headers: String) throws {
        var name: String?
        for line in headers.split(separator: "\r\n") {
            let pair = line.split(separator: ":", maxSplits: 1)
            guard pair.count == 2, pair[0].trimmingCharacters(in: .whitespaces).lowercased() == "content-disposition" else { continue }
            for parameter in pair[1].split(separator: ";").dropFirst() {
                let item = parameter.split(separator: "=", maxSplits: 1)
                guard item.count == 2, item[0].trimmingCharacters(in: .whitespaces).lowercased() == "name" else { continue }
                var value = item[1].trimmingCharacters(in: .whitespaces)
                if value.hasPrefix("\""), value.hasSuffix("\""), value.count >= 2 { value = String(value.dropFirst().dropLast()) }
                name = value
            }
        }
        guard let name else { throw invalid("malformed multipart body: a part has no Content-Disposition name") }
        partName = name
        sink = try form.sink(for: name)
        text = []
    }

    private mutating func partBytes(_ bytes: [UInt8]) throws {
        if let sink {
            try sink.write(bytes)
            return
        }
        text += bytes
        guard text.count <= form.limits.fieldBytes else {
            throw ServiceError(.payloadTooLarge, "\(partName) is larger than \(form.limits.fieldBytes) bytes")
        }
    }

    private mutating func endPart() throws {
        if sink == nil {
            guard form.fields[partName] == nil else { throw invalid("\(partName) is given more than once") }
            form.fields[partName] = .text(String(decoding: text, as: UTF8.self))
        }
        sink = nil
        text = []
    }

    package func finish() throws {
        guard state == .epilogue else { throw invalid("the multipart body ended before its closing boundary") }
    }
}
