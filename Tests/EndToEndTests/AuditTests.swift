import Foundation
import KMSClient
import KMSCrypto
import Testing

/// Every request leaves one journald record, read back with `journalctl -o json`; no secret
/// reaches it.
@Suite(.serialized, .enabled(if: isRoot, "needs root to start a private journald and to read every record back"))
struct AuditTests {
    @Test func everyRequestIsAuditedWithoutSecrets() async throws {
        try Journal.ensureRunning()
        let daemon = try Daemon(auditFailClosed: true)
        defer { daemon.stop() }
        let client = daemon.client()
        let key = try await client.createKey(description: "audited")
        let plaintext = Array("TOP-SECRET-PLAINTEXT-0123456789".utf8)
        let enc = try await client.encrypt(keyID: key.keyID, plaintext: plaintext, context: ["tenant": "sensitive-value"])
        let dec = try await client.decrypt(ciphertextBlob: Array(enc.ciphertextBlob), context: ["tenant": "sensitive-value"])
        #expect(Array(dec.plaintext) == plaintext)
        let dk = try await client.generateDataKey(keyID: key.keyID, keySpec: "AES_256")
        await expectKMSError(.invalidCiphertext) { try await client.decrypt(ciphertextBlob: Array(enc.ciphertextBlob)) }
        await expectKMSError(.notFound) { try await client.describeKey(keyID: UUID().uuidString) }
        // A secret pasted where a key id belongs never reaches the journal.
        await expectKMSError(.notFound) { try await client.describeKey(keyID: "pasted-password-hunter2") }
        let expected = 7

        // Request records only (kmsd's own events have their own MESSAGE_ID).
        let records = try Journal.query(["_PID=\(daemon.pid)", "MESSAGE_ID=\(JournalIDs.request)"], since: daemon.startedAt, atLeast: expected)
        #expect(records.count == expected, "one record per request")
        let byAction = Dictionary(grouping: records) { $0["KMS_ACTION"] as? String ?? "" }
        #expect(byAction["CreateKey"]?.count == 1 && byAction["Encrypt"]?.count == 1 && byAction["Decrypt"]?.count == 2)
        for r in records {
            #expect(r["SYSLOG_IDENTIFIER"] as? String == "kmsd")
            #expect(r["MESSAGE_ID"] as? String == JournalIDs.request)
            #expect(r["KMS_PEER_UID"] as? String == "0")
            #expect(r["KMS_PEER_PID"] as? String != nil && r["KMS_REQUEST_ID"] as? String != nil)
            for field in ["KMS_RESULT", "KMS_ERROR", "KMS_KEY_ID", "KMS_DURATION_US", "MESSAGE", "PRIORITY"] {
                #expect(r[field] != nil, "\(field) missing")
            }
        }
        let encrypt = try #require(byAction["Encrypt"]?.first)
        #expect(encrypt["KMS_RESULT"] as? String == "Allowed")
        #expect(encrypt["KMS_KEY_ID"] as? String == key.keyID)
        #expect(encrypt["KMS_KEY_VERSION"] as? String == "1")
        #expect(encrypt["KMS_ENCRYPTION_CONTEXT"] as? String == "tenant")
        #expect(encrypt["PRIORITY"] as? String == "6", "allowed: info")
        let failed = try #require(byAction["Decrypt"]?.first { $0["KMS_RESULT"] as? String == "Failed" })
        #expect(failed["KMS_ERROR"] as? String == "InvalidCiphertextException")
        #expect(failed["PRIORITY"] as? String == "3")
        #expect(byAction["DescribeKey"]?.allSatisfy { $0["KMS_ERROR"] as? String == "NotFoundException" } == true)
        #expect(byAction["DescribeKey"]?.contains { $0["KMS_KEY_ID"] as? String == "invalid" } == true)

        // No plaintext, data key, context value or ciphertext in any form anywhere in the records.
        let everything = try run("/usr/bin/journalctl", ["-o", "export", "--no-pager", "_PID=\(daemon.pid)",
                                                         "--since", "@\(Int(daemon.startedAt.timeIntervalSince1970))"]).stdout
        let secrets: [Data] = [Data(plaintext), Data(plaintext).base64EncodedData(), dk.plaintext, dk.plaintext.base64EncodedData(),
                               Data("sensitive-value".utf8), enc.ciphertextBlob.suffix(40), enc.ciphertextBlob.base64EncodedData().prefix(40),
                               Data(dk.plaintext.map { String(format: "%02x", $0) }.joined().utf8), Data("hunter2".utf8)]
        for s in secrets { #expect(everything.range(of: s) == nil, "a secret reached the journal") }
    }

    @Test(.enabled(if: isRoot, "needs root to act as another user"))
    func deniedRequestsAreAuditedAsDenied() async throws {
        try Journal.ensureRunning()
        let daemon = try Daemon(auditFailClosed: true)
        defer { daemon.stop() }
        let key = try await daemon.client().createKey()
        let r = try runAs(uid: 64103, [Paths.kmsctl, "describe-key", "--key-id", key.keyID], env: ["KMSD_SOCKET": daemon.socket])
        #expect(r.stderr.contains("AccessDeniedException"))
        let records = try Journal.records(pid: daemon.pid, since: daemon.startedAt, atLeast: 2)
        let denied = try #require(records.first { $0["KMS_ACTION"] as? String == "DescribeKey" })
        #expect(denied["KMS_RESULT"] as? String == "Denied")
        #expect(denied["PRIORITY"] as? String == "4", "denied: warning")
        #expect(denied["KMS_PEER_UID"] as? String == "64103")
        #expect(denied["KMS_ERROR"] as? String == "AccessDeniedException")
        #expect(denied["KMS_KEY_ID"] as? String == key.keyID)
    }

    @Test(.enabled(if: isRoot, "needs root for a private mount namespace"))
    func withoutJournaldRequestsFailClosedAndChangeNothing() async throws {
        // Hide the journal socket from one kmsd with a private mount namespace.
        let dir = try Paths.tempDir("noaudit")
        let script = "mkdir -p /run/systemd/journal && mount -t tmpfs tmpfs /run/systemd/journal && exec \(Paths.kmsd) --dev --state-dir \(dir)/s --audit-fail-closed true"
        let log = dir + "/log"
        let p = try launchKMSD("/usr/bin/unshare", ["-m", "--propagation", "private", "/bin/sh", "-c", script], log: log)
        let client = KMSClient(socketPath: dir + "/s/kmsd.sock")
        await expectKMSError(.auditUnavailable) { try await client.createKey() }
        await expectKMSError(.auditUnavailable) { try await client.createKey(description: "second") }
        await expectKMSError(.auditUnavailable) { try await client.generateRandom(numberOfBytes: 8) }
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect((try? String(contentsOfFile: log, encoding: .utf8))?.contains("journald did not take an audit record") == true)
        // The refused CreateKeys left nothing behind: the same keystore, audited, holds no key.
        try Journal.ensureRunning()
        let daemon = try Daemon(stateDir: dir + "/s")
        defer { daemon.stop() }
        let keys = try await daemon.client().listKeys(limit: 100)
        #expect(keys.keys.isEmpty, "a CreateKey refused for want of audit must not leave a key")
    }

    /// A flood over the rate limit: each throttled request is answered, the first of each second
    /// is recorded on its own and the rest are counted in one summary, and the counts add up.
    @Test func throttledRequestsAreSummarisedNotRecordedOneByOne() throws {
        try Journal.ensureRunning()
        let daemon = try Daemon(arguments: ["--max-requests-per-second-per-uid", "10", "--request-burst-per-uid", "10"])
        defer { daemon.stop() }
        let raw = try RawConnection(path: daemon.socket)
        let total = 200
        for id in 1...total { try raw.send(.with(id: UInt64(id), .generateRandom(.with { $0.numberOfBytes = 4 }))) }
        var throttled = 0
        for _ in 1...total where try raw.receive()?.kmsError?.code == .throttling { throttled += 1 }
        #expect(throttled >= total - 30, "most of the flood is over the rate (\(throttled) throttled)")
        sleep(3)  // the summary timer runs once a second
        let records = try Journal.records(pid: daemon.pid, since: daemon.startedAt, atLeast: 2)
        let individual = records.filter { $0["KMS_ACTION"] as? String == "GenerateRandom" && $0["KMS_ERROR"] as? String == "ThrottlingException" }
        let summaries = records.filter { $0["KMS_ACTION"] as? String == "ThrottledRequests" }
        let summarised = summaries.compactMap { ($0["KMS_THROTTLED_COUNT"] as? String).flatMap(Int.init) }.reduce(0, +)
        #expect(!summaries.isEmpty)
        #expect(individual.count <= 3, "one record on its own per uid per second, not \(individual.count)")
        #expect(individual.count + summarised == throttled, "every throttled request is accounted for")
        #expect(summaries.allSatisfy { $0["KMS_PEER_UID"] as? String == "\(getuid())" && $0["KMS_ERROR"] as? String == "ThrottlingException" })
    }

    /// A lifecycle change whose record journald does not take is undone: the key is as it was.
    @Test(.enabled(if: isRoot, "needs root for a private mount namespace"))
    func lifecycleChangesRefusedForWantOfAuditChangeNothing() async throws {
        try Journal.ensureRunning()
        let dir = try Paths.tempDir("noaudit-lifecycle")
        let first = try Daemon(stateDir: dir + "/s")
        let key = try await first.client().createKey(description: "before").keyID
        // An imported key, to see DeleteImportedKeyMaterial refused (it cannot be undone, so it
        // is refused before it changes anything, as is RotateKeyOnDemand).
        let imported = try await first.client().createKey(origin: "EXTERNAL").keyID
        let p = try await first.client().getParametersForImport(keyID: imported, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_2048")
        let wrapped = try [UInt8](repeating: 0x5a, count: 32).withUnsafeBytes { try RSAPublicKey(der: Array(p.publicKey)).encryptOAEP($0, digest: .sha256) }
        try await first.client().importKeyMaterial(keyID: imported, importToken: Array(p.importToken), encryptedKeyMaterial: wrapped,
                                                   expirationModel: "KEY_MATERIAL_DOES_NOT_EXPIRE")
        first.stop()
        let script = "mkdir -p /run/systemd/journal && mount -t tmpfs tmpfs /run/systemd/journal && exec \(Paths.kmsd) --dev --state-dir \(dir)/s --audit-fail-closed true"
        let daemon = try launchKMSD("/usr/bin/unshare", ["-m", "--propagation", "private", "/bin/sh", "-c", script], log: dir + "/log")
        let blind = KMSClient(socketPath: dir + "/s/kmsd.sock")
        await expectKMSError(.auditUnavailable) { try await blind.disableKey(keyID: key) }
        await expectKMSError(.auditUnavailable) { try await blind.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 7) }
        await expectKMSError(.auditUnavailable) { try await blind.updateKeyDescription(keyID: key, description: "after") }
        await expectKMSError(.auditUnavailable) { _ = try await blind.rotateKeyOnDemand(keyID: key) }
        await expectKMSError(.auditUnavailable) { try await blind.deleteImportedKeyMaterial(keyID: imported) }
        kill(daemon.processIdentifier, SIGTERM)
        daemon.waitUntilExit()
        let again = try Daemon(stateDir: dir + "/s")
        defer { again.stop() }
        let m = try await again.client().describeKey(keyID: key)
        #expect(m.keyState == "Enabled" && m.description_p == "before" && m.currentKeyVersion == 1, "\(m)")
        #expect(try await again.client().describeKey(keyID: imported).keyState == "Enabled")
    }

    /// A scheduled deletion leaves a record of its own, with the events MESSAGE_ID.
    @Test func aScheduledDeletionIsAudited() async throws {
        try Journal.ensureRunning()
        let daemon = try Daemon(arguments: ["--dev-day-seconds", "1"], auditFailClosed: true)
        defer { daemon.stop() }
        let client = daemon.client()
        let key = try await client.createKey().keyID
        _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 7)
        let records = try Journal.query(["_PID=\(daemon.pid)", "KMS_ACTION=KeyDeleted"], since: daemon.startedAt, atLeast: 1, timeout: 20)
        let event = try #require(records.first)
        #expect(event["KMS_KEY_ID"] as? String == key)
        #expect(event["MESSAGE_ID"] as? String == JournalIDs.event)
        let scheduled = try Journal.query(["_PID=\(daemon.pid)", "KMS_ACTION=ScheduleKeyDeletion"], since: daemon.startedAt, atLeast: 1)
        #expect(scheduled.first?["KMS_KEY_ID"] as? String == key && scheduled.first?["KMS_RESULT"] as? String == "Allowed")
    }

