import TalkMeshBase

/// Custom request metadata: the HTTP/2 headers that are not pseudo-headers or reserved by gRPC.
/// Keys ending in `-bin` carry binary values, base64-encoded on the wire and decoded here.
public struct Metadata: Sendable, Hashable, Sequence {
    /// One value: text, or bytes for `-bin` keys.
    public enum Value: Sendable, Hashable {
        case string(String)
        case binary([UInt8])
    }

    private var entries: [(key: String, value: Value)] = []

    public init() {}

    /// Adds an entry (keys are lower-cased as HTTP/2 requires).
    public mutating func add(_ key: String, _ value: Value) {
        entries.append((key.lowercased(), value))
    }

    /// Adds a header as received from the wire; `-bin` values are base64-decoded (padded or not).
    mutating func addWire(key: String, value: String) {
        if key.hasSuffix("-bin") {
            entries.append((key, .binary(Base64.decode(value) ?? [])))
        } else {
            entries.append((key, .string(value)))
        }
    }

    /// All values of a key.
    public subscript(key: String) -> [Value] {
        let lowered = key.lowercased()
        return entries.filter { $0.key == lowered }.map(\.value)
    }

    /// The first text value of a key.
    public func first(_ key: String) -> String? {
        for entry in entries where entry.key == key {
            if case .string(let text) = entry.value { return text }
        }
        return nil
    }

    public var count: Int { entries.count }

    public func makeIterator() -> some IteratorProtocol<(key: String, value: Value)> {
        entries.makeIterator()
    }

    public static func == (lhs: Metadata, rhs: Metadata) -> Bool {
        lhs.entries.elementsEqual(rhs.entries) { $0.key == $1.key && $0.value == $1.value }
    }

    public func hash(into hasher: inout Hasher) {
        for entry in entries { hasher.combine(entry.key); hasher.combine(entry.value) }
    }
}
