import Foundation
import Glibc

/// One target's figures in one scenario.
struct TargetFigures: Codable, Sendable {
    let completed: Int
    let opsPerSecond: Double
    let p50Microseconds: Double
    let p99Microseconds: Double
    /// The server process's own CPU time per completed operation (kmsd, or the echo server).
    let cpuMicrosecondsPerOperation: Double?
    /// kmsbench's own CPU time (the client) per completed operation.
    let clientCPUMicrosecondsPerOperation: Double?

    init(_ result: LoadResult) {
        completed = result.completed
        opsPerSecond = result.opsPerSecond
        p50Microseconds = Double(result.p50Nanos) / 1000
        p99Microseconds = Double(result.p99Nanos) / 1000
        cpuMicrosecondsPerOperation = result.cpuNanos.map { Double($0) / 1000 / Double(max(1, result.completed)) }
        clientCPUMicrosecondsPerOperation = result.clientCPUNanos.map { Double($0) / 1000 / Double(max(1, result.completed)) }
    }
}

/// The echo baseline in one scenario.
struct EchoResult: Codable, Sendable {
    let scenario: String
    let echo: TargetFigures
}

/// kmsd in one scenario, one operation, audit on or off; ratios are kmsd ÷ echo.
struct KMSDResult: Codable, Sendable {
    let scenario: String
    let operation: String
    let audit: Bool
    let kmsd: TargetFigures
    let opsRatio: Double
    let p50Ratio: Double
    let p99Ratio: Double

    init(scenario: Scenario, operation: BenchOperation, audit: Bool, kmsd: LoadResult, echo: TargetFigures) {
        self.scenario = scenario.name
        self.operation = operation.rawValue
        self.audit = audit
        self.kmsd = TargetFigures(kmsd)
        opsRatio = Self.ratio(self.kmsd.opsPerSecond, echo.opsPerSecond)
        p50Ratio = Self.ratio(self.kmsd.p50Microseconds, echo.p50Microseconds)
        p99Ratio = Self.ratio(self.kmsd.p99Microseconds, echo.p99Microseconds)
    }

    private static func ratio(_ a: Double, _ b: Double) -> Double {
        b > 0 ? a / b : 0
    }
}

/// One of issue 10's targets, as measured in this run.
struct TargetCheck: Codable, Sendable {
    let target: String
    let measured: String
    let met: Bool
}

/// Where and how the figures were taken.
struct BenchEnvironment: Codable, Sendable {
    let date: String
    let kernel: String
    let processors: Int
    let durationSeconds: Double
    let warmupSeconds: Double
    /// The measured time of a run is split into this many rounds; the fastest gives the figures.
    let rounds: Int
    let plaintextBytes: Int
    let requestFrameBytes: Int
    let cpuModel: String

    static func current(duration: Double, warmup: Double, rounds: Int, plaintextBytes: Int, requestFrameBytes: Int) -> BenchEnvironment {
        BenchEnvironment(date: ISO8601DateFormatter().string(from: Date()),
                         kernel: kernelRelease(),
                         processors: ProcessInfo.processInfo.activeProcessorCount,
                         durationSeconds: duration,
                         warmupSeconds: warmup,
                         rounds: rounds,
                         plaintextBytes: plaintextBytes,
                         requestFrameBytes: requestFrameBytes,
                         cpuModel: cpuModel())
    }

    /// The first "model name" of /proc/cpuinfo.
    static func cpuModel() -> String {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("model name") }),
              let colon = line.firstIndex(of: ":") else { return "unknown" }
        return line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
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

struct BenchReport: Codable, Sendable {
    let environment: BenchEnvironment
    let echo: [EchoResult]
    let kmsd: [KMSDResult]
    let crypto: CryptoBench.Result
    let journald: JournaldIngest.Result
    var policy: PolicyReport? = nil

    func echoFigures(_ scenario: String) -> TargetFigures? { echo.first { $0.scenario == scenario }?.echo }

