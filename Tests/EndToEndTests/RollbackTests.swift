import Foundation
import KMSClient
import KMSProtocol
import Testing

/// An older copy of a row put back into the keystore (authentic, but rolled back) is refused
/// with KeyUnavailableException and audited: rows copied with `sqlite3` from a snapshot of the
/// same keystore taken earlier.
@Suite(.serialized)
final class RollbackTests {
    let daemon: Daemon

    init() throws {
        try Journal.ensureRunning()
        daemon = try Daemon(arguments: ["--dev-day-seconds", "1"])
    }

    deinit { daemon.stop() }

    var keystore: String { daemon.stateDir + "/keystore.sqlite3" }

    func sqlite(_ db: String, _ sql: String) throws {
        let r = try run("/usr/bin/sqlite3", [db, sql])
        #expect(r.status == 0, "sqlite3 \(sql): \(r.stderr)")
    }

    /// Copies the rows `whereClause` selects in `table` from the snapshot over the current ones.
    func restore(_ table: String, _ whereClause: String, from snapshot: String) throws {
        try sqlite(keystore, "ATTACH '\(snapshot)' AS old; DELETE FROM main.\(table) WHERE \(whereClause); INSERT INTO main.\(table) SELECT * FROM old.\(table) WHERE \(whereClause);")
    }

    /// An authentic copy of the keystore as it is now (kmsd stopped for it, then started
    /// again); `client` is reconnected.
    func snapshot(_ name: String, _ client: inout KMSClient) async throws -> String {
        await client.close()
        daemon.stop()
        let path = daemon.stateDir + "-\(name).sqlite3"
        try sqlite(keystore, ".backup '\(path)'")
        try daemon.restart()
        client = daemon.client()
        return path
    }

    func waitUntilDeleted(_ client: KMSClient, _ key: String) async throws {
        for _ in 0..<150 {
            do { _ = try await client.describeKey(keyID: key) } catch let e as KMSError where e.code == .notFound { return }
            try await Task.sleep(for: .milliseconds(100))
        }
        Issue.record("key \(key) was not deleted in time")
    }

    @Test func olderCopiesOfRowsAreRefusedAndAudited() async throws {
        var client = daemon.client()
        let enabled = try await client.createKey(description: "disabled later").keyID
        let target = try await client.createKey(description: "alias target first").keyID
        let other = try await client.createKey(description: "alias target later").keyID
        let doomed = try await client.createKey(description: "deleted later").keyID
        let untouched = try await client.createKey(description: "left alone").keyID
        try await client.createAlias(aliasName: "alias/rollback", targetKeyID: target)
        let doomedBlob = Array(try await client.encrypt(keyID: doomed, plaintext: [1]).ciphertextBlob)
        let untouchedBlob = Array(try await client.encrypt(keyID: untouched, plaintext: [2]).ciphertextBlob)

        // The snapshot: an authentic copy of the keystore as it is now.
        let snapshot = try await snapshot("snapshot", &client)

        // Acknowledged changes after it.
        try await client.disableKey(keyID: enabled)
        try await client.updateAlias(aliasName: "alias/rollback", targetKeyID: other)
        _ = try await client.scheduleKeyDeletion(keyID: doomed, pendingWindowInDays: 7)
        try await waitUntilDeleted(client, doomed)
        await client.close()
        daemon.stop()

        // Put the older rows back: the Enabled record, the alias's old target, and the deleted
        // key's rows (its tombstone removed too, so only the row index can tell).
        try restore("keys", "key_id = '\(enabled)'", from: snapshot)
        try restore("aliases", "alias_name = 'alias/rollback'", from: snapshot)
        try restore("keys", "key_id = '\(doomed)'", from: snapshot)
        try restore("key_versions", "key_id = '\(doomed)'", from: snapshot)
        try sqlite(keystore, "DELETE FROM deleted_keys WHERE key_id = '\(doomed)'")

        try daemon.restart()
        client = daemon.client()
        await expectKMSError(.keyUnavailable) { try await client.describeKey(keyID: enabled) }
        await expectKMSError(.keyUnavailable) { try await client.encrypt(keyID: enabled, plaintext: [3]) }
        await expectKMSError(.keyUnavailable) { try await client.encrypt(keyID: "alias/rollback", plaintext: [3]) }
        await expectKMSError(.keyUnavailable) { try await client.decrypt(ciphertextBlob: doomedBlob) }
        await expectKMSError(.keyUnavailable) { try await client.describeKey(keyID: doomed) }
        // Everything else keeps working.
        #expect(Array(try await client.decrypt(ciphertextBlob: untouchedBlob).plaintext) == [2])
        #expect(try await client.describeKey(keyID: other).keyState == "Enabled")
        _ = try await client.encrypt(keyID: other, plaintext: [4])

        // Audited: each refused request has its record with the error.
        let refused = try Journal.query(["_PID=\(daemon.pid)", "MESSAGE_ID=\(JournalIDs.request)", "KMS_ERROR=KeyUnavailableException"],
                                        since: daemon.startedAt, atLeast: 5)
        #expect(refused.count >= 5, "\(refused.count) refused requests audited")
        #expect(Set(refused.compactMap { $0["KMS_KEY_ID"] as? String }).isSuperset(of: [enabled, doomed]))
        #expect(refused.contains { $0["KMS_ALIAS"] as? String == "alias/rollback" })
        await client.close()
    }

    @Test func anIndexEntryCopiedBackWithItsRowIsCaughtAtStart() async throws {
        var client = daemon.client()
        let key = try await client.createKey(description: "rolled back with its index entry").keyID
        let snapshot = try await snapshot("snapshot2", &client)
        try await client.disableKey(keyID: key)
        await client.close()
        daemon.stop()

        // The row and its index entry both put back: the row index no longer matches its
        // authenticated digest.
        try restore("keys", "key_id = '\(key)'", from: snapshot)
        try restore("row_index", "tbl = 'keys' AND row_key = '\(key)'", from: snapshot)
        try daemon.restart()
        client = daemon.client()
        // The alarm raised at start is counted (Status, kmsd_alarms_total) before any request.
        #expect(try await client.status().alarms["IntegrityFailure"] == 1)
        await expectKMSError(.keyUnavailable) { try await client.describeKey(keyID: key) }
        #expect(daemon.log.contains("keystore rollback detected"), "\(daemon.log.suffix(600))")
        let events = try Journal.records(pid: daemon.pid, since: daemon.startedAt, atLeast: 1)
        #expect(events.contains { $0["KMS_ACTION"] as? String == "KeystoreRollbackDetected" && $0["PRIORITY"] as? String == "3" })
        // Keys written after the detection are trusted, wherever they fall; suspicion of the
        // old rows survives restarts although the digest has been rewritten since.
        var fresh: [String] = []
        for _ in 0..<20 { fresh.append(try await client.createKey().keyID) }
        await client.close()
        try daemon.restart()
        client = daemon.client()
        await expectKMSError(.keyUnavailable) { try await client.describeKey(keyID: key) }
        for k in fresh { _ = try await client.encrypt(keyID: k, plaintext: [1]) }
        await client.close()
    }
}
