extension StringProtocol {
    /// The text without leading and trailing whitespace (settings, header values, ini lines).
    public var trimmingWhitespace: String {
        var slice = self[...]
        while let first = slice.first, first.isWhitespace { slice.removeFirst() }
        while let last = slice.last, last.isWhitespace { slice.removeLast() }
        return String(slice)
    }
}
