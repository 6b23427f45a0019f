import Foundation
import Glibc
import KMSClient
import KMSCrypto
import KMSProtocol
import Testing

/// kmsctl audit: filters by key (id or alias), caller and result; --json with AWS-style names;
/// --follow; and the per-key, per-caller report.
@Suite(.serialized, .enabled(if: isRoot, "needs root for another uid and the journal"))
final class AuditQueryTests {
    let daemon: Daemon
    init() throws {
        try Journal.ensureRunning()
        daemon = try Daemon()
    }
    deinit { daemon.stop() }

    func kmsctl(_ args: [String]) throws -> ProcessResult { try run(Paths.kmsctl, args, env: ["KMSD_SOCKET": daemon.socket]) }

    func lines(_ r: ProcessResult) -> [[String: Any]] {
        r.text.split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
    }

    @Test func queryFiltersAndReports() async throws {
        // From now on (fractional seconds): no record of an earlier test's daemon counts.
        let since = String(format: "@%.6f", Date().timeIntervalSince1970)
        let c = daemon.client()
        let key = try await c.createKey().keyID
        let other = try await c.createKey().keyID
        try await c.createAlias(aliasName: "alias/queried", targetKeyID: key)
        for _ in 0..<2 { _ = try await c.encrypt(keyID: key, plaintext: [1]) }
        _ = try await c.encrypt(keyID: other, plaintext: [1])
        await c.close()
        let denied = try runAs(uid: 64201, [Paths.kmsctl, "encrypt", "--key-id", key], stdin: Data("x".utf8), env: ["KMSD_SOCKET": daemon.socket])
        #expect(denied.stderr.contains("AccessDeniedException"))
        // The seven requests' records (not kmsd's own events) are in the journal before querying.
        _ = try Journal.query(["_PID=\(daemon.pid)", "MESSAGE_ID=\(JournalIDs.request)"], since: daemon.startedAt, atLeast: 7)

        let byKey = lines(try kmsctl(["audit", "--key-id", key, "--json", "--since", since, "--action", "Encrypt"]))
        #expect(byKey.count == 3 && byKey.allSatisfy { $0["KeyId"] as? String == key && $0["EventName"] as? String == "Encrypt" }, "\(byKey.count)")
        let byAlias = lines(try kmsctl(["audit", "--key-id", "alias/queried", "--json", "--since", since, "--action", "Encrypt"]))
        #expect(byAlias.count == 3, "an alias finds its key's records")
        let bobs = lines(try kmsctl(["audit", "--uid", "64201", "--json", "--since", since]))
        #expect(bobs.count == 1 && bobs[0]["Result"] as? String == "Denied" && bobs[0]["ErrorCode"] as? String == "AccessDeniedException")
        #expect((bobs[0]["UserIdentity"] as? [String: Any])?["Uid"] as? Int == 64201 && bobs[0]["DecidedBy"] as? String == "implicit-deny")
        #expect(lines(try kmsctl(["audit", "--result", "Denied", "--json", "--since", since])).count == 1)
        let table = try kmsctl(["audit", "--key-id", key, "--since", since])
        #expect(table.status == 0 && table.text.contains("Encrypt") && table.text.contains("AccessDeniedException"), "\(table.stderr)")

        // By user name, executable and unit: a copy of kmsctl run as root from a cgroup named
        // like a unit; the other requests came from this test process, in no such unit.
        do {
            let root = try #require(AuditRobustnessTests.cgroup2Root(), "no cgroup2 hierarchy mounted")
            let unit = "kmsd-audit-\(UUID().uuidString.prefix(8).lowercased()).service"
            let cgroup = root + "/" + unit
            try FileManager.default.createDirectory(atPath: cgroup, withIntermediateDirectories: false)
            defer { rmdir(cgroup) }
            let dir = try Paths.tempDir("audit-exe")
            let app = dir + "/report-app"
            try FileManager.default.copyItem(atPath: Paths.kmsctl, toPath: app)
            chmod(app, 0o755)
            let inUnit = try run("/bin/sh", ["-c", "echo $$ > '\(cgroup)/cgroup.procs' && exec '\(app)' describe-key --key-id \(other)"],
                                 env: ["KMSD_SOCKET": daemon.socket])
            #expect(inUnit.status == 0, "\(inUnit.stderr)")
            _ = try Journal.query(["_PID=\(daemon.pid)", "KMS_PEER_UNIT=\(unit)"], since: daemon.startedAt, atLeast: 1)
            let byUnit = lines(try kmsctl(["audit", "--unit", unit, "--json", "--since", since]))
            #expect(byUnit.count == 1 && byUnit.first?["EventName"] as? String == "DescribeKey", "\(byUnit)")
            let byExe = lines(try kmsctl(["audit", "--executable", app, "--json", "--since", since]))
            #expect(byExe.count == 1 && (byExe.first?["UserIdentity"] as? [String: Any])?["Unit"] as? String == unit, "\(byExe)")
            #expect(lines(try kmsctl(["audit", "--unit", "none-such.service", "--json", "--since", since])).isEmpty)
        }
        let rootName = getpwuid(0).map { String(cString: $0.pointee.pw_name) } ?? "root"
        let byUser = lines(try kmsctl(["audit", "--user", rootName, "--json", "--since", since, "--key-id", other]))
        #expect(!byUser.isEmpty && byUser.allSatisfy { ($0["UserIdentity"] as? [String: Any])?["Uid"] as? Int == 0 }, "\(byUser.count)")
        #expect(lines(try kmsctl(["audit", "--user", "no-such-user-\(getpid())", "--json", "--since", since])).isEmpty)

        let report = try kmsctl(["audit", "report", "--since", since, "--json"])
        let r = try #require(try JSONSerialization.jsonObject(with: report.stdout) as? [String: Any], "\(report.stderr)")
        let perKey = try #require(r["ByKey"] as? [String: [String: Int]])
        #expect(perKey[key]?["Encrypt/Allowed"] == 2 && perKey[key]?["Encrypt/Denied"] == 1 && perKey[other]?["Encrypt/Allowed"] == 1)
        let perCaller = try #require(r["ByCaller"] as? [String: [String: Int]])
        #expect(perCaller.first { $0.key.hasPrefix("uid:64201") }?.value["Encrypt/Denied"] == 1)
    }

