import Foundation
import Glibc

/// One target's figures in one scenario.
struct TargetFigures: Codable, Sendable {
    let completed: Int
    let opsPerSecond: Double
    let p50Microseconds: Double
    let p99Microseconds: Double
    /// The target process's own CPU time per completed operation (kmsd only: the echo server
    /// runs inside kmsbench).
    let cpuMicrosecondsPerOperation: Double?

    init(_ result: LoadResult) {
        completed = result.completed
        opsPerSecond = result.opsPerSecond
        p50Microseconds = Double(result.p50Nanos) / 1000
        p99Microseconds = Double(result.p99Nanos) / 1000
        cpuMicrosecondsPerOperation = result.cpuNanos.map { Double($0) / 1000 / Double(max(1, result.completed)) }
    }
}

/// Echo and kmsd side by side; ratios are kmsd ÷ echo.
struct ScenarioResult: Codable, Sendable {
    let scenario: String
    let connections: Int
    let inFlightPerConnection: Int
    let echo: TargetFigures
    let kmsd: TargetFigures
    let opsRatio: Double
    let p50Ratio: Double
    let p99Ratio: Double

    init(scenario: Scenario, echo: LoadResult, kmsd: LoadResult) {
        self.scenario = scenario.name
        self.connections = scenario.connections
        self.inFlightPerConnection = scenario.window
        self.echo = TargetFigures(echo)
        self.kmsd = TargetFigures(kmsd)
        opsRatio = Self.ratio(self.kmsd.opsPerSecond, self.echo.opsPerSecond)
        p50Ratio = Self.ratio(self.kmsd.p50Microseconds, self.echo.p50Microseconds)
        p99Ratio = Self.ratio(self.kmsd.p99Microseconds, self.echo.p99Microseconds)
    }

    private static func ratio(_ a: Double, _ b: Double) -> Double {
        b > 0 ? a / b : 0
    }
}

/// Where and how the figures were taken.
struct BenchEnvironment: Codable, Sendable {
    let date: String
    let kernel: String
    let processors: Int
    let durationSeconds: Double
    let warmupSeconds: Double
    let plaintextBytes: Int
    let requestFrameBytes: Int

    static func current(duration: Double, warmup: Double, plaintextBytes: Int, requestFrameBytes: Int) -> BenchEnvironment {
        BenchEnvironment(date: ISO8601DateFormatter().string(from: Date()),
                         kernel: kernelRelease(),
                         processors: ProcessInfo.processInfo.activeProcessorCount,
                         durationSeconds: duration,
                         warmupSeconds: warmup,
                         plaintextBytes: plaintextBytes,
                         requestFrameBytes: requestFrameBytes)
    }

    /// What `uname -r` prints.
    static func kernelRelease() -> String {
        var u = utsname()
        guard uname(&u) == 0 else { return "unknown" }
        return withUnsafeBytes(of: u.release) { raw in
            String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
    }
}

/// The access decision's cost, in process and end to end.
struct PolicyReport: Codable, Sendable {
    let inProcess: PolicyBench.Result
    let scenario: String
    let defaultPolicy: TargetFigures
    let twentyStatementPolicy: TargetFigures

    func markdown() -> String {
        let a = defaultPolicy.cpuMicrosecondsPerOperation, b = twentyStatementPolicy.cpuMicrosecondsPerOperation
        var lines = [
            "",
            String(format: "Access decision (KeyService.decide, in process): default policy %.0f ns, %d-statement policy %.0f ns per request (+%.2f µs).",
                   inProcess.defaultPolicyNanos, inProcess.statements, inProcess.twentyStatementNanos,
                   (inProcess.twentyStatementNanos - inProcess.defaultPolicyNanos) / 1000),
        ]
        if let a, let b {
            lines.append(String(format: "End to end (%@, same run): default policy %.0f ops/s, %.1f µs kmsd CPU/op; %d-statement policy %.0f ops/s, %.1f µs kmsd CPU/op (%+.1f µs).",
                                scenario, defaultPolicy.opsPerSecond, a, inProcess.statements, twentyStatementPolicy.opsPerSecond, b, b - a))
        }
        return lines.joined(separator: "\n")
    }
}

/// The audit's cost: kmsd with journald against kmsd with a sink, and journald's ingest rate.
struct AuditCostReport: Codable, Sendable {
    let scenario: String
    let withJournald: TargetFigures
    let withoutJournald: TargetFigures
    let sinkRecords: Int
    let journald: JournaldIngest.Result

