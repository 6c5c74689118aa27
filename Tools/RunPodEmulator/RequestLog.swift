import TalkMeshBase

/// Every API request's route and arrival time, so tests can check a client's request budget.
actor RequestLog {
    private var entries: [(String, Double)] = []

    func record(_ route: String) {
        if entries.count < 200_000 { entries.append((route, MonotonicClock.seconds())) }
    }

    func json() -> String {
        "[" + entries.map { "[\"\($0.0)\",\($0.1)]" }.joined(separator: ",") + "]"
    }
}
