import Foundation
import Logging
import TalkMeshCore
import TalkMeshRPC

/// The OpenTelemetry SDK's standard variables, as every service reads them (environment only).
extension Setting {
    static let otlpEndpoint = Setting("OTEL_EXPORTER_OTLP_ENDPOINT", shown: "— (spans are not exported)", flag: nil,
                                      help: "OTLP/HTTP collector root; spans go to `<root>/v1/traces` as protobuf")
    static let otlpTracesEndpoint = Setting("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", shown: "—", flag: nil,
                                            help: "the full traces URL, instead of the root")
    static let otlpHeaders = Setting("OTEL_EXPORTER_OTLP_HEADERS", shown: "—", flag: nil, help: "`key=value,…` sent with every export")
    static let otlpTimeout = Setting("OTEL_EXPORTER_OTLP_TIMEOUT", .integer(1...600_000), default: "10000", flag: nil,
                                     help: "one export's budget, ms")
    static let otelServiceName = Setting("OTEL_SERVICE_NAME", shown: "the service's command name", flag: nil,
                                         help: "the `service.name` resource attribute")
    static let otelResourceAttributes = Setting("OTEL_RESOURCE_ATTRIBUTES", shown: "—", flag: nil,
                                                help: "`key=value,…` resource attributes (e.g. `deployment.environment=prod`)")
    static let otelSampler = Setting("OTEL_TRACES_SAMPLER", .choice(["parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
                                                                     "always_on", "always_off", "traceidratio"]),
                                     default: "parentbased_always_on", flag: nil, help: "which traces are recorded")
    static let otelSamplerArg = Setting("OTEL_TRACES_SAMPLER_ARG", .number(0...1), default: "1", flag: nil,
                                        help: "the ratio of the `*traceidratio` samplers")
    static let otelQueueSize = Setting("OTEL_BSP_MAX_QUEUE_SIZE", .integer(1...1_000_000), default: "2048", flag: nil,
                                       help: "spans waiting for export; past it new spans are dropped and counted")
    static let otelBatchSize = Setting("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", .integer(1...100_000), default: "512", flag: nil,
                                       help: "spans per export")
    static let otelScheduleDelay = Setting("OTEL_BSP_SCHEDULE_DELAY", .integer(1...600_000), default: "5000", flag: nil,
                                           help: "the longest wait before queued spans are exported, ms")

    static let tracing: [Setting] = [otlpEndpoint, otlpTracesEndpoint, otlpHeaders, otlpTimeout, otelServiceName, otelResourceAttributes,
                                     otelSampler, otelSamplerArg, otelQueueSize, otelBatchSize, otelScheduleDelay]
}

enum TracingSetup {
    /// The tracer the settings describe, and its exporter when an endpoint is set.
    static func make(_ settings: Settings, serviceName: String, logger: Logger) throws -> (TalkMeshTracer, OTLPExporter?) {
        let samplerName = try settings.string(.otelSampler) ?? "parentbased_always_on"
        let ratio: Double = switch samplerName {
        case "always_off", "parentbased_always_off": 0
        case "traceidratio", "parentbased_traceidratio": try settings.number(.otelSamplerArg)
        default: 1
        }
        let sampler = TraceSampler(ratio: ratio, followParent: samplerName.hasPrefix("parentbased_"))
        let traces = try settings.string(.otlpTracesEndpoint).flatMap { $0.isEmpty ? nil : $0 }
        let root = try settings.string(.otlpEndpoint).flatMap { $0.isEmpty ? nil : $0 }
        guard let url = traces ?? root.map({ ($0.hasSuffix("/") ? String($0.dropLast()) : $0) + "/v1/traces" }) else {
            return (TalkMeshTracer(sink: nil, sampler: sampler), nil)
        }
        guard url.hasPrefix("http://") || url.hasPrefix("https://") else {
            throw InvalidSetting(description: "OTEL_EXPORTER_OTLP_ENDPOINT=\(url): expected an http(s) URL")
        }
        func pairs(_ setting: Setting) throws -> [(String, String)] {
            try (settings.string(setting) ?? "").split(separator: ",").compactMap { item in
                let parts = item.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces).removingPercentEncoding ?? "" }
                guard parts.count == 2, !parts[0].isEmpty else {
                    throw InvalidSetting(description: "\(setting.name): expected key=value,… (got \(item))")
                }
                return (parts[0], parts[1])
            }
        }
        var configuration = OTLPExporter.Configuration(url: url, serviceName: try settings.string(.otelServiceName).flatMap { $0.isEmpty ? nil : $0 } ?? serviceName)
        configuration.headers = try pairs(.otlpHeaders).map { "\($0.0): \($0.1)" }
        configuration.resource = try pairs(.otelResourceAttributes).filter { $0.0 != "service.name" }
        configuration.timeoutMs = try settings.integer(.otlpTimeout)
        configuration.maxQueue = try settings.integer(.otelQueueSize)
        configuration.maxBatch = try settings.integer(.otelBatchSize)
        configuration.scheduleDelayMs = try settings.integer(.otelScheduleDelay)
        let exporter = OTLPExporter(configuration: configuration, logger: logger)
        return (TalkMeshTracer(sink: exporter, sampler: sampler), exporter)
    }
}
