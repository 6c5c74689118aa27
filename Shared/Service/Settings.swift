import Glibc
import TalkMeshBase

/// A command's settings: its table, the flags given and the environment. A value is the flag's
/// over the environment variable's over the default, checked against the setting's kind.
public struct Settings: Sendable {
    public let table: [Setting]
    public let environment: [String: String]
    private let flags: [String: String]

    /// The table's settings from `flags` (name → value, as `parse` finds them) and `environment`.
    public init(table: [Setting], flags: [String: String] = [:], environment: [String: String] = ProcessEnvironment.current()) {
        self.table = table
        self.flags = flags
        self.environment = environment
    }

    /// What the command line asks: the settings, or the help text.
    public enum Request: Sendable {
        case run(flags: [String: String])
        case help
        case settingsJSON
        /// `--check-settings`: check every value (the flags' and the environment's) and exit,
        /// without starting: what a deployment's test runs on the variables a manifest sets.
        case checkSettings(flags: [String: String])
    }

    /// Reads `--flag value`, `--flag=value`, `-h`/`--help`, `--settings-json` (the table, for the
    /// README generator) and `--check-settings`. Anything else is refused.
    public static func parse(_ arguments: [String], table: [Setting]) throws(InvalidSetting) -> Request {
        let byFlag = Dictionary(table.compactMap { setting in setting.flag.map { ($0, setting) } }, uniquingKeysWith: { a, _ in a })
        var flags: [String: String] = [:]
        var check = false
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            if argument == "-h" || argument == "--help" { return .help }
            if argument == "--settings-json" { return .settingsJSON }
            if argument == "--check-settings" {
                check = true
                continue
            }
            let (flag, inline) = argument.firstIndex(of: "=").map { (String(argument[..<$0]), String(argument[argument.index(after: $0)...])) }
                ?? (argument, nil)
            guard let setting = byFlag[flag] else {
                throw InvalidSetting(description: "unknown option \(flag) (--help lists the settings)")
            }
            if let inline {
                flags[setting.name] = inline
            } else {
                guard index < arguments.count else { throw InvalidSetting(description: "\(flag) needs a value") }
                flags[setting.name] = arguments[index]
                index += 1
            }
        }
        return check ? .checkSettings(flags: flags) : .run(flags: flags)
    }

    /// Checks every setting of the table as its getter would, and that each required one is set:
    /// the first bad value throws, named.
    public func checkAll() throws(InvalidSetting) {
        for declared in table {
            if declared.required, raw(declared) == nil {
                throw InvalidSetting(description: "\(declared.name) is required")
            }
            guard raw(declared) != nil else { continue }
            switch declared.kind {
            case .text, .choice: _ = try string(declared)
            case .integer: _ = try integer(declared)
            case .number: _ = try number(declared)
            case .duration: _ = try duration(declared)
            }
        }
    }

    private func setting(_ setting: Setting) -> Setting {
        // Reading a setting the table does not declare is a programming error: its flag would not
        // parse and --help would not list it.
        guard let declared = table.first(where: { $0.name == setting.name }) else {
            preconditionFailure("\(setting.name) is read but not in the command's settings table")
        }
        return declared
    }

    /// The value given to a declared setting and how an error names it (`--flag=value (NAME)`,
    /// `NAME=value`), or its default.
    private func raw(_ declared: Setting) -> (text: String, source: String)? {
        if let value = flags[declared.name] { return (value, "\(declared.flag ?? declared.name)=\(value) (\(declared.name))") }
        if let value = environment[declared.name], !value.isEmpty { return (value, "\(declared.name)=\(value)") }
        return declared.defaultValue.map { ($0, "the default \(declared.name)=\($0)") }
    }

    /// A declared setting that has a value (a default at least), with it: what the typed getters read.
    private func required(_ setting: Setting) -> (declared: Setting, text: String, source: String) {
        let declared = self.setting(setting)
        guard let (text, source) = raw(declared) else { preconditionFailure("\(declared.name) has no default") }
        return (declared, text, source)
    }

    /// Whether the flag or the variable is set (a default does not count).
    public func isSet(_ setting: Setting) -> Bool {
        flags[setting.name] != nil || !(environment[setting.name] ?? "").isEmpty
    }

    /// A text setting, or nil when unset with no default.
    public func string(_ setting: Setting) throws(InvalidSetting) -> String? {
        let declared = self.setting(setting)
        guard let (text, source) = raw(declared) else { return nil }
        if case .choice(let choices) = declared.kind {
            let value = text.lowercased()
            guard choices.contains(value) else {
                throw InvalidSetting(description: "\(source): expected \(choices.joined(separator: ", "))")
            }
            return value
        }
        return text
    }

    /// A whole number within the setting's range.
    public func integer(_ setting: Setting) throws(InvalidSetting) -> Int {
        let (declared, text, source) = required(setting)
        guard case .integer(let range) = declared.kind else { preconditionFailure("\(declared.name) is not an integer") }
        guard let value = Int(text.trimmingWhitespace), range.contains(value) else {
            throw InvalidSetting(description: "\(source): expected a whole number in \(range.lowerBound)…\(range.upperBound)")
        }
        return value
    }

    /// A number within the setting's range.
    public func number(_ setting: Setting) throws(InvalidSetting) -> Double {
        let (declared, text, source) = required(setting)
        guard case .number(let range) = declared.kind else { preconditionFailure("\(declared.name) is not a number") }
        guard let value = Double(text.trimmingWhitespace), value.isFinite, range.contains(value) else {
            throw InvalidSetting(description: "\(source): expected a number from \(range.lowerBound) to \(range.upperBound)")
        }
        return value
    }

    /// A duration within the setting's range.
    public func duration(_ setting: Setting) throws(InvalidSetting) -> Duration {
        let (declared, text, source) = required(setting)
        guard case .duration(let range) = declared.kind else { preconditionFailure("\(declared.name) is not a duration") }
        guard let value = DurationSetting.parse(text) else {
            throw InvalidSetting(description: "\(source): expected a duration such as 500ms, 30s, 5m or 1h")
        }
        guard range.contains(value) else {
            throw InvalidSetting(description: "\(source): expected from \(DurationSetting.text(range.lowerBound)) to \(DurationSetting.text(range.upperBound))")
        }
        return value
    }

    // MARK: What the table prints

    /// `--help`: the abstract, then one line per setting (variable, flag, meaning, default).
    public static func help(command: String, abstract: String, table: [Setting]) -> String {
        var out = "\(abstract)\n\nUSAGE: \(command) [--flag value ...]\n\n"
        out += "Settings: each is an environment variable; a flag, where shown, overrides it.\n"
        for setting in table {
            let help = (setting.help + (setting.defaultText == "—" ? "" : " (default " + setting.defaultText + ")")).filter { $0 != "`" }
            if setting.name.count > 27 {
                out += "  " + setting.name + "\n" + String(repeating: " ", count: 30)
            } else {
                out += "  " + pad(setting.name, 28)
            }
            out += pad(setting.flag ?? "", 30) + help + "\n"
        }
        out += "\n  -h, --help" + String(repeating: " ", count: 48) + "this text\n"
        return out
    }

    /// The table as JSON, for the README's generator (`scripts/settings-table`).
    public static func json(command: String, table: [Setting]) -> String {
        let rows = table.map { setting in
            "{\"name\":\(JSONText.quote(setting.name)),\"flag\":\(setting.flag.map(JSONText.quote) ?? "null"),"
                + "\"default\":\(JSONText.quote(setting.defaultText)),\"help\":\(JSONText.quote(setting.help)),"
                + "\"read_by\":\(setting.readBy.map(JSONText.quote) ?? "null"),\"required\":\(setting.required)}"
        }
        return "{\"command\":\(JSONText.quote(command)),\"settings\":[" + rows.joined(separator: ",") + "]}"
    }

    private static func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
    }
}

/// The process environment as a dictionary.
public enum ProcessEnvironment {
    public static func current() -> [String: String] {
        var result: [String: String] = [:]
        var pointer = environ
        while let entry = pointer.pointee {
            let text = String(cString: entry)
            if let equals = text.firstIndex(of: "=") {
                result[String(text[..<equals])] = String(text[text.index(after: equals)...])
            }
            pointer += 1
        }
        return result
    }
}
