import ArgumentParser
import Foundation
import KMSClient

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "kmsd's health and use since it started: uptime, keys by state, requests, latency, cache (administrators).")

    @OptionGroup var global: GlobalOptions

    func run() async throws {
        let s = try await global.withClient { try await $0.status() }
        if global.json {
            try printJSON([
                "ServerVersion": s.serverVersion, "StartedAt": Int(s.startedAt), "UptimeSeconds": Int(s.uptimeSeconds),
                "KeysByState": s.keysByState.mapValues { Int($0) },
                "Requests": s.requests.map { ["Action": $0.action, "Result": $0.result, "Count": Int($0.count)] },
                "LatencyP50Micros": Int(s.latencyP50Micros), "LatencyP99Micros": Int(s.latencyP99Micros),
                "KeyCacheEntries": Int(s.keyCacheEntries), "KeyCacheCapacity": Int(s.keyCacheCapacity),
                "Connections": Int(s.connections), "AuditRunId": s.auditRunID, "AuditSequence": Int(s.auditSequence),
                "IdentityPolicies": Int(s.identityPolicies), "Alarms": s.alarms.mapValues { Int($0) },
                "AccessDecisionsReused": Int(s.accessDecisionsReused),
            ])
            return
        }
        printFields([
            ("ServerVersion", s.serverVersion), ("StartedAt", formatUnixTime(s.startedAt)), ("Uptime", "\(s.uptimeSeconds) s"),
            ("Keys", s.keysByState.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")),
            ("Requests", String(s.requests.reduce(0) { $0 + $1.count })),
            ("Latency", "p50 \(Self.bound(s.latencyP50Micros)), p99 \(Self.bound(s.latencyP99Micros))"),
            ("KeyCache", "\(s.keyCacheEntries) of \(s.keyCacheCapacity)"), ("Connections", String(s.connections)),
            ("Audit", "run \(s.auditRunID), \(s.auditSequence) records"), ("IdentityPolicies", String(s.identityPolicies)),
            ("Alarms", s.alarms.isEmpty ? "none" : s.alarms.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")),
            ("AccessDecisionsReused", String(s.accessDecisionsReused)),
        ])
        if !s.requests.isEmpty {
            writeStdout("\n")
            printColumns(headers: ["Action", "Result", "Count"], rows: s.requests.map { [$0.action, $0.result, String($0.count)] })
        }
    }
}

extension Status {
    /// A latency bucket's upper bound for people.
    static func bound(_ micros: UInt64) -> String { micros == UInt64.max ? "> 1 s" : "≤ \(micros) µs" }
}

/// Seconds from whole microseconds, in plain decimal (0.00005, not 5e-05).
func secondsText(_ micros: UInt64) -> String {
    let whole = micros / 1_000_000, fraction = micros % 1_000_000
    guard fraction > 0 else { return String(whole) }
    var digits = String(fraction)
    digits = String(repeating: "0", count: 6 - digits.count) + digits
    while digits.hasSuffix("0") { digits.removeLast() }
    return "\(whole).\(digits)"
}

struct Metrics: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "metrics",
        abstract: "Print kmsd's metrics in the Prometheus text format (for node_exporter's textfile collector).",
        discussion: "For example, from cron: kmsctl metrics > /var/lib/node_exporter/textfile/kmsd.prom.$$ && mv /var/lib/node_exporter/textfile/kmsd.prom.$$ /var/lib/node_exporter/textfile/kmsd.prom")

    @OptionGroup var global: GlobalOptions

    func run() async throws {
        let s = try await global.withClient { try await $0.status() }
        writeStdout(Self.exposition(s))
    }

    /// The Prometheus text exposition format, version 0.0.4.
    static func exposition(_ s: Kmsd_V1_StatusResponse) -> String {
        var out = ""
        func family(_ name: String, _ type: String, _ help: String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        }
        func label(_ v: String) -> String {
            v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
        }
        family("kmsd_up", "gauge", "1 while kmsd answers.")
        out += "kmsd_up 1\n"
        family("kmsd_start_time_seconds", "gauge", "When kmsd started (Unix time).")
        out += "kmsd_start_time_seconds \(s.startedAt)\n"
        family("kmsd_keys", "gauge", "Keys by state.")
        for state in ["Enabled", "Disabled", "PendingDeletion", "PendingImport"] {
            out += "kmsd_keys{state=\"\(state)\"} \(s.keysByState[state] ?? 0)\n"
        }
        family("kmsd_requests_total", "counter", "Requests answered since kmsd started, by operation and result.")
        for r in s.requests { out += "kmsd_requests_total{action=\"\(label(r.action))\",result=\"\(label(r.result))\"} \(r.count)\n" }
        family("kmsd_request_duration_seconds", "histogram", "Time from a request's arrival to its answer.")
        for h in s.latencies {
            var cumulative: UInt64 = 0
            for (i, bound) in h.bucketUpperMicros.enumerated() {
                cumulative += h.bucketCounts[i]
                out += "kmsd_request_duration_seconds_bucket{action=\"\(label(h.action))\",le=\"\(secondsText(bound))\"} \(cumulative)\n"
            }
            out += "kmsd_request_duration_seconds_bucket{action=\"\(label(h.action))\",le=\"+Inf\"} \(h.count)\n"
            out += "kmsd_request_duration_seconds_sum{action=\"\(label(h.action))\"} \(secondsText(h.sumMicros))\n"
            out += "kmsd_request_duration_seconds_count{action=\"\(label(h.action))\"} \(h.count)\n"
        }
        family("kmsd_key_cache_entries", "gauge", "Keys whose unwrapped material is cached in locked memory.")
        out += "kmsd_key_cache_entries \(s.keyCacheEntries)\n"
        family("kmsd_key_cache_capacity", "gauge", "The key cache's capacity.")
        out += "kmsd_key_cache_capacity \(s.keyCacheCapacity)\n"
        family("kmsd_connections", "gauge", "Open client connections.")
        out += "kmsd_connections \(s.connections)\n"
        family("kmsd_audit_records_total", "counter", "Audit records journald took in this run.")
        out += "kmsd_audit_records_total \(s.auditSequence)\n"
        family("kmsd_alarms_total", "counter", "Alarms fired since kmsd started, by rule.")
        for rule in ["AccessDeniedRate", "PendingDeletionKeyUse", "DisabledKeyUse", "IntegrityFailure", "NewDecryptCaller"] {
            out += "kmsd_alarms_total{rule=\"\(rule)\"} \(s.alarms[rule] ?? 0)\n"
        }
        family("kmsd_identity_policies", "gauge", "Identity policies in force.")
        out += "kmsd_identity_policies \(s.identityPolicies)\n"
        family("kmsd_access_decisions_reused_total", "counter", "Requests answered with an access decision their connection remembered.")
        out += "kmsd_access_decisions_reused_total \(s.accessDecisionsReused)\n"
        return out
    }
}
