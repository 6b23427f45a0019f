import Foundation
import Glibc
import KMSClient
import KMSProtocol
import Testing

/// Alarms: each default rule fires once (PRIORITY alert, the alarm MESSAGE_ID, KMS_ALARM),
/// is rate-limited, and is counted in the metrics.
@Suite(.serialized, .enabled(if: isRoot, "needs root for another uid and the journal"))
final class AlarmTests {
    let daemon: Daemon
    static let alarmID = JournalIDs.alarm

    init() throws {
        try Journal.ensureRunning()
        daemon = try Daemon(arguments: ["--alarm-access-denied-per-minute", "3"])
    }

    deinit { daemon.stop() }

    func alarms(_ rule: String, atLeast: Int = 1, timeout: TimeInterval = 5) throws -> [[String: Any]] {
        try Journal.query(["_PID=\(daemon.pid)", "MESSAGE_ID=\(Self.alarmID)", "KMS_ALARM=\(rule)"], since: daemon.startedAt,
                          atLeast: atLeast, timeout: timeout)
    }

    @Test func aDeniedFloodRaisesOneAlarm() async throws {
        let c = daemon.client()
        let key = try await c.createKey().keyID
        await c.close()
        for _ in 0..<8 {
            let r = try runAs(uid: 64201, [Paths.kmsctl, "encrypt", "--key-id", key], stdin: Data("x".utf8), env: ["KMSD_SOCKET": daemon.socket])
            #expect(r.stderr.contains("AccessDeniedException"))
        }
        usleep(500_000)  // let journald take every record before counting
        let fired = try alarms("AccessDeniedRate")
        #expect(fired.count == 1, "rate-limited to one per minute per uid, got \(fired.count)")
        #expect(fired.first?["PRIORITY"] as? String == "1" && fired.first?["KMS_PEER_UID"] as? String == "64201")
        #expect((fired.first?["MESSAGE"] as? String)?.hasPrefix("ALARM AccessDeniedRate") == true)
        // What journalctl -p alert shows, and the metric.
        let alert = try run("/usr/bin/journalctl", ["-p", "alert", "-o", "json", "--no-pager", "_PID=\(daemon.pid)"])
        #expect(alert.text.contains("AccessDeniedRate"))
        let metrics = try run(Paths.kmsctl, ["metrics"], env: ["KMSD_SOCKET": daemon.socket])
        #expect(metrics.text.contains("kmsd_alarms_total{rule=\"AccessDeniedRate\"} 1"), "\(metrics.text)")
    }