    /// --since and --until as journalctl takes them (relative, named days, local dates), a
    /// time that cannot be read refused by name, and a caller who cannot read the system
    /// journal told so instead of shown an empty trail.
    @Test func timesAndAccessAsJournalctlHasThem() async throws {
        let c = daemon.client()
        let key = try await c.createKey().keyID
        _ = try await c.encrypt(keyID: key, plaintext: [1])
        await c.close()
        _ = try Journal.query(["_PID=\(daemon.pid)", "KMS_KEY_ID=\(key)", "KMS_ACTION=Encrypt"], since: daemon.startedAt, atLeast: 1)
        func count(_ window: [String]) throws -> Int {
            let r = try kmsctl(["audit", "--key-id", key, "--action", "Encrypt", "--json"] + window)
            #expect(r.status == 0, "\(window): \(r.stderr)")
            return lines(r).count
        }
        let local = DateFormatter()
        local.locale = Locale(identifier: "en_US_POSIX")
        local.dateFormat = "yyyy-MM-dd HH:mm:ss"
        let utc = DateFormatter()
        utc.locale = Locale(identifier: "en_US_POSIX")
        utc.timeZone = TimeZone(identifier: "UTC")
        utc.dateFormat = "yyyy-MM-dd HH:mm"
        let before = Date().addingTimeInterval(-300), after = Date().addingTimeInterval(300)
        for since in ["--since=-5min", "--since=5 minutes ago", "--since=-1h 30min", "--since=today", "--since=yesterday",
                      "--since=\(local.string(from: before))", "--since=\(utc.string(from: before)) UTC",
                      "--until=\(local.string(from: after))", "--until=+5min", "--until=now", "--until=tomorrow"] {
            #expect(try count([since]) == 1, "\(since) includes the record")
        }
        for window in ["--until=-5min", "--until=10 minutes ago", "--until=\(local.string(from: before))", "--since=+5min",
                       "--since=\(utc.string(from: after)) UTC", "--until=yesterday"] {
            #expect(try count([window]) == 0, "\(window) leaves the record out")
        }
        for bad in ["--since=last tuesdayish", "--until=2026-02-31", "--since=25:00", "--since=-5 fortnights"] {
            let r = try kmsctl(["audit", bad])
            #expect(r.status != 0 && r.stderr.contains("cannot read") && r.stdout.isEmpty, "\(bad): \(r.status) \(r.stderr)")
        }
        let outsider = try runAs(uid: 64201, [Paths.kmsctl, "audit", "--since=-5min"], env: ["KMSD_SOCKET": daemon.socket])
        #expect(outsider.status != 0 && outsider.stderr.contains("systemd-journal"), "\(outsider.status) \(outsider.stderr)")
    }

    @Test func followShowsNewRecords() async throws {
        let out = daemon.stateDir + "-follow.json"
        let follower = try ChildProcess(Paths.kmsctl, ["audit", "--follow", "--json", "--action", "GenerateRandom"],
                                        env: ["KMSD_SOCKET": daemon.socket], stdin: "/dev/null", stdout: out, stderr: out + ".err")
        defer { kill(follower.processIdentifier, SIGTERM); _ = follower.waitUntilExit() }
        usleep(500_000)
        let c = daemon.client()
        _ = try await c.generateRandom(numberOfBytes: 8)
        await c.close()
        var seen = ""
        for _ in 0..<50 {
            seen = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
            if seen.contains("GenerateRandom") { break }
            usleep(100_000)
        }
        #expect(seen.contains("\"EventName\":\"GenerateRandom\""), "\(seen)")
    }
}

