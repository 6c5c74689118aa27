import TalkMeshBase

/// Request counts and latency histograms by protocol, method and status, in Prometheus text format.
///
/// Each event loop records into its own shard (an uncontended lock); `/metrics` merges them.
public final class RequestMetrics: @unchecked Sendable {
    /// Histogram bucket upper bounds, in seconds.
    static let buckets: [Double] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

    struct Key: Hashable {
        let kind: Kind
        let method: String
        let status: String
    }

    enum Kind: Hashable { case grpc, http }

    struct Series {
        var count: UInt64 = 0
        var sum: Double = 0
        var buckets = [UInt64](repeating: 0, count: RequestMetrics.buckets.count)
    }

    final class Shard: @unchecked Sendable {
        let lock = PThreadMutex()
        var series: [Key: Series] = [:]
        /// gRPC series by (method index, status code): flat arrays, no hashing on the hot path.
        var grpcCounts: [UInt64]
        var grpcSums: [Double]
        var grpcBuckets: [UInt64]

        init(methods: Int) {
            grpcCounts = Array(repeating: 0, count: methods * RequestMetrics.codes)
            grpcSums = Array(repeating: 0, count: methods * RequestMetrics.codes)
            grpcBuckets = Array(repeating: 0, count: methods * RequestMetrics.codes * RequestMetrics.buckets.count)
        }
    }

    /// gRPC status codes 0…16.
    static let codes = 17
    private let grpcMethods: [String]

    private let shards: [Shard]
    private let gauges = PThreadMutex()
    private var connectionsOpen = 0
    private var connectionsTotal: UInt64 = 0
    private let service: String

    /// `grpcMethods`: the registry's method paths by index (index 0 is "unknown").
    init(shards: Int, service: String, grpcMethods: [String] = ["unknown"]) {
        self.grpcMethods = grpcMethods
        self.shards = (0..<max(1, shards)).map { _ in Shard(methods: grpcMethods.count) }
        self.service = service
    }

    /// Records a gRPC call by method index and status code.
    func recordGRPC(shard: Int, method: Int, code: Int, seconds: Double) {
        let shard = shards[shard % shards.count]
        let series = method * Self.codes + min(max(code, 0), Self.codes - 1)
        var bucket = Self.buckets.count
        for (index, bound) in Self.buckets.enumerated() where seconds <= bound {
            bucket = index
            break
        }
        shard.lock.lock()
        shard.grpcCounts[series] += 1
        shard.grpcSums[series] += seconds
        if bucket < Self.buckets.count { shard.grpcBuckets[series * Self.buckets.count + bucket] += 1 }
        shard.lock.unlock()
    }

    func record(shard: Int, kind: Kind, method: String, status: String, seconds: Double) {
        let shard = shards[shard % shards.count]
        let key = Key(kind: kind, method: method, status: status)
        shard.lock.withLock {
            // In place: one hash lookup, and the buckets' storage is not copied.
            Self.observe(&shard.series[key, default: Series()], seconds)
        }
    }

    private static func observe(_ entry: inout Series, _ seconds: Double) {
        entry.count += 1
        entry.sum += seconds
        for (index, bound) in buckets.enumerated() where seconds <= bound {
            entry.buckets[index] += 1
            break
        }
    }

    func connectionOpened() { gauges.withLock { connectionsOpen += 1; connectionsTotal += 1 } }
    func connectionClosed() { gauges.withLock { connectionsOpen -= 1 } }

    /// The Prometheus text exposition (version 0.0.4).
    public func render() -> String {
        var merged: [Key: Series] = [:]
        for shard in shards {
            shard.lock.withLock {
                for series in shard.grpcCounts.indices where shard.grpcCounts[series] > 0 {
                    let key = Key(kind: .grpc, method: grpcMethods[series / Self.codes], status: String(series % Self.codes))
                    var entry = merged[key] ?? Series()
                    entry.count += shard.grpcCounts[series]
                    entry.sum += shard.grpcSums[series]
                    for index in entry.buckets.indices {
                        entry.buckets[index] += shard.grpcBuckets[series * Self.buckets.count + index]
                    }
                    merged[key] = entry
                }
                for (key, value) in shard.series {
                    var entry = merged[key] ?? Series()
                    entry.count += value.count
                    entry.sum += value.sum
                    for index in entry.buckets.indices { entry.buckets[index] += value.buckets[index] }
                    merged[key] = entry
                }
            }
        }
        let (open, total) = gauges.withLock { (connectionsOpen, connectionsTotal) }
        var out = ""
        let families: [(Kind, String, String, String)] = [
            (.grpc, "talkmesh_grpc_server_requests", "grpc_method", "grpc_code"),
            (.http, "talkmesh_http_server_requests", "route", "status"),
        ]
        for (kind, name, methodLabel, statusLabel) in families {
            let rows = merged.filter { $0.key.kind == kind }.sorted { ($0.key.method, $0.key.status) < ($1.key.method, $1.key.status) }
            out += "# HELP \(name)_total Requests handled, by \(methodLabel) and \(statusLabel).\n"
            out += "# TYPE \(name)_total counter\n"
            for (key, series) in rows {
                out += "\(name)_total{service=\"\(service)\",\(methodLabel)=\"\(Self.escape(key.method))\",\(statusLabel)=\"\(key.status)\"} \(series.count)\n"
            }
            let histogram = name.replacingSuffix("_requests", with: "_request_duration_seconds")
            out += "# HELP \(histogram) Time from a complete request to the response, in seconds.\n"
            out += "# TYPE \(histogram) histogram\n"
            for (key, series) in rows {
                let labels = "service=\"\(service)\",\(methodLabel)=\"\(Self.escape(key.method))\",\(statusLabel)=\"\(key.status)\""
                var cumulative: UInt64 = 0
                for (index, bound) in Self.buckets.enumerated() {
                    cumulative += series.buckets[index]
                    out += "\(histogram)_bucket{\(labels),le=\"\(bound)\"} \(cumulative)\n"
                }
                out += "\(histogram)_bucket{\(labels),le=\"+Inf\"} \(series.count)\n"
                out += "\(histogram)_sum{\(labels)} \(series.sum)\n"
                out += "\(histogram)_count{\(labels)} \(series.count)\n"
            }
        }
        out += "# HELP talkmesh_server_connections Open client connections.\n"
        out += "# TYPE talkmesh_server_connections gauge\n"
        out += "talkmesh_server_connections{service=\"\(service)\"} \(open)\n"
        out += "# HELP talkmesh_server_connections_accepted_total Client connections accepted.\n"
        out += "# TYPE talkmesh_server_connections_accepted_total counter\n"
        out += "talkmesh_server_connections_accepted_total{service=\"\(service)\"} \(total)\n"
        return out
    }

    private static func escape(_ text: String) -> String { MetricText.escape(text) }
}

extension String {
    func replacingSuffix(_ suffix: String, with replacement: String) -> String {
        hasSuffix(suffix) ? String(dropLast(suffix.count)) + replacement : self
    }
}