    @Test func usingAKeyPendingDeletionRaisesAnAlarm() async throws {
        let c = daemon.client()
        let key = try await c.createKey().keyID
        _ = try await c.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 30)
        for _ in 0..<3 { await expectKMSError(.invalidState) { try await c.encrypt(keyID: key, plaintext: [1]) } }
        await c.close()
        usleep(500_000)
        let fired = try alarms("PendingDeletionKeyUse")
        #expect(fired.count == 1 && fired.first?["KMS_KEY_ID"] as? String == key, "\(fired.count)")
    }

    /// The audit chain's checkpoint altered in the keystore: the next start says
    /// KMS_PREVIOUS_STOP=unknown and raises the IntegrityFailure alarm, counted in Status.
    @Test func anAlteredAuditCheckpointRaisesAnAlarmAtStart() async throws {
        daemon.stop()
        let r = try run("/usr/bin/sqlite3", [daemon.stateDir + "/keystore.sqlite3", "UPDATE meta SET value = zeroblob(length(value)) WHERE name = 'audit_chain'"])
        #expect(r.status == 0, "\(r.stderr)")
        try daemon.restart()
        let fired = try alarms("IntegrityFailure")
        #expect((fired.first?["MESSAGE"] as? String)?.contains("checkpoint") == true, "\(fired)")
        let started = try Journal.query(["_PID=\(daemon.pid)", "KMS_ACTION=KmsdStarted"], since: daemon.startedAt, atLeast: 1)
        #expect(started.first?["KMS_PREVIOUS_STOP"] as? String == "unknown")
        let c = daemon.client()
        #expect(try await c.status().alarms["IntegrityFailure"] == 1)
        await c.close()
    }

    @Test func anIntegrityFailureRaisesAnAlarm() async throws {
        var c = daemon.client()
        let key = try await c.createKey().keyID
        await c.close()
        daemon.stop()
        let r = try run("/usr/bin/sqlite3", [daemon.stateDir + "/keystore.sqlite3", "UPDATE keys SET mac = zeroblob(32) WHERE key_id = '\(key)'"])
        #expect(r.status == 0, "\(r.stderr)")
        try daemon.restart()
        c = daemon.client()
        await expectKMSError(.keyUnavailable) { try await c.describeKey(keyID: key) }
        await c.close()
        let fired = try alarms("IntegrityFailure")
        #expect(fired.first?["KMS_KEY_ID"] as? String == key && fired.first?["PRIORITY"] as? String == "1")
    }

    /// The opt-in rule, from the configuration file: use of a disabled key.
    @Test func usingADisabledKeyRaisesAnAlarmWhenConfigured() async throws {
        let config = daemon.stateDir + "-alarms.json"
        try #"{"alarms": {"disabledKeyUse": true, "accessDeniedPerMinute": 0}}"#.write(toFile: config, atomically: true, encoding: .utf8)
        let configured = try Daemon(arguments: ["--config", config])
        defer { configured.stop() }
        let c = configured.client()
        let key = try await c.createKey().keyID
        try await c.disableKey(keyID: key)
        await expectKMSError(.disabled) { try await c.encrypt(keyID: key, plaintext: [1]) }
        await c.close()
        let fired = try Journal.query(["_PID=\(configured.pid)", "MESSAGE_ID=\(Self.alarmID)", "KMS_ALARM=DisabledKeyUse"],
                                      since: configured.startedAt, atLeast: 1)
        #expect(fired.first?["KMS_KEY_ID"] as? String == key && fired.first?["PRIORITY"] as? String == "1")
        // Off by default: the suite's own daemon raises none for the same thing.
        let d = daemon.client()
        let other = try await d.createKey().keyID
        try await d.disableKey(keyID: other)
        await expectKMSError(.disabled) { try await d.encrypt(keyID: other, plaintext: [1]) }
        await d.close()
        usleep(300_000)
        #expect(try Journal.query(["_PID=\(daemon.pid)", "KMS_ALARM=DisabledKeyUse"], since: daemon.startedAt, atLeast: 1, timeout: 1).isEmpty)
    }

    /// The opt-in rule for a new program decrypting: each executable once per key, remembered
    /// across a restart, and a copy of a known program under another path is new.
    @Test func aNewExecutableDecryptingRaisesAnAlarmOncePerKey() async throws {
        let watched = try Daemon(arguments: ["--alarm-new-decrypt-caller"])
        defer { watched.stop() }
        let c = watched.client()
        let key = try await c.createKey().keyID
        let blob = try await c.encrypt(keyID: key, plaintext: Array("new-caller".utf8)).ciphertextBlob
        for _ in 0..<3 { _ = try await c.decrypt(ciphertextBlob: Array(blob)) }   // this test binary, three times
        await c.close()
        for _ in 0..<2 {                                                             // kmsctl, twice
            let r = try watched.kmsctl(["decrypt"], stdin: Data(blob))
            #expect(r.status == 0 && r.text == "new-caller", "\(r.stderr)")
        }
        usleep(500_000)
        func newCallers(_ d: Daemon, atLeast: Int, timeout: TimeInterval = 5) throws -> [[String: Any]] {
            try Journal.query(["_PID=\(d.pid)", "MESSAGE_ID=\(Self.alarmID)", "KMS_ALARM=NewDecryptCaller"], since: d.startedAt,
                              atLeast: atLeast, timeout: timeout)
                .filter { ($0["MESSAGE"] as? String)?.contains("from executable") == true }
        }
        let first = try newCallers(watched, atLeast: 2)
        let kmsctlPath = URL(fileURLWithPath: Paths.kmsctl).resolvingSymlinksInPath().path
        let selfPath = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        #expect(first.count == 2, "one alarm per new executable, not per request: \(first.map { $0["MESSAGE"] ?? "" })")
        #expect(Set(first.compactMap { $0["KMS_PEER_EXE"] as? String }) == [kmsctlPath, selfPath])
        #expect(first.allSatisfy { $0["PRIORITY"] as? String == "1" && $0["KMS_KEY_ID"] as? String == key })
        let metrics = try watched.kmsctl(["metrics"])
        let counted = metrics.text.split(separator: "\n").first { $0.hasPrefix("kmsd_alarms_total{rule=\"NewDecryptCaller\"} ") }
        #expect((counted?.split(separator: " ").last).flatMap { Int($0) }.map { $0 >= 2 } == true, "\(metrics.text)")

        // After a restart both are known; a copy of kmsctl elsewhere is a new executable.
        try watched.restart()
        #expect(try watched.kmsctl(["decrypt"], stdin: Data(blob)).status == 0)
        let copy = watched.stateDir + "-bin/kmsctl-copy"
        try FileManager.default.createDirectory(atPath: watched.stateDir + "-bin", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: kmsctlPath, toPath: copy)
        #expect(try run(copy, ["decrypt"], stdin: Data(blob), env: ["KMSD_SOCKET": watched.socket]).status == 0)
        let later = try newCallers(watched, atLeast: 1)
        usleep(500_000)
        let settled = try newCallers(watched, atLeast: 2, timeout: 1)
        #expect(later.first?["KMS_PEER_EXE"] as? String == copy && settled.count == 1,
                "only the copy is new after the restart: \(settled.map { $0["KMS_PEER_EXE"] ?? "" })")
        #expect(FileManager.default.fileExists(atPath: watched.stateDir + "/decrypt-callers"))

        // A damaged line costs a warning, not the start.
        watched.stop()
        let f = try #require(FileHandle(forWritingAtPath: watched.stateDir + "/decrypt-callers"))
        f.seekToEndOfFile()
        f.write(Data("not\ta line\n".utf8))
        try f.close()
        try watched.restart()
        #expect(try watched.kmsctl(["decrypt"], stdin: Data(blob)).status == 0)
        #expect(watched.log.contains("skipped 1 damaged line"))
        usleep(500_000)
        #expect(try newCallers(watched, atLeast: 1, timeout: 1).isEmpty, "what was remembered survives a damaged line")
    }
}