    /// Changes to keys, policies, grants and aliases also leave a NOTICE event of their own,
    /// naming who made them; reads and refused changes do not.
    @Test func managementChangesAreEventsAtNotice() async throws {
        try Journal.ensureRunning()
        let daemon = try Daemon(auditFailClosed: true)
        defer { daemon.stop() }
        let client = daemon.client()
        let key = try await client.createKey().keyID
        try await client.disableKey(keyID: key)
        try await client.putKeyPolicy(keyID: key, policy: try await client.getKeyPolicy(keyID: key))
        _ = try await client.createGrant(keyID: key, granteePrincipal: "uid:64201", operations: ["Encrypt"])
        _ = try await client.describeKey(keyID: key)
        await expectKMSError(.invalidState) { try await client.cancelKeyDeletion(keyID: key) }
        _ = try Journal.query(["_PID=\(daemon.pid)", "MESSAGE_ID=\(JournalIDs.event)"], since: daemon.startedAt, atLeast: 5)
        // Waits a little longer for a sixth, which must not come (reads and refusals are no events).
        let events = try Journal.query(["_PID=\(daemon.pid)", "MESSAGE_ID=\(JournalIDs.event)"], since: daemon.startedAt, atLeast: 6, timeout: 1.5)
        let actions = events.compactMap { $0["KMS_ACTION"] as? String }
        #expect(actions == ["KmsdStarted", "KeyCreated", "KeyDisabled", "KeyPolicyChanged", "GrantCreated"], "\(actions)")
        for e in events.dropFirst() {
            #expect(e["PRIORITY"] as? String == "5" && e["KMS_KEY_ID"] as? String == key && e["KMS_PEER_UID"] as? String == String(getuid()))
            #expect((e["MESSAGE"] as? String)?.contains("by uid \(getuid())") == true)
        }
        #expect(events.last?["KMS_GRANT_ID"] as? String != nil)

        // The rest of the lifecycle: rotated, scheduled for deletion, a grant revoked, stopped.
        let other = try await client.createKey().keyID
        _ = try await client.rotateKeyOnDemand(keyID: other)
        _ = try await client.scheduleKeyDeletion(keyID: other, pendingWindowInDays: 7)
        let grant = try #require(events.last?["KMS_GRANT_ID"] as? String)
        try await client.revokeGrant(keyID: key, grantID: grant)
        await client.close()
        let pid = daemon.pid, startedAt = daemon.startedAt
        daemon.stop()
        let more = try Journal.query(["_PID=\(pid)", "MESSAGE_ID=\(JournalIDs.event)"], since: startedAt, atLeast: 10)
        let all = more.compactMap { $0["KMS_ACTION"] as? String }
        #expect(Array(all.dropFirst(5)) == ["KeyCreated", "KeyRotated", "KeyDeletionScheduled", "GrantRevoked", "KmsdStopped"], "\(all)")
        for e in more.dropFirst(5) { #expect(e["PRIORITY"] as? String == "5", "\(e["KMS_ACTION"] ?? "")") }
        #expect(more.first { $0["KMS_ACTION"] as? String == "KeyRotated" }?["KMS_KEY_VERSION"] as? String == "2")
        #expect(more.first { $0["KMS_ACTION"] as? String == "GrantRevoked" }?["KMS_GRANT_ID"] as? String == grant)
    }

    /// Encryption-context values stay out of audit records unless the key's policy opts in.
    @Test func contextValuesOnlyWhereThePolicyOptsIn() async throws {
        try Journal.ensureRunning()
        let daemon = try Daemon(auditFailClosed: true)
        defer { daemon.stop() }
        let client = daemon.client()
        let plain = try await client.createKey().keyID
        let policy = #"{"Version": "2012-10-17", "AuditEncryptionContext": "KeysAndValues", "Statement": [{"Sid": "Admins", "Effect": "Allow", "Principal": {"Role": "Administrators"}, "Action": "kms:*", "Resource": "*"}]}"#
        let open = try await client.createKey(policy: policy).keyID
        for key in [plain, open] { _ = try await client.encrypt(keyID: key, plaintext: [1], context: ["dept": "payroll", "a=b": "c,d"]) }
        let records = try Journal.query(["_PID=\(daemon.pid)", "KMS_ACTION=Encrypt"], since: daemon.startedAt, atLeast: 2)
        #expect(records.first { $0["KMS_KEY_ID"] as? String == plain }?["KMS_ENCRYPTION_CONTEXT"] as? String == "a=b,dept")
        #expect(records.first { $0["KMS_KEY_ID"] as? String == open }?["KMS_ENCRYPTION_CONTEXT"] as? String == #"a\=b=c\,d,dept=payroll"#)
        await expectKMSError(.validation) {
            _ = try await client.createKey(policy: policy.replacingOccurrences(of: "KeysAndValues", with: "Everything"))
        }
    }

    /// A request that names a key by alias is audited with both: the alias and the key it meant.
    @Test func requestsByAliasRecordTheAliasAndTheKey() async throws {
        try Journal.ensureRunning()
        let daemon = try Daemon(auditFailClosed: true)
        defer { daemon.stop() }
        let client = daemon.client()
        let key = try await client.createKey().keyID
        try await client.createAlias(aliasName: "alias/audited", targetKeyID: key)
        _ = try await client.encrypt(keyID: "alias/audited", plaintext: [1])
        await expectKMSError(.notFound) { try await client.encrypt(keyID: "alias/missing", plaintext: [1]) }
        let records = try Journal.query(["_PID=\(daemon.pid)", "KMS_ACTION=Encrypt"], since: daemon.startedAt, atLeast: 2)
        let ok = try #require(records.first { $0["KMS_RESULT"] as? String == "Allowed" })
        #expect(ok["KMS_ALIAS"] as? String == "alias/audited" && ok["KMS_KEY_ID"] as? String == key)
        let missing = try #require(records.first { $0["KMS_ERROR"] as? String == "NotFoundException" })
        #expect(missing["KMS_ALIAS"] as? String == "alias/missing" && missing["KMS_KEY_ID"] as? String == "")
        let created = try Journal.query(["_PID=\(daemon.pid)", "KMS_ACTION=CreateAlias"], since: daemon.startedAt, atLeast: 1)
        #expect(created.first?["KMS_ALIAS"] as? String == "alias/audited" && created.first?["KMS_KEY_ID"] as? String == key)
    }
}