    func result(_ operation: BenchOperation, _ scenario: Scenario, audit: Bool) -> KMSDResult? {
        kmsd.first { $0.operation == operation.rawValue && $0.scenario == scenario.name && $0.audit == audit }
    }

    /// Issue 10's targets against this run's figures.
    var checks: [TargetCheck] {
        var out: [TargetCheck] = []
        let s1 = Scenario.all[0], s8 = Scenario.all[1], s32 = Scenario.all[2]
        func f(_ v: Double, _ d: Int = 1) -> String { String(format: "%.\(d)f", v) }
        if let e = result(.encrypt, s32, audit: false), let cpu = e.kmsd.cpuMicrosecondsPerOperation {
            out.append(TargetCheck(target: "audit off, Encrypt, \(s32.name): kmsd CPU ≤ 12 µs/op", measured: f(cpu) + " µs", met: cpu <= 12))
        }
        var worst: (ratio: Double, text: String)? = nil
        for r in kmsd where !r.audit {
            guard let cpu = r.kmsd.cpuMicrosecondsPerOperation, let echoCPU = echoFigures(r.scenario)?.cpuMicrosecondsPerOperation else { continue }
            let limit = 3 * (echoCPU + crypto.hkdfGCMMicroseconds)
            if worst == nil || cpu / limit > worst!.ratio {
                worst = (cpu / limit, "\(r.operation), \(r.scenario): \(f(cpu)) µs against 3 × (\(f(echoCPU)) + \(f(crypto.hkdfGCMMicroseconds))) = \(f(limit)) µs")
            }
        }
        if let worst {
            out.append(TargetCheck(target: "audit off, every operation and scenario: kmsd CPU ≤ 3 × (echo CPU per round trip + HKDF+GCM); worst", measured: worst.text, met: worst.ratio <= 1))
        }
        if let e = result(.encrypt, s8, audit: false) {
            out.append(TargetCheck(target: "audit off, Encrypt, \(s8.name): ≥ 50% of echo round trips/s", measured: f(100 * e.opsRatio, 0) + "%", met: e.opsRatio >= 0.5))
        }
        if let e = result(.encrypt, s32, audit: false) {
            let share = e.kmsd.opsPerSecond / max(1, crypto.hkdfGCMPerSecond)
            out.append(TargetCheck(target: "audit off, Encrypt, \(s32.name): ≥ 50% of one core's HKDF+GCM rate (\(f(crypto.hkdfGCMPerSecond, 0))/s)",
                                   measured: f(100 * share, 0) + "%", met: share >= 0.5))
        }
        for op in [BenchOperation.decrypt, .generateDataKey] {
            var lowest: (Double, String)? = nil
            for s in Scenario.all {
                guard let e = result(.encrypt, s, audit: false), let r = result(op, s, audit: false), e.kmsd.opsPerSecond > 0 else { continue }
                let share = r.kmsd.opsPerSecond / e.kmsd.opsPerSecond
                if lowest == nil || share < lowest!.0 { lowest = (share, s.name) }
            }
            if let (share, name) = lowest {
                out.append(TargetCheck(target: "audit off: \(op.rawValue) within 20% of Encrypt's ops/s in every scenario; lowest", measured: "\(f(100 * share, 0))% (\(name))", met: share >= 0.8))
            }
        }
        if let best = Scenario.all.compactMap({ result(.encrypt, $0, audit: true) }).max(by: { $0.kmsd.opsPerSecond < $1.kmsd.opsPerSecond }), journald.recordsPerSecond > 0 {
            let share = best.kmsd.opsPerSecond / journald.recordsPerSecond
            out.append(TargetCheck(target: "audit on, Encrypt: ≥ 70% of journald's ingest rate (\(f(journald.recordsPerSecond, 0)) records/s)",
                                   measured: "\(f(100 * share, 0))% (\(best.scenario))", met: share >= 0.7))
        }
        for audit in [false, true] {
            if let e = result(.encrypt, s1, audit: audit) {
                out.append(TargetCheck(target: "audit \(audit ? "on" : "off"), Encrypt, \(s1.name): p50 ≤ 2× echo, p99 ≤ 4× echo",
                                       measured: "p50 \(f(e.p50Ratio, 2))×, p99 \(f(e.p99Ratio, 2))×", met: e.p50Ratio <= 2 && e.p99Ratio <= 4))
            }
        }
        return out
    }

