import TalkMeshBase

/// One setting, declared once: its environment variable, its flag, what values it takes, its
/// default and its help. A service's table of these is what parses its command line, validates
/// every value, prints `--help` and generates the README's settings table (`--settings-json`).
public struct Setting: Sendable, Hashable {
    /// The values a setting takes; `Settings` refuses any other at start, naming the setting.
    public enum Kind: Sendable, Hashable {
        case text
        case integer(ClosedRange<Int>)
        case number(ClosedRange<Double>)
        /// `500ms`, `30s`, `5m`, `1h` (a bare number is seconds), within the range.
        case duration(ClosedRange<Duration>)
        case choice([String])
    }

    /// The environment variable, e.g. `MAX_BODY_BYTES`.
    public let name: String
    /// The flag, e.g. `--max-body-bytes`; nil for an environment-only setting.
    public let flag: String?
    public let kind: Kind
    /// The default as text, parsed like any value; nil when unset means "none".
    public let defaultValue: String?
    /// The default as the README and `--help` show it, when the raw text reads badly (`64 MiB`).
    public let shownDefault: String?
    public let help: String
    /// Who reads it, when the README should say more than the services' names (`with s3://`).
    public let readBy: String?
    /// A setting with no default that the service cannot start without.
    public let required: Bool

    public init(_ name: String, _ kind: Kind = .text, default defaultValue: String? = nil, shown shownDefault: String? = nil,
                flag: String? = "", readBy: String? = nil, required: Bool = false, help: String) {
        self.name = name
        self.required = required
        self.kind = kind
        self.defaultValue = defaultValue
        self.shownDefault = shownDefault
        self.help = help
        self.readBy = readBy
        // "" derives the flag from the name; nil means none.
        self.flag = flag.map { $0.isEmpty ? "--" + String(name.lowercased().map { $0 == "_" ? "-" : $0 }) : $0 }
    }

    /// This setting with another default (a service's own port, say).
    public func defaulting(to value: String) -> Setting {
        Setting(name, kind, default: value, flag: flag, readBy: readBy, required: required, help: help)
    }

    /// What `--help` and the README show as the default.
    public var defaultText: String {
        if let shownDefault { return shownDefault }
        guard let defaultValue else { return "—" }
        return "`\(defaultValue)`"
    }

    public static func == (a: Setting, b: Setting) -> Bool { a.name == b.name }
    public func hash(into hasher: inout Hasher) { hasher.combine(name) }
}

/// A setting with a bad value, or a command line that does not parse: the process exits 2 with it.
public struct InvalidSetting: Error, CustomStringConvertible {
    public var description: String
    public init(description: String) { self.description = description }
}

/// Durations in settings: a number and a unit (ns, us, ms, s, m, h, d); a bare number is seconds.
public enum DurationSetting {
    /// The duration, or nil when malformed, negative or unrepresentable.
    public static func parse(_ text: String) -> Duration? {
        parseNanoseconds(text).map { .nanoseconds($0) }
    }

    /// Nanoseconds, or nil when malformed or negative.
    public static func parseNanoseconds(_ text: String) -> Int64? {
        let trimmed = text.trimmingWhitespace
        let units: [(String, Double)] = [("ns", 1), ("us", 1e3), ("ms", 1e6), ("s", 1e9), ("m", 60e9), ("h", 3600e9), ("d", 86_400e9)]
        for (suffix, scale) in units.sorted(by: { $0.0.count > $1.0.count }) where trimmed.hasSuffix(suffix) {
            guard let value = Double(trimmed.dropLast(suffix.count)) else { return nil }
            return nanoseconds(value * scale)
        }
        guard let seconds = Double(trimmed) else { return nil }
        return nanoseconds(seconds * 1e9)
    }

    /// Nil for a negative, non-finite or unrepresentable (over ~292 years) duration: a conversion
    /// that would trap is refused instead.
    private static func nanoseconds(_ value: Double) -> Int64? {
        guard value.isFinite, value >= 0, value < 9.2e18 else { return nil }
        return Int64(value)
    }

    /// `d` as text a setting accepts back: `500ms`, `30s`, `5m`, `1h`.
    public static func text(_ d: Duration) -> String {
        let ns = d.nanosecondsClamped
        if ns == 0 { return "0" }
        for (unit, scale) in [("h", Int64(3_600_000_000_000)), ("m", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)]
        where ns >= scale && ns % scale == 0 {
            return "\(ns / scale)\(unit)"
        }
        return "\(ns)ns"
    }
}

extension Duration {
    /// The whole nanoseconds of a non-negative duration, saturating at `Int64.max`.
    public var nanosecondsClamped: Int64 {
        let (seconds, attoseconds) = components
        guard seconds >= 0 else { return 0 }
        let (scaled, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return Int64.max }
        let (sum, overflowSum) = scaled.addingReportingOverflow(attoseconds / 1_000_000_000)
        return overflowSum ? Int64.max : max(0, sum)
    }
}
