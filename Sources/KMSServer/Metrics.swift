import Foundation
import Synchronization

/// Request counters and latency histograms since kmsd started, for Status and
/// `kmsctl metrics` (Prometheus text format). One short lock per request.
final class Metrics: Sendable {
    /// Upper bounds of the latency buckets, in microseconds (Prometheus `le`, in seconds).
    static let bucketsMicros: [UInt64] = [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000]

    struct ActionStats: Sendable {
        /// Requests by result (`AuditRecord.Result`).
        var allowed: UInt64 = 0, denied: UInt64 = 0, failed: UInt64 = 0
        /// The counts by result name, results never seen left out.
        var results: [String: UInt64] {
            let all: [(AuditRecord.Result, UInt64)] = [(.allowed, allowed), (.denied, denied), (.failed, failed)]
            return Dictionary(uniqueKeysWithValues: all.filter { $0.1 > 0 }.map { ($0.0.rawValue, $0.1) })
        }
        /// Count per bucket (not cumulative); the last one is +Inf.
        var buckets = [UInt64](repeating: 0, count: Metrics.bucketsMicros.count + 1)
        var sumMicros: UInt64 = 0
        var count: UInt64 = 0
    }

    let started = Date()
    private let stats = Mutex<[String: ActionStats]>([:])
    /// Open connections, kept by the server.
    let connections = Atomic<Int>(0)
    /// Requests whose access decision came from their connection's `DecisionMemo`.
    let decisionsReused = Atomic<UInt64>(0)

    func record(action: String, result: AuditRecord.Result, micros: UInt64) {
        let bucket = Self.bucketsMicros.firstIndex { micros <= $0 } ?? Self.bucketsMicros.count
        stats.withLock { all in Self.bump(&all[action, default: ActionStats()], result: result, bucket: bucket, micros: micros) }
    }

    /// In place: one look-up of the action, no copy of its entry.
    private static func bump(_ s: inout ActionStats, result: AuditRecord.Result, bucket: Int, micros: UInt64) {
        switch result {
        case .allowed: s.allowed += 1
        case .denied: s.denied += 1
        case .failed: s.failed += 1
        }
        s.buckets[bucket] += 1
        s.sumMicros &+= micros
        s.count += 1
    }

    var snapshot: [String: ActionStats] { stats.withLock { $0 } }

    /// The latency below which `fraction` of requests fell (the bucket's upper bound), over all
    /// actions; nil before any request.
    static func percentile(_ fraction: Double, of all: [String: ActionStats]) -> UInt64? {
        var buckets = [UInt64](repeating: 0, count: bucketsMicros.count + 1)
        for s in all.values { for i in buckets.indices { buckets[i] += s.buckets[i] } }
        let total = buckets.reduce(0, +)
        guard total > 0 else { return nil }
        let target = UInt64((Double(total) * fraction).rounded(.up))
        var seen: UInt64 = 0
        for (i, n) in buckets.enumerated() {
            seen += n
            if seen >= target { return i < bucketsMicros.count ? bucketsMicros[i] : UInt64.max }
        }
        return UInt64.max
    }
}
