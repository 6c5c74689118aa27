import Glibc
import TalkMeshBase
import TalkMeshCore

/// Reads one setting: a flag's value over the environment variable over a default, validated.
public struct SettingsReader: Sendable {
    public let environment: [String: String]

    public init(environment: [String: String] = ProcessEnvironment.current()) {
        self.environment = environment
    }

    private func pick(_ flag: String?, _ key: String) -> (value: String, source: String)? {
        if let flag { return (flag, "--" + key.lowercased().replacingUnderscores()) }
        if let value = environment[key], !value.isEmpty { return (value, key) }
        return nil
    }

    /// A text setting, or nil when unset.
    public func string(_ flag: String?, _ key: String) -> String? {
        pick(flag, key)?.value
    }

    /// A whole number within `range`.
    public func integer(_ flag: String?, _ key: String, _ fallback: Int, _ range: ClosedRange<Int>) throws(ServiceOptions.InvalidSetting) -> Int {
        guard let (text, source) = pick(flag, key) else { return fallback }
        guard let value = Int(text.trimmingWhitespace), range.contains(value) else {
            throw ServiceOptions.InvalidSetting(description: "\(source)=\(text): expected a whole number in \(range.lowerBound)…\(range.upperBound)")
        }
        return value
    }

    /// A duration (500ms, 30s, 5m, 1h) in nanoseconds.
    public func duration(_ flag: String?, _ key: String, _ fallback: Int64) throws(ServiceOptions.InvalidSetting) -> Int64 {
        guard let (text, source) = pick(flag, key) else { return fallback }
        guard let value = DurationSetting.parseNanoseconds(text) else {
            throw ServiceOptions.InvalidSetting(description: "\(source)=\(text): expected a duration such as 500ms, 30s, 5m or 1h")
        }
        return value
    }
}

extension String {
    func replacingUnderscores() -> String {
        String(map { $0 == "_" ? "-" : $0 })
    }
}