    /// Header, tables and the targets, in Markdown. Contains no key material.
    func markdown() -> String {
        let e = environment
        var lines: [String] = []
        lines.append("kmsbench \(e.date) · \(e.cpuModel) · nproc \(e.processors) · Linux \(e.kernel) · "
            + "\(Self.number(e.durationSeconds)) s measured after \(Self.number(e.warmupSeconds)) s warm-up per run, in \(e.rounds) rounds interleaved across the runs of a scenario (echo and kmsd), the fastest reported · "
            + "\(e.plaintextBytes)-byte plaintexts, one context pair (Encrypt request frame \(e.requestFrameBytes) bytes; echo frames identical)")
        lines.append("")
        lines.append(String(format: "Baselines: HKDF-SHA256 + AES-256-GCM of 64 B in process through OpenSSL's EVP_KDF and EVP AES-GCM %.2f µs of CPU, the fastest of five rounds (%.0f/s on one core; the targets' baseline); the same with kmsd's HKDF %.2f µs; kmsd's whole seal step %.2f µs. journald ingests %.0f records/s like kmsd's (%d sent, %d stored in %.1f s).",
                            crypto.hkdfGCMMicroseconds, crypto.hkdfGCMPerSecond, crypto.kmsdHKDFGCMMicroseconds, crypto.sealMicroseconds,
                            journald.recordsPerSecond, journald.sent, journald.stored, journald.seconds))
        lines.append("")
        lines.append("| echo server (C speed, thread per connection) | round trips/s | p50 µs | p99 µs | echo CPU µs/rt | client CPU µs/rt |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for r in echo {
            lines.append("| " + [r.scenario, Self.fixed(r.echo.opsPerSecond, 0), Self.fixed(r.echo.p50Microseconds, 1), Self.fixed(r.echo.p99Microseconds, 1),
                                 Self.optional(r.echo.cpuMicrosecondsPerOperation), Self.optional(r.echo.clientCPUMicrosecondsPerOperation)].joined(separator: " | ") + " |")
        }
        lines.append("")
        lines.append("| audit | operation | scenario | ops/s | ×echo | p50 µs | p99 µs | p50 ×echo | p99 ×echo | kmsd CPU µs/op | client CPU µs/op |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in kmsd {
            let cells = [
                r.audit ? "on" : "off", r.operation, r.scenario,
                Self.fixed(r.kmsd.opsPerSecond, 0), Self.fixed(r.opsRatio, 2),
                Self.fixed(r.kmsd.p50Microseconds, 1), Self.fixed(r.kmsd.p99Microseconds, 1),
                Self.fixed(r.p50Ratio, 2), Self.fixed(r.p99Ratio, 2),
                Self.optional(r.kmsd.cpuMicrosecondsPerOperation), Self.optional(r.kmsd.clientCPUMicrosecondsPerOperation),
            ]
            lines.append("| " + cells.joined(separator: " | ") + " |")
        }
        lines.append("")
        lines.append("Targets (issue 10):")
        for c in checks { lines.append("- [\(c.met ? "met" : "NOT met")] \(c.target): \(c.measured)") }
        if let policy { lines.append(policy.markdown()) }
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

    private static func optional(_ value: Double?) -> String {
        value.map { fixed($0, 1) } ?? "—"
    }

    /// 5 → "5", 0.5 → "0.5".
    private static func number(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(value)
    }
}
