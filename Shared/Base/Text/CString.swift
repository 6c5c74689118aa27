/// A String from a NUL-terminated C buffer (strerror-style out-parameters, getnameinfo…).
public func cString(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
