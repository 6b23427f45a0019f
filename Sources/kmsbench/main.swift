import ArgumentParser
import Foundation
import Glibc
import KMSProtocol

/// kmsbench: measures kmsd Encrypt against a raw Unix-socket echo baseline, in one invocation.
struct KMSBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kmsbench",
        abstract: "Benchmark kmsd (Encrypt, Decrypt, GenerateDataKey; audit off and on) against a Unix-socket echo server.",
        discussion: """
        Starts two kmsd daemons of its own (--dev, state and sockets in the work directory): one \
        writing no audit records (--dev-audit-off: the request path alone) and one auditing to \
        journald fail-closed (a request whose record journald does not take fails and stops the \
        run, so every request counted was audited; a private systemd-journald is started when \
        none runs). Runs three scenarios \
        (1 connection with 1 request in flight, 8 connections with 1 each, 1 connection with 32 in \
        flight) against each operation of each daemon and against an echo server (its own \
        process, a thread per connection) that sends back every 4-byte-length frame unchanged; \
        same client, same concurrency, frames of the same bytes. Prints ops/s, p50 and p99 \
        latency, each as a ratio to the echo figure, and the CPU time per operation of kmsd, of \
        the echo server and of this client (from /proc over the measured window); the in-process \
        cost of HKDF + AES-GCM; journald's ingest rate; and issue 10's targets, met or not. Must \
        run as a kmsd administrator (root by default).
        """
    )

    static let plaintext: [UInt8] = (0..<64).map { UInt8($0) }

    @Option(name: .long, help: ArgumentHelp("kmsd binary to start. Default: kmsd next to kmsbench.", valueName: "path"))
    var kmsd: String?

    @Option(name: .long, help: ArgumentHelp("Measured seconds per scenario and target.", valueName: "seconds"))
    var duration: Double = 5

    @Option(name: .long, help: ArgumentHelp("Unmeasured seconds before each measurement.", valueName: "seconds"))
    var warmup: Double = 1

    @Option(name: .customLong("rounds"), help: ArgumentHelp("Split each run's measured time into this many rounds and report the fastest (kmsd and echo server alike); in make bench's main table the rounds of a scenario's runs are interleaved. Default 3.", valueName: "n"))
    var rounds: Int = 3

    @Flag(name: .customLong("policy-only"), help: "Only measure the access decision in process (no kmsd, no echo server).")
    var policyOnly = false

    @Flag(name: .long, help: "Also print the results as one line of JSON after the table.")
    var json = false

    @Option(name: .customLong("work-dir"), help: ArgumentHelp("Directory for kmsd's state, the sockets and kmsd.log. Default: a fresh directory under /tmp, removed at the end (a given directory is kept).", valueName: "dir"))
    var workDir: String?

    @Option(name: .customLong("kmsd-arg"), parsing: .unconditionalSingleValue, help: ArgumentHelp("Extra argument for kmsd, e.g. --kmsd-arg=--allow-unlocked-memory. Repeatable.", valueName: "arg"))
    var kmsdArguments: [String] = []

    @Option(name: .customLong("profile-scenario"), help: ArgumentHelp("Only run this scenario (1, 2 or 3) against kmsd, printing kmsd's pid first: for profiling with perf.", valueName: "n"))
    var profileScenario: Int?

    @Option(name: .customLong("profile-operation"), help: ArgumentHelp("With --profile-scenario: Encrypt, Decrypt or GenerateDataKey.", valueName: "op"))
    var profileOperationName: String = "Encrypt"

    @Flag(name: .customLong("profile-audit"), help: "With --profile-scenario: the kmsd that audits to journald (default: audit off).")
    var profileAudit = false

    @Option(name: .long, help: ArgumentHelp("Only the scale run: create this many keys in a kmsd of its own, restart it, and measure readiness, memory, Encrypt across random keys and ListKeys through all.", valueName: "keys"))
    var scale: Int?

    @Flag(name: .customLong("many-clients"), help: "Only the many-clients run: a well-behaved client's latency alone and beside 2,000 active and 500 stalled connections; stalled connections dropped; the per-uid limit.")
    var manyClients = false

    @Option(name: .long, help: ArgumentHelp("Only the soak run: Encrypt for this many seconds, sampling kmsd's memory and descriptors.", valueName: "seconds"))
    var soak: Double?

    @Flag(name: .customLong("envelope-only"), help: "Only issue 12's figures: file envelope throughput against openssl, and the data-key cache (one kmsd, audit off).")
    var envelopeOnly = false

    @Option(name: .long, help: ArgumentHelp("kmsctl binary for the file envelope figures. Default: kmsctl next to kmsbench.", valueName: "path"))
    var kmsctl: String?

    @Option(name: .customLong("echo-server"), help: .hidden)
    var echoServer: String?

    var profileOperation: BenchOperation { BenchOperation(rawValue: profileOperationName) ?? .encrypt }

    func validate() throws {
        guard BenchOperation(rawValue: profileOperationName) != nil else {
            throw ValidationError("--profile-operation takes \(BenchOperation.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard duration > 0, duration <= 3600 else { throw ValidationError("--duration takes seconds, more than 0 and at most 3600") }
        guard warmup >= 0, warmup <= 600 else { throw ValidationError("--warmup takes seconds, from 0 to 600") }
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        do {
            try benchmark()
        } catch {
            FileHandle.standardError.write(Data("kmsbench: error: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }

    private func benchmark() throws {
        if let echoServer {
            try EchoProcess.serve(path: echoServer)
            return
        }
        if policyOnly {
            let r = try PolicyBench.measure()
            print(String(format: "Access decision (KeyService.decide, in process): default policy %.0f ns, %d-statement policy %.0f ns per request",
                         r.defaultPolicyNanos, r.statements, r.twentyStatementNanos))
            return
        }
        let work = try WorkDirectory(requested: workDir)
        defer { work.remove() }
        if manyClients {
            let r = try ClientsBench.run(executable: try kmsd ?? Self.defaultKMSDPath(), work: work.path,
                                         kmsdArguments: kmsdArguments) { target, scenario, pid in
                try measure(target, scenario) { LoadDriver.processCPUNanos(pid: pid) }
            }
            print(r.markdown())
            if json { print(""); print(String(decoding: try JSONEncoder().encode(r), as: UTF8.self)) }
            return
        }
        if let soak {
            let r = try SoakBench.run(executable: try kmsd ?? Self.defaultKMSDPath(), work: work.path, seconds: soak,
                                      kmsdArguments: kmsdArguments) { target, scenario, seconds, pid in
                try LoadDriver.run(target: target, scenario: scenario, warmup: 0.2, duration: seconds) { LoadDriver.processCPUNanos(pid: pid) }
            }
            print(r.markdown())
            if json { print(""); print(String(decoding: try JSONEncoder().encode(r), as: UTF8.self)) }
            return
        }
        if let scale {
            guard scale > 0 else { throw BenchError("--scale takes a number of keys") }
            let r = try ScaleBench.run(executable: try kmsd ?? Self.defaultKMSDPath(), work: work.path, keys: scale,
                                       kmsdArguments: kmsdArguments) { target, scenario, pid in
                try measure(target, scenario) { LoadDriver.processCPUNanos(pid: pid) }
            }
            print(r.markdown())
            if json { print(""); print(String(decoding: try JSONEncoder().encode(r), as: UTF8.self)) }
            return
        }
        if envelopeOnly {
            let dir = work.path + "/envelope"
            progress("starting \(try kmsd ?? Self.defaultKMSDPath()), audit off (work directory \(dir))")
            let d = try BenchDaemon.launch(executable: try kmsd ?? Self.defaultKMSDPath(), workDirectory: dir,
                                           arguments: kmsdArguments + ["--dev-audit-off"])
            defer { _ = d.process.stop() }
            let r = try EnvelopeBench.run(socket: d.process.socketPath, keyID: d.key, kmsctl: try kmsctl ?? Self.sibling("kmsctl"),
                                          work: dir, seconds: duration)
            print(r.markdown())
            if json { print(""); print(String(decoding: try JSONEncoder().encode(r), as: UTF8.self)) }
            return
        }
        _ = try UnixSocket.address(work.path + "/audit-off/kmsd.sock")  // fail early if the path is too long
        try JournaldIngest.ensureRunning()
        let executable = try kmsd ?? Self.defaultKMSDPath()

        // Two daemons: one writing no audit records (the request path alone), one auditing to
        // journald as in production.
        var daemons: [BenchDaemon] = []
        defer {
            for d in daemons {
                progress("stopping kmsd (audit \(d.audit ? "on" : "off"))")
                if let status = d.process.stop(), status != 0 { progress("kmsd exited with status \(status)") }
            }
        }
        for audit in [false, true] {
            let dir = work.path + (audit ? "/audit-on" : "/audit-off")
            progress("starting \(executable), audit \(audit ? "to journald" : "off") (work directory \(dir))")
            var d = try BenchDaemon.launch(executable: executable, workDirectory: dir,
                                           arguments: kmsdArguments + (audit ? ["--audit-fail-closed", "true"] : ["--dev-audit-off"]), audit: audit)
            daemons.append(d)
            d.blob = try d.process.encrypt(keyID: d.key, plaintext: Self.plaintext)
            daemons[daemons.count - 1] = d
        }

        let encryptTarget = try daemons[0].target(.encrypt, plaintext: Self.plaintext)
        var sampleFrame: [UInt8] = []
        encryptTarget.makeFrame(id: RequestFrames.firstID, into: &sampleFrame)

        if let n = profileScenario {
            guard (1...Scenario.all.count).contains(n) else { throw BenchError("--profile-scenario takes 1...\(Scenario.all.count)") }
            let d = daemons[profileAudit ? 1 : 0]
            progress("kmsd pid \(d.process.pid)")
            let pid = d.process.pid
            let r = try measure(try d.target(profileOperation, plaintext: Self.plaintext), Scenario.all[n - 1]) { LoadDriver.processCPUNanos(pid: pid) }
            print(String(format: "%.0f ops/s, kmsd CPU %.1f µs/op", r.opsPerSecond, Double(r.cpuNanos ?? 0) / 1000 / Double(max(1, r.completed))))
            return
        }

        progress("HKDF-SHA256 + AES-256-GCM in process")
        let crypto = try CryptoBench.measure()

        let echo = EchoProcess(path: work.path + "/echo.sock")
        try echo.start()
        defer { echo.stop() }
        let echoTarget = EchoTarget(socketPath: echo.path, payloadFrame: sampleFrame)

        // Every scenario's runs side by side: the echo server, then each operation against each
        // daemon; their rounds are interleaved (round 1 of all, then round 2 of all, ...), so a
        // slow moment of the machine falls on a round of each, not on one target's whole run,
        // and the figures compared (kmsd against echo, Decrypt against Encrypt) come from
        // rounds measured seconds apart.
        var slots: [Slot] = []
        for scenario in Scenario.all {
            let echoPID = echo.pid
            slots.append(Slot(label: echoTarget.name, scenario: scenario) { warmup, duration in
                try LoadDriver.run(target: echoTarget, scenario: scenario, warmup: warmup, duration: duration) { LoadDriver.processCPUNanos(pid: echoPID) }
            })
            for d in daemons {
                for op in BenchOperation.allCases {
                    let t = try d.target(op, plaintext: Self.plaintext)
                    let pid = d.process.pid, process = d.process
                    slots.append(Slot(label: "kmsd audit \(d.audit ? "on" : "off") \(op.rawValue)", scenario: scenario,
                                      kmsd: (d.audit, op)) { warmup, duration in
                        do {
                            return try LoadDriver.run(target: t, scenario: scenario, warmup: warmup, duration: duration) { LoadDriver.processCPUNanos(pid: pid) }
                        } catch {
                            throw BenchError("\(error)\n\(process.logExcerpt())")
                        }
                    })
                }
            }
        }
        let measured = zip(slots, try measureInterleaved(slots))
        let echoResults = measured.filter { $0.0.kmsd == nil }.map { EchoResult(scenario: $0.0.scenario.name, echo: TargetFigures($0.1)) }
        let echoFigures = Dictionary(uniqueKeysWithValues: echoResults.map { ($0.scenario, $0.echo) })
        let results = measured.compactMap { slot, r in
            slot.kmsd.map { KMSDResult(scenario: slot.scenario, operation: $0.operation, audit: $0.audit, kmsd: r, echo: echoFigures[slot.scenario.name]!) }
        }

        progress("journald's ingest rate for records like kmsd's (\(Self.seconds(duration)) s)")
        let ingest = try JournaldIngest.measure(seconds: duration)

        // The access decision: in process (precise), then end to end with a key whose policy has
        // 20 statements against the default-policy key, audit off, 32 in flight, same run.
        progress("policy evaluation: default policy and a 20-statement policy")
        let inProcess = try PolicyBench.measure()
        var policyDaemon = daemons[0]
        policyDaemon.key = try policyDaemon.process.createKey()
        try policyDaemon.process.putKeyPolicy(keyID: policyDaemon.key, policy: PolicyBench.twentyStatements(uid: getuid()))
        let scenario = Scenario.all[2]
        let quietPID = policyDaemon.process.pid
        let withPolicy = try measure(try policyDaemon.target(.encrypt, plaintext: Self.plaintext), scenario,
                                     label: "kmsd audit off Encrypt, 20-statement policy") { LoadDriver.processCPUNanos(pid: quietPID) }
        guard let defaultPolicy = results.first(where: { !$0.audit && $0.operation == "Encrypt" && $0.scenario == scenario.name }) else {
            throw BenchError("internal error: no audit-off Encrypt result")
        }
        let policy = PolicyReport(inProcess: inProcess, scenario: scenario.name,
                                  defaultPolicy: defaultPolicy.kmsd, twentyStatementPolicy: TargetFigures(withPolicy))

        let envelope = try EnvelopeBench.run(socket: daemons[0].process.socketPath, keyID: daemons[0].key,
                                             kmsctl: try kmsctl ?? Self.sibling("kmsctl"), work: work.path, seconds: duration)

        let report = BenchReport(
            environment: .current(duration: duration, warmup: warmup, rounds: max(1, rounds),
                                  plaintextBytes: Self.plaintext.count, requestFrameBytes: sampleFrame.count),
            echo: echoResults, kmsd: results, crypto: crypto, journald: ingest, policy: policy)
        print(report.markdown())
        print(envelope.markdown())
        if json {
            print("")
            print(try report.json())
            print(String(decoding: try JSONEncoder().encode(envelope), as: UTF8.self))
        }
    }

    /// One target in one scenario, in `--rounds` rounds back to back (the fastest gives every
    /// figure, for kmsd and the echo server alike: on a virtual machine whose speed comes and
    /// goes, one slow moment would otherwise decide a figure).
    private func measure<Target: BenchTarget>(_ target: Target, _ scenario: Scenario, label: String? = nil,
                                              cpuNanos: (@Sendable () -> UInt64?)? = nil) throws -> LoadResult {
        try measureInterleaved([Slot(label: label ?? target.name, scenario: scenario) { warmup, duration in
            try LoadDriver.run(target: target, scenario: scenario, warmup: warmup, duration: duration, cpuNanos: cpuNanos)
        }])[0]
    }

    /// One target in one scenario: `run(warmup, duration)` measures one round of it. `kmsd`
    /// names the daemon and operation of a kmsd run (nil: the echo server, or a run of its own).
    struct Slot {
        let label: String
        let scenario: Scenario
        var kmsd: (audit: Bool, operation: BenchOperation)? = nil
        let run: (_ warmup: Double, _ duration: Double) throws -> LoadResult
    }

    /// Measures every slot in `--rounds` rounds of duration / rounds each, interleaved: round 1
    /// of every slot, then round 2 of every slot, and so on. Each slot's fastest round (the most
    /// operations per second) gives all its figures. The first round of each follows the full
    /// warm-up; later ones a short one (longer after another target's traffic than after a
    /// round of the same target).
    private func measureInterleaved(_ slots: [Slot]) throws -> [LoadResult] {
        let rounds = max(1, self.rounds)
        let each = duration / Double(rounds)
        var best = [LoadResult?](repeating: nil, count: slots.count)
        for round in 0..<rounds {
            let warm = round == 0 ? warmup : min(warmup, slots.count == 1 ? 0.2 : 0.5)
            for (i, slot) in slots.enumerated() {
                let r = try slot.run(warm, each)
                progress("\(slot.label): \(slot.scenario.name), round \(round + 1) of \(rounds) (\(Self.seconds(warm)) s warm-up + \(Self.seconds(each)) s): "
                         + String(format: "%.0f ops/s, p50 %.1f µs, p99 %.1f µs", r.opsPerSecond, Double(r.p50Nanos) / 1000, Double(r.p99Nanos) / 1000))
                if best[i] == nil || r.opsPerSecond > best[i]!.opsPerSecond { best[i] = r }
            }
        }
        return best.map { $0! }
    }

    private static func seconds(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(format: "%.2f", value)
    }

    /// `kmsd` in the directory of this executable.
    static func defaultKMSDPath() throws -> String { try sibling("kmsd") }

    /// `name` in the directory of this executable.
    static func sibling(_ name: String) throws -> String {
        var buffer = [CChar](repeating: 0, count: 4097)
        let capacity = buffer.count - 1
        let n = readlink("/proc/self/exe", &buffer, capacity)
        guard n > 0 else {
            throw BenchError("cannot read /proc/self/exe (\(errnoDescription(errno))); pass --kmsd PATH")
        }
        let exe = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent(name).path
    }
}

KMSBench.main()