/// Every request one record, whoever sends it and however it ends; and no secret in any of
/// them, in any encoding, across every operation that carries one.
@Suite(.serialized, .enabled(if: isRoot, "needs root for other uids and the journal"))
final class AuditCompletenessTests {
    @Test func mixedRequestsFromSeveralUidsGiveExactlyOneRecordEach() async throws {
        try Journal.ensureRunning()
        let daemon = try Daemon(auditFailClosed: true)
        defer { daemon.stop() }
        #expect(daemon.log.contains("audit FAILS OPEN") == false, "fail-closed daemons do not warn")
        let c = daemon.client()
        let key = try await c.createKey().keyID                                           // 1
        let plaintext = Array("plaintext-7f3a9c-recognisable".utf8)
        let blob = try await c.encrypt(keyID: key, plaintext: plaintext, context: ["ctx": "value-5e1d"]).ciphertextBlob  // 2
        let dk = try await c.generateDataKey(keyID: key, keySpec: "AES_256")              // 3
        _ = try await c.decrypt(ciphertextBlob: Array(blob), context: ["ctx": "value-5e1d"])  // 4
        let moved = try await c.reEncrypt(ciphertextBlob: Array(blob), sourceContext: ["ctx": "value-5e1d"], destinationKeyID: key)  // 5
        _ = try await c.generateDataKeyWithoutPlaintext(keyID: key, keySpec: "AES_256")   // 6
        let random = try await c.generateRandom(numberOfBytes: 32)                         // 7
        await expectKMSError(.invalidCiphertext) { try await c.decrypt(ciphertextBlob: [1, 2, 3]) }  // 8 failed
        // Imported material and a backup's bytes: secrets too (the backup is wrapped, but its
        // bytes have no business in the journal either).
        let material = try SecureRandom.bytes(32)
        let external = try await c.createKey(origin: "EXTERNAL").keyID                    // 9
        let p = try await c.getParametersForImport(keyID: external, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_2048")  // 10
        let wrapped = try material.withUnsafeBytes { try RSAPublicKey(der: Array(p.publicKey)).encryptOAEP($0, digest: .sha256) }
        try await c.importKeyMaterial(keyID: external, importToken: Array(p.importToken), encryptedKeyMaterial: wrapped,
                                      expirationModel: "KEY_MATERIAL_DOES_NOT_EXPIRE")  // 11
        let backup = try await c.createBackup()                                           // 12
        let chunk = try await c.getBackupChunk(backupID: backup.backupID, offset: 0)     // 13
        #expect(!chunk.data.isEmpty)
        await c.close()
        var expected = 13
        for uid: UInt32 in [64201, 64202] {                                               // 14, 15 denied
            let r = try runAs(uid: uid, [Paths.kmsctl, "encrypt", "--key-id", key], stdin: Data("x".utf8), env: ["KMSD_SOCKET": daemon.socket])
            #expect(r.stderr.contains("AccessDeniedException"))
            expected += 1
        }
        let whoami = try runAs(uid: 64203, [Paths.kmsctl, "whoami"], env: ["KMSD_SOCKET": daemon.socket])  // 16
        #expect(whoami.status == 0)
        expected += 1
        let raw = try RawConnection(path: daemon.socket)                                  // 17: undecodable
        raw.send(RawConnection.frame([0xff, 0xff, 0xff]))
        _ = try raw.receive()
        expected += 1

        let records = try Journal.query(["_PID=\(daemon.pid)", "MESSAGE_ID=\(JournalIDs.request)"], since: daemon.startedAt, atLeast: expected)
        #expect(records.count == expected, "\(records.map { $0["KMS_ACTION"] as? String ?? "?" })")
        #expect(Set(records.compactMap { $0["KMS_PEER_UID"] as? String }) == ["0", "64201", "64202", "64203"])
        #expect(records.filter { $0["KMS_RESULT"] as? String == "Denied" }.count == 2)
        #expect(records.contains { $0["KMS_ACTION"] as? String == "Unknown" && $0["KMS_RESULT"] as? String == "Failed" })
        for r in records {
            for field in ["KMS_ACTION", "KMS_RESULT", "KMS_REQUEST_ID", "KMS_PEER_UID", "KMS_PEER_PID", "KMS_SEQ", "KMS_CHAIN", "KMS_DECIDED_BY"] {
                #expect(r[field] != nil, "\(field) missing in \(r["KMS_ACTION"] ?? "?")")
            }
        }

        // No secret anywhere in what kmsd wrote, raw, hex or base64.
        let export = try run("/usr/bin/journalctl", ["-o", "export", "--no-pager", "_PID=\(daemon.pid)"]).stdout
        var secrets: [[UInt8]] = [plaintext, Array(dk.plaintext), random, Array("value-5e1d".utf8), Array(blob.suffix(32)), Array(moved.ciphertextBlob.suffix(32)),
                                  material, Array(wrapped.suffix(32)), Array(p.importToken.suffix(32)), Array(chunk.data.suffix(32))]
        let rawCount = secrets.count
        secrets += secrets.map { Array($0.map { String(format: "%02x", $0) }.joined().utf8) }
        secrets += secrets.prefix(rawCount).map { Array(Data($0).base64EncodedString().utf8) }
        for s in secrets { #expect(export.range(of: Data(s)) == nil, "a secret reached the journal") }
    }
}
