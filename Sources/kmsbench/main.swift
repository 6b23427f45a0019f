import ArgumentParser
import Foundation
import Glibc
import KMSProtocol

/// kmsbench: measures kmsd Encrypt against a raw Unix-socket echo baseline, in one invocation.
struct KMSBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kmsbench",
        abstract: "Benchmark kmsd Encrypt (64-byte plaintext) against a raw Unix-socket echo server.",
        discussion: """
        Starts its own kmsd (--dev, state and socket in the work directory), creates a key, and runs \
        three scenarios against both kmsd and an in-process echo server that sends back every \
        4-byte-length frame unchanged: 1 connection with 1 request in flight, 8 connections with 1 \
        each, and 1 connection with 32 in flight. Both targets get the same client, the same \
        concurrency and frames of the same bytes. Prints ops/s, p50 and p99 latency, and each kmsd \
        figure as a ratio to its echo figure. Must run as a kmsd administrator (root by default).
        """
    )

    static let plaintext: [UInt8] = (0..<64).map { UInt8($0) }

    @Option(name: .long, help: ArgumentHelp("kmsd binary to start. Default: kmsd next to kmsbench.", valueName: "path"))
    var kmsd: String?

    @Option(name: .long, help: ArgumentHelp("Measured seconds per scenario and target.", valueName: "seconds"))
    var duration: Double = 5

    @Option(name: .long, help: ArgumentHelp("Unmeasured seconds before each measurement.", valueName: "seconds"))
    var warmup: Double = 1

    @Flag(name: .customLong("policy-only"), help: "Only measure the access decision in process (no kmsd, no echo server).")
    var policyOnly = false

    @Flag(name: .long, help: "Also print the results as one line of JSON after the table.")
    var json = false

    @Option(name: .customLong("work-dir"), help: ArgumentHelp("Directory for kmsd's state, the sockets and kmsd.log. Default: a fresh directory under /tmp, removed at the end (a given directory is kept).", valueName: "dir"))
    var workDir: String?

    @Option(name: .customLong("kmsd-arg"), parsing: .unconditionalSingleValue, help: ArgumentHelp("Extra argument for kmsd, e.g. --kmsd-arg=--allow-unlocked-memory. Repeatable.", valueName: "arg"))
    var kmsdArguments: [String] = []

    func validate() throws {
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
        if policyOnly {
            let r = try PolicyBench.measure()
            print(String(format: "Access decision (KeyService.decide, in process): default policy %.0f ns, %d-statement policy %.0f ns per request",
                         r.defaultPolicyNanos, r.statements, r.twentyStatementNanos))
            return
        }
        let work = try WorkDirectory(requested: workDir)
        defer { work.remove() }
        _ = try UnixSocket.address(work.path + "/kmsd.sock")  // fail early if the path is too long

        let executable = try kmsd ?? Self.defaultKMSDPath()
        let daemon = KMSDProcess(executable: executable, workDirectory: work.path, extraArguments: kmsdArguments)
        defer {
            progress("stopping kmsd")
            if let status = daemon.stop(), status != 0 {
                progress("kmsd exited with status \(status)")
            }
        }

        progress("starting \(daemon.executable) (work directory \(work.path))")
        try daemon.start()
        try daemon.waitUntilListening(timeoutSeconds: 30)
        let keyID = try daemon.createKey()

        let operationBytes = try RequestFrames.operationBytes(keyID: keyID, plaintext: Self.plaintext)
        try RequestFrames.check(keyID: keyID, plaintext: Self.plaintext, operationBytes: operationBytes)
        let kmsdTarget = KMSDTarget(socketPath: daemon.socketPath, operationBytes: operationBytes)
        var sampleFrame: [UInt8] = []
        kmsdTarget.makeFrame(id: RequestFrames.firstID, into: &sampleFrame)

        let echo = try EchoServer(path: work.path + "/echo.sock")
        echo.start()
        defer { echo.stop() }
        let echoTarget = EchoTarget(socketPath: echo.path, payloadFrame: sampleFrame)

        var results: [ScenarioResult] = []
        for scenario in Scenario.all {
            let echoResult = try measure(echoTarget, scenario)
            let kmsdResult: LoadResult
            do {
                let pid = daemon.pid
                kmsdResult = try measure(kmsdTarget, scenario) { LoadDriver.processCPUNanos(pid: pid) }
            } catch {
                throw BenchError("\(error)\n\(daemon.logExcerpt())")
            }
            results.append(ScenarioResult(scenario: scenario, echo: echoResult, kmsd: kmsdResult))
        }

        // The access decision: in process (precise), then end to end with a key whose policy has
        // 20 statements against the default-policy key above, same scenario, same run.
        progress("policy evaluation: default policy and a 20-statement policy, in process")
        let inProcess = try PolicyBench.measure()
        let policyKey = try daemon.createKey()
        try daemon.putKeyPolicy(keyID: policyKey, policy: PolicyBench.twentyStatements(uid: getuid()))
        let policyTarget = KMSDTarget(socketPath: daemon.socketPath,
                                      operationBytes: try RequestFrames.operationBytes(keyID: policyKey, plaintext: Self.plaintext))
        let scenario = Scenario.all[2]
        let pid = daemon.pid
        let withPolicy = try measure(policyTarget, scenario) { LoadDriver.processCPUNanos(pid: pid) }
        let policy = PolicyReport(inProcess: inProcess, scenario: scenario.name,
                                  defaultPolicy: results[2].kmsd, twentyStatementPolicy: TargetFigures(withPolicy))

        // The audit's cost: the same scenario against a kmsd whose records go to a sink that
        // drops them (no journald), and journald's own ingest rate for records like kmsd's.
        progress("audit records to a null sink instead of journald")
        let sink = try NullAuditSink(path: work.path + "/audit-sink.sock")
        sink.start()
        defer { sink.stop() }
        let quietDir = work.path + "/no-journald"
        mkdir(quietDir, 0o700)
        let quiet = KMSDProcess(executable: executable, workDirectory: quietDir, extraArguments: kmsdArguments + ["--dev-audit-socket", sink.path])
        try quiet.start()
        defer { quiet.stop() }
        try quiet.waitUntilListening(timeoutSeconds: 30)
        let quietTarget = KMSDTarget(socketPath: quiet.socketPath,
                                     operationBytes: try RequestFrames.operationBytes(keyID: try quiet.createKey(), plaintext: Self.plaintext))
        let quietPID = quiet.pid
        let withoutJournald = try measure(quietTarget, scenario) { LoadDriver.processCPUNanos(pid: quietPID) }
        progress("journald's ingest rate for records like kmsd's (\(Self.seconds(duration)) s)")
        let ingest = try JournaldIngest.measure(seconds: duration)
        let audit = AuditCostReport(scenario: scenario.name, withJournald: results[2].kmsd, withoutJournald: TargetFigures(withoutJournald),
                                    sinkRecords: sink.records, journald: ingest)

        let report = BenchReport(
            environment: .current(duration: duration, warmup: warmup,
                                  plaintextBytes: Self.plaintext.count, requestFrameBytes: sampleFrame.count),
            scenarios: results, policy: policy, audit: audit)
        print(report.markdown())
        if json {
            print("")
            print(try report.json())
        }
    }

    private func measure<Target: BenchTarget>(_ target: Target, _ scenario: Scenario,
                                              cpuNanos: (@Sendable () -> UInt64?)? = nil) throws -> LoadResult {
        progress("\(target.name): \(scenario.name) (\(Self.seconds(warmup)) s warm-up + \(Self.seconds(duration)) s)")
        let r = try LoadDriver.run(target: target, scenario: scenario, warmup: warmup, duration: duration, cpuNanos: cpuNanos)
        progress(String(format: "  %.0f ops/s, p50 %.1f µs, p99 %.1f µs",
                        r.opsPerSecond, Double(r.p50Nanos) / 1000, Double(r.p99Nanos) / 1000))
        return r
    }

    private static func seconds(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(value)
    }

    /// `kmsd` in the directory of this executable.
    static func defaultKMSDPath() throws -> String {
        var buffer = [CChar](repeating: 0, count: 4097)
        let capacity = buffer.count - 1
        let n = readlink("/proc/self/exe", &buffer, capacity)
        guard n > 0 else {
            throw BenchError("cannot read /proc/self/exe (\(errnoDescription(errno))); pass --kmsd PATH")
        }
        let exe = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("kmsd").path
    }
}

KMSBench.main()
