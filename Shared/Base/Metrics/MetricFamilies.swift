/// Prometheus counters and histograms with labels, for the metrics a service adds to `/metrics`.
/// Label values come from bounded sets (routes, codes, operations, key ids), never from requests.
public final class CounterFamily: @unchecked Sendable {
    public let name: String
    let help: String
    let labelNames: [String]
    private let lock = PThreadMutex()
    private var values: [[String]: Double] = [:]

    /// `name` ends with `_total`; `seeded` label sets are shown (at 0) before anything is counted.
    public init(_ name: String, help: String, labels: [String], seeded: [[String]] = []) {
        self.name = name
        self.help = help
        labelNames = labels
        for labels in seeded { values[labels] = 0 }
    }

    public func increment(_ labels: [String], by amount: Double = 1) {
        lock.withLock { values[labels, default: 0] += amount }
    }

    public func render() -> String {
        let rows = lock.withLock { values }.sorted { $0.key.lexicographicallyPrecedes($1.key) }
        var text = "# HELP \(name) \(help)\n# TYPE \(name) counter\n"
        for (labels, value) in rows { text += "\(name)\(MetricText.labels(labelNames, labels)) \(MetricText.number(value))\n" }
        return text
    }
}

public final class HistogramFamily: @unchecked Sendable {
    public let name: String
    let help: String
    let labelNames: [String]
    let bounds: [Double]
    private let lock = PThreadMutex()
    private var series: [[String]: (buckets: [UInt64], count: UInt64, sum: Double)] = [:]

    public init(_ name: String, help: String, labels: [String], bounds: [Double]) {
        self.name = name
        self.help = help
        labelNames = labels
        self.bounds = bounds
    }

    public func observe(_ labels: [String], _ value: Double) {
        guard value.isFinite else { return }
        let index = bounds.firstIndex { value <= $0 }
        let width = bounds.count
        lock.withLock {
            // In place: one hash lookup, and the buckets' storage is not copied.
            Self.add(&series[labels, default: ([UInt64](repeating: 0, count: width), 0, 0)], index, value)
        }
    }

    private static func add(_ entry: inout (buckets: [UInt64], count: UInt64, sum: Double), _ index: Int?, _ value: Double) {
        if let index { entry.buckets[index] += 1 }
        entry.count += 1
        entry.sum += value
    }

    public func render() -> String {
        let rows = lock.withLock { series }.sorted { $0.key.lexicographicallyPrecedes($1.key) }
        var text = "# HELP \(name) \(help)\n# TYPE \(name) histogram\n"
        for (labels, entry) in rows {
            var cumulative: UInt64 = 0
            for (index, bound) in bounds.enumerated() {
                cumulative += entry.buckets[index]
                text += "\(name)_bucket\(MetricText.labels(labelNames + ["le"], labels + [MetricText.number(bound)])) \(cumulative)\n"
            }
            text += "\(name)_bucket\(MetricText.labels(labelNames + ["le"], labels + ["+Inf"])) \(entry.count)\n"
            text += "\(name)_sum\(MetricText.labels(labelNames, labels)) \(MetricText.number(entry.sum))\n"
            text += "\(name)_count\(MetricText.labels(labelNames, labels)) \(entry.count)\n"
        }
        return text
    }
}

/// Prometheus text helpers: label sets, escaped values, numbers.
public enum MetricText {
    static func labels(_ names: [String], _ values: [String]) -> String {
        guard !names.isEmpty else { return "" }
        return "{" + zip(names, values).map { "\($0)=\"\(escape($1))\"" }.joined(separator: ",") + "}"
    }

    public static func escape(_ text: String) -> String {
        var out = ""
        for character in text {
            switch character {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(character)
            }
        }
        return out
    }

    static func number(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : "\(value)"
    }
}
