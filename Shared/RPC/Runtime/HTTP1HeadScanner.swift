/// What http-parser (Debian builds it without `HTTP_PARSER_STRICT`) lets through in a request
/// head: a bare LF as a line end and obs-fold continuation lines, both ways to make two parsers
/// disagree about a request (smuggling). Scans the head's bytes before the parser sees them.
struct HTTP1HeadScanner {
    enum Violation: Error, Equatable {
        case bareLineFeed, obsoleteLineFolding
    }

    /// True from a message's first byte until the empty line that ends its head.
    private(set) var inHead = true
    private var previous: UInt8 = 0
    private var lineLength = 0
    private var lines = 0

    /// A new message starts (the previous one is complete).
    mutating func reset() {
        self = HTTP1HeadScanner()
    }

    /// Scans from `start` until the head ends or the bytes do.
    mutating func scan(_ bytes: UnsafePointer<UInt8>, from start: Int, to end: Int) throws(Violation) {
        var index = start
        while inHead && index < end {
            let byte = bytes[index]
            switch byte {
            case 0x0A:
                guard previous == 0x0D else { throw .bareLineFeed }
                if lineLength == 0 && lines > 0 {
                    inHead = false
                } else if lineLength > 0 {
                    lines += 1
                }
                lineLength = 0
            case 0x0D:
                break
            default:
                // A line that starts with SP or HT continues the previous header (obs-fold).
                if lineLength == 0 && lines > 0 && (byte == 0x20 || byte == 0x09) { throw .obsoleteLineFolding }
                lineLength += 1
            }
            previous = byte
            index += 1
        }
    }
}