    func markdown() -> String {
        var lines = ["", "Audit (\(scenario), same run):"]
        func cpu(_ t: TargetFigures) -> String { t.cpuMicrosecondsPerOperation.map { String(format: "%.1f µs kmsd CPU/op", $0) } ?? "CPU n/a" }
        lines.append(String(format: "- records to journald: %.0f Encrypt/s, %@", withJournald.opsPerSecond, cpu(withJournald)))
        lines.append(String(format: "- records to a sink that drops them (no journald): %.0f Encrypt/s, %@ (%d records taken)",
                            withoutJournald.opsPerSecond, cpu(withoutJournald), sinkRecords))
        lines.append(String(format: "- journald's ingest of records like kmsd's: %.0f records/s (%d sent, %d stored in %.1f s)",
                            journald.recordsPerSecond, journald.sent, journald.stored, journald.seconds))
        if journald.recordsPerSecond > 0 {
            lines.append(String(format: "- kmsd with audit reaches %.0f%% of journald's ingest rate", 100 * withJournald.opsPerSecond / journald.recordsPerSecond))
        }
        return lines.joined(separator: "\n")
    }
}

struct BenchReport: Codable, Sendable {
    let environment: BenchEnvironment
    let scenarios: [ScenarioResult]
    var policy: PolicyReport? = nil
    var audit: AuditCostReport? = nil

    /// A header line and a Markdown table. Contains no key material.
    func markdown() -> String {
        let e = environment
        var lines: [String] = []
        lines.append("kmsbench \(e.date) · Linux \(e.kernel) · nproc \(e.processors) · "
            + "\(Self.number(e.durationSeconds)) s measured after \(Self.number(e.warmupSeconds)) s warm-up per run · "
            + "Encrypt of \(e.plaintextBytes) bytes (request frame \(e.requestFrameBytes) bytes, echo frames identical)")
        lines.append("")
        lines.append("| scenario | echo ops/s | kmsd ops/s | kmsd/echo | echo p50 µs | kmsd p50 µs | echo p99 µs | kmsd p99 µs | p50 kmsd/echo | p99 kmsd/echo | kmsd CPU µs/op |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in scenarios {
            let cells = [
                s.scenario,
                Self.fixed(s.echo.opsPerSecond, 0),
                Self.fixed(s.kmsd.opsPerSecond, 0),
                Self.fixed(s.opsRatio, 2),
                Self.fixed(s.echo.p50Microseconds, 1),
                Self.fixed(s.kmsd.p50Microseconds, 1),
                Self.fixed(s.echo.p99Microseconds, 1),
                Self.fixed(s.kmsd.p99Microseconds, 1),
                Self.fixed(s.p50Ratio, 2),
                Self.fixed(s.p99Ratio, 2),
                s.kmsd.cpuMicrosecondsPerOperation.map { Self.fixed($0, 1) } ?? "—",
            ]
            lines.append("| " + cells.joined(separator: " | ") + " |")
        }
        if let policy { lines.append(policy.markdown()) }
        if let audit { lines.append(audit.markdown()) }
        return lines.joined(separator: "\n")
    }

    /// The same results as one line of JSON (sorted keys).
    func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: try encoder.encode(self), as: UTF8.self)
    }

    private static func fixed(_ value: Double, _ decimals: Int) -> String {
        String(format: "%.\(decimals)f", value)
    }

    /// 5 → "5", 0.5 → "0.5".
    private static func number(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(value)
    }
}
