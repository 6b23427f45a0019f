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
}
