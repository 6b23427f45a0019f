import Foundation
import KMSClient
import KMSCrypto
import KMSProtocol
import Testing

/// Key states as AWS KMS has them: what each operation answers in each state, and a deletion
/// that really happens when its window ends (a "day" is one second here, --dev-day-seconds 1).
@Suite(.serialized)
final class LifecycleTests {
    let daemon: Daemon
    let client: KMSClient

    init() throws {
        daemon = try Daemon(arguments: ["--dev-day-seconds", "1"])
        client = daemon.client()
    }

    deinit { daemon.stop() }

    /// PendingImport is a key created with Origin EXTERNAL that has no material yet; the other
    /// states are of keys whose material kmsd made (Origin AWS_KMS).
    enum State: String, CaseIterable {
        case enabled = "Enabled", disabled = "Disabled", pendingDeletion = "PendingDeletion", pendingImport = "PendingImport"
    }

    /// Every operation that names a key.
    enum Op: String, CaseIterable {
        case encrypt, decrypt, reEncrypt, generateDataKey, generateDataKeyWithoutPlaintext
        case describeKey, enableKey, disableKey, scheduleKeyDeletion, cancelKeyDeletion, updateKeyDescription
        case createAlias, tagResource, untagResource, listResourceTags
        case enableKeyRotation, disableKeyRotation, getKeyRotationStatus, rotateKeyOnDemand, listKeyRotations
        case setMinimumDecryptionVersion
        case getParametersForImport, importKeyMaterial, deleteImportedKeyMaterial
    }

    /// nil: succeeds. As AWS KMS: cryptographic operations need Enabled (Disabled gives
    /// DisabledException, PendingDeletion and PendingImport KMSInvalidStateException); a key
    /// pending deletion can only be looked at or have its deletion cancelled; rotation needs an
    /// Enabled key whose material kmsd made; import operations need Origin EXTERNAL.
    static func expected(_ op: Op, _ state: State) -> KMSErrorCode? {
        switch (op, state) {
        case (.describeKey, _), (.listResourceTags, _), (.getKeyRotationStatus, _), (.listKeyRotations, _): nil
        case (.getParametersForImport, .pendingImport), (.importKeyMaterial, .pendingImport), (.deleteImportedKeyMaterial, .pendingImport): nil
        case (.getParametersForImport, _), (.importKeyMaterial, _), (.deleteImportedKeyMaterial, _): .unsupportedOperation
        case (.enableKeyRotation, .pendingImport), (.disableKeyRotation, .pendingImport), (.rotateKeyOnDemand, .pendingImport): .unsupportedOperation
        case (.encrypt, .disabled), (.decrypt, .disabled), (.reEncrypt, .disabled), (.generateDataKey, .disabled),
             (.generateDataKeyWithoutPlaintext, .disabled), (.enableKeyRotation, .disabled), (.disableKeyRotation, .disabled),
             (.rotateKeyOnDemand, .disabled): .disabled
        case (_, .pendingDeletion): op == .cancelKeyDeletion ? nil : .invalidState
        case (.cancelKeyDeletion, _): .invalidState
        case (.encrypt, .pendingImport), (.decrypt, .pendingImport), (.reEncrypt, .pendingImport), (.generateDataKey, .pendingImport),
             (.generateDataKeyWithoutPlaintext, .pendingImport), (.enableKey, .pendingImport), (.disableKey, .pendingImport): .invalidState
        default: nil
        }
    }

    /// The state the key is in after `op` succeeded in `state`.
    static func after(_ op: Op, _ state: State) -> State {
        switch op {
        case .enableKey: .enabled
        case .disableKey: .disabled
        case .scheduleKeyDeletion: .pendingDeletion
        case .cancelKeyDeletion: .disabled
        case .importKeyMaterial: .enabled
        default: state
        }
    }

    func perform(_ op: Op, key: String, blob: [UInt8]) async throws {
        switch op {
        case .encrypt: _ = try await client.encrypt(keyID: key, plaintext: [1, 2, 3])
        case .decrypt: _ = try await client.decrypt(ciphertextBlob: blob)
        case .reEncrypt: _ = try await client.reEncrypt(ciphertextBlob: blob, destinationKeyID: key)
        case .generateDataKey: _ = try await client.generateDataKey(keyID: key, keySpec: "AES_256")
        case .generateDataKeyWithoutPlaintext: _ = try await client.generateDataKeyWithoutPlaintext(keyID: key, keySpec: "AES_256")
        case .describeKey: _ = try await client.describeKey(keyID: key)
        case .enableKey: try await client.enableKey(keyID: key)
        case .disableKey: try await client.disableKey(keyID: key)
        case .scheduleKeyDeletion: _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 30)
        case .cancelKeyDeletion: _ = try await client.cancelKeyDeletion(keyID: key)
        case .updateKeyDescription: try await client.updateKeyDescription(keyID: key, description: "renamed")
        case .createAlias: try await client.createAlias(aliasName: "alias/table-\(UUID().uuidString.prefix(8))", targetKeyID: key)
        case .tagResource: try await client.tagResource(keyID: key, tags: [(key: "k", value: "v")])
        case .untagResource: try await client.untagResource(keyID: key, tagKeys: ["k"])
        case .listResourceTags: _ = try await client.listResourceTags(keyID: key)
        case .enableKeyRotation: try await client.enableKeyRotation(keyID: key)
        case .disableKeyRotation: try await client.disableKeyRotation(keyID: key)
        case .getKeyRotationStatus: _ = try await client.getKeyRotationStatus(keyID: key)
        case .rotateKeyOnDemand: _ = try await client.rotateKeyOnDemand(keyID: key)
        case .listKeyRotations: _ = try await client.listKeyRotations(keyID: key)
        case .setMinimumDecryptionVersion: try await client.setMinimumDecryptionVersion(keyID: key, version: 1)
        case .getParametersForImport:
            _ = try await client.getParametersForImport(keyID: key, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_2048")
        case .importKeyMaterial:
            // Parameters come from a key that takes them, so only the operation itself is refused.
            try await importMaterial(into: key, from: importable ?? key)
        case .deleteImportedKeyMaterial: try await client.deleteImportedKeyMaterial(keyID: key)
        }
    }

    /// An EXTERNAL key (for import parameters when the key under test is not one).
    var importable: String? = nil

    /// Imports 32 bytes of 0x5a into `key` with parameters got for `source`.
    func importMaterial(into key: String, from source: String) async throws {
        let p = try await client.getParametersForImport(keyID: source, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_2048")
        let wrapped = try [UInt8](repeating: 0x5a, count: 32).withUnsafeBytes {
            try RSAPublicKey(der: Array(p.publicKey)).encryptOAEP($0, digest: .sha256)
        }
        try await client.importKeyMaterial(keyID: key, importToken: Array(p.importToken), encryptedKeyMaterial: wrapped,
                                           expirationModel: "KEY_MATERIAL_DOES_NOT_EXPIRE")
    }

    @Test(arguments: State.allCases, Op.allCases)
    func everyOperationInEveryState(_ state: State, _ op: Op) async throws {
        let external = state == .pendingImport
        let key = try await client.createKey(description: "state table", origin: external ? "EXTERNAL" : "").keyID
        if external {
            // Imported, used, then its material deleted: PendingImport with a blob to try.
            try await importMaterial(into: key, from: key)
        } else {
            importable = try await client.createKey(origin: "EXTERNAL").keyID
        }
        let blob = Array(try await client.encrypt(keyID: key, plaintext: [9, 9]).ciphertextBlob)
        if external { try await client.deleteImportedKeyMaterial(keyID: key) }
        switch state {
        case .enabled, .pendingImport: break
        case .disabled: try await client.disableKey(keyID: key)
        case .pendingDeletion: _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 30)
        }
        #expect(try await client.describeKey(keyID: key).keyState == state.rawValue)
        if let code = Self.expected(op, state) {
            await expectKMSError(code) { try await self.perform(op, key: key, blob: blob) }
            #expect(try await client.describeKey(keyID: key).keyState == state.rawValue, "a refused \(op) changed nothing")
        } else {
            try await perform(op, key: key, blob: blob)
            #expect(try await client.describeKey(keyID: key).keyState == Self.after(op, state).rawValue)
        }
    }

    /// The same table for keys with Origin EXTERNAL whose material is imported, in the states
    /// such a key shares with others: import operations work until PendingDeletion, where only
    /// DeleteImportedKeyMaterial still does (as AWS: the material goes, the key stays
    /// PendingDeletion, and a cancelled deletion leaves it PendingImport); rotation never.
    static let importedOps: [Op] = [.encrypt, .decrypt, .enableKey, .disableKey, .cancelKeyDeletion, .enableKeyRotation,
                                    .rotateKeyOnDemand, .getParametersForImport, .importKeyMaterial, .deleteImportedKeyMaterial]

    static func expectedImported(_ op: Op, _ state: State) -> KMSErrorCode? {
        switch (op, state) {
        case (.enableKeyRotation, _), (.rotateKeyOnDemand, _): .unsupportedOperation
        case (.deleteImportedKeyMaterial, _): nil
        case (.cancelKeyDeletion, .pendingDeletion): nil
        case (.cancelKeyDeletion, _), (_, .pendingDeletion): .invalidState
        case (.encrypt, .disabled), (.decrypt, .disabled): .disabled
        default: nil
        }
    }

    @Test(arguments: [State.enabled, .disabled, .pendingDeletion], importedOps)
    func everyOperationOnAnImportedKeyInEveryState(_ state: State, _ op: Op) async throws {
        let key = try await client.createKey(description: "imported state table", origin: "EXTERNAL").keyID
        try await importMaterial(into: key, from: key)
        let blob = Array(try await client.encrypt(keyID: key, plaintext: [9, 9]).ciphertextBlob)
        // Parameters for the import under test, got while the key still gives them.
        let p = try await client.getParametersForImport(keyID: key, wrappingAlgorithm: "RSAES_OAEP_SHA_256", wrappingKeySpec: "RSA_2048")
        switch state {
        case .disabled: try await client.disableKey(keyID: key)
        case .pendingDeletion: _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 30)
        default: break
        }
        #expect(try await client.describeKey(keyID: key).keyState == state.rawValue)
        func run() async throws {
            guard op == .importKeyMaterial else { return try await perform(op, key: key, blob: blob) }
            let wrapped = try [UInt8](repeating: 0x5a, count: 32).withUnsafeBytes {
                try RSAPublicKey(der: Array(p.publicKey)).encryptOAEP($0, digest: .sha256)
            }
            try await client.importKeyMaterial(keyID: key, importToken: Array(p.importToken), encryptedKeyMaterial: wrapped,
                                               expirationModel: "KEY_MATERIAL_DOES_NOT_EXPIRE")
        }
        if let code = Self.expectedImported(op, state) {
            await expectKMSError(code) { try await run() }
            #expect(try await client.describeKey(keyID: key).keyState == state.rawValue, "a refused \(op) changed nothing")
            return
        }
        try await run()
        let now = try await client.describeKey(keyID: key).keyState
        switch (op, state) {
        case (.deleteImportedKeyMaterial, .pendingDeletion):
            #expect(now == "PendingDeletion")
            _ = try await client.cancelKeyDeletion(keyID: key)
            #expect(try await client.describeKey(keyID: key).keyState == "PendingImport")
            await expectKMSError(.invalidState) { _ = try await self.client.decrypt(ciphertextBlob: blob) }
        case (.deleteImportedKeyMaterial, _): #expect(now == "PendingImport")
        case (.importKeyMaterial, _): #expect(now == state.rawValue, "the same material again leaves the state as it was")
        default: #expect(now == Self.after(op, state).rawValue)
        }
    }

    @Test func pendingWindowIsSevenToThirtyDaysAndDescribeShowsTheDate() async throws {
        let key = try await client.createKey().keyID
        await expectKMSError(.validation) { try await self.client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 6) }
        await expectKMSError(.validation) { try await self.client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 31) }
        let before = Int64(Date().timeIntervalSince1970)
        let r = try await client.scheduleKeyDeletion(keyID: key)  // 0 = 30 days
        #expect(r.keyState == "PendingDeletion" && r.pendingWindowInDays == 30 && r.keyID == key)
        #expect((before + 30...before + 32).contains(r.deletionDate), "30 one-second days: \(r.deletionDate - before)")
        let m = try await client.describeKey(keyID: key)
        #expect(m.deletionDate == r.deletionDate && m.pendingDeletionWindowInDays == 30 && !m.enabled)
        _ = try await client.cancelKeyDeletion(keyID: key)
        let back = try await client.describeKey(keyID: key)
        #expect(back.keyState == "Disabled" && back.deletionDate == 0)
        try await client.updateKeyDescription(keyID: key, description: "kept")
        #expect(try await client.describeKey(keyID: key).description_p == "kept")
    }

    /// When the window ends, kmsd destroys the key: its blobs then answer NotFoundException,
    /// and nothing of it is left in the keystore but its tombstone.
    @Test func deletionHappensWhenTheWindowEnds() async throws {
        let key = try await client.createKey().keyID
        let keep = try await client.createKey().keyID
        let blob = Array(try await client.encrypt(keyID: key, plaintext: Array("gone".utf8)).ciphertextBlob)
        let kept = Array(try await client.encrypt(keyID: keep, plaintext: Array("kept".utf8)).ciphertextBlob)
        _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 7)
        #expect(Array(try await client.decrypt(ciphertextBlob: kept).plaintext) == Array("kept".utf8))
        var deleted = false
        for _ in 0..<40 where !deleted {
            try await Task.sleep(nanoseconds: 500_000_000)
            do { _ = try await client.describeKey(keyID: key) } catch let e as KMSError where e.code == .notFound { deleted = true }
        }
        #expect(deleted, "the key was still there after its 7 s window")
        await expectKMSError(.notFound) { try await self.client.decrypt(ciphertextBlob: blob) }
        await expectKMSError(.notFound) { try await self.client.encrypt(keyID: key, plaintext: [1]) }
        #expect(!(try await client.listKeys(limit: 1000).keys.map(\.keyID).contains(key)))
        #expect(Array(try await client.decrypt(ciphertextBlob: kept).plaintext) == Array("kept".utf8), "other keys are untouched")
        let rows = try run("/usr/bin/sqlite3", [daemon.stateDir + "/keystore.sqlite3",
                                               "SELECT (SELECT count(*) FROM keys WHERE key_id = '\(key)') + (SELECT count(*) FROM key_versions WHERE key_id = '\(key)')"])
        #expect(rows.text.trimmingCharacters(in: .whitespacesAndNewlines) == "0", "rows of the deleted key remain: \(rows.text) \(rows.stderr)")
        #expect(daemon.log.contains("key \(key) deleted"))
    }

    /// A deletion that came due while kmsd was down happens at the next start, before it serves.
    @Test func aDeletionDueWhileStoppedHappensAtStart() async throws {
        let key = try await client.createKey().keyID
        let blob = Array(try await client.encrypt(keyID: key, plaintext: [7]).ciphertextBlob)
        _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 7)
        daemon.stop()
        try await Task.sleep(nanoseconds: 8_000_000_000)
        try daemon.restart()
        let fresh = daemon.client()
        await expectKMSError(.notFound) { try await fresh.decrypt(ciphertextBlob: blob) }
        await expectKMSError(.notFound) { try await fresh.describeKey(keyID: key) }
    }

    @Test func kmsctlRunsTheLifecycle() throws {
        func kmsctl(_ args: [String]) throws -> ProcessResult {
            try EndToEndTests.run(Paths.kmsctl, args, env: ["KMSD_SOCKET": daemon.socket])
        }
        let created = try kmsctl(["create-key", "--json"])
        let key = try #require(((try JSONSerialization.jsonObject(with: created.stdout) as? [String: Any])?["KeyMetadata"] as? [String: Any])?["KeyId"] as? String)
        #expect(try kmsctl(["disable-key", "--key-id", key]).status == 0)
        #expect(try kmsctl(["enable-key", "--key-id", key]).status == 0)
        #expect(try kmsctl(["update-key-description", "--key-id", key, "--description", "from kmsctl"]).status == 0)
        let scheduled = try kmsctl(["schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7", "--json"])
        let s = try #require(try JSONSerialization.jsonObject(with: scheduled.stdout) as? [String: Any], "\(scheduled.stderr)")
        #expect(s["KeyId"] as? String == key && s["KeyState"] as? String == "PendingDeletion" && s["PendingWindowInDays"] as? Int == 7)
        #expect((s["DeletionDate"] as? Int ?? 0) > 0)
        let refused = try kmsctl(["enable-key", "--key-id", key])
        #expect(refused.status == 1 && refused.stderr.hasPrefix("kmsctl: KMSInvalidStateException: "), "\(refused.stderr)")
        let cancelled = try kmsctl(["cancel-key-deletion", "--key-id", key, "--json"])
        #expect((try JSONSerialization.jsonObject(with: cancelled.stdout) as? [String: Any])?["KeyId"] as? String == key)
        let described = try kmsctl(["describe-key", "--key-id", key])
        #expect(described.text.contains("Disabled") && described.text.contains("from kmsctl"), "\(described.text)")
        #expect(try kmsctl(["schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "3"]).status == 2)
    }

    /// A deleted key's rows copied back from an older snapshot of the keystore (every row still
    /// authentic) are refused, not resurrected.
    @Test func aDeletedKeyRestoredFromASnapshotIsRefused() async throws {
        let key = try await client.createKey().keyID
        let blob = Array(try await client.encrypt(keyID: key, plaintext: [5]).ciphertextBlob)
        let db = daemon.stateDir + "/keystore.sqlite3", snapshot = daemon.stateDir + ".snapshot.sqlite3"
        let copy = try run("/usr/bin/sqlite3", [db, "VACUUM INTO '\(snapshot)'"])
        #expect(copy.status == 0, "\(copy.stderr)")
        _ = try await client.scheduleKeyDeletion(keyID: key, pendingWindowInDays: 7)
        var deleted = false
        for _ in 0..<40 where !deleted {
            try await Task.sleep(nanoseconds: 500_000_000)
            do { _ = try await client.describeKey(keyID: key) } catch let e as KMSError where e.code == .notFound { deleted = true }
        }
        try #require(deleted)
        daemon.stop()
        let restore = try run("/usr/bin/sqlite3", [db, """
            ATTACH '\(snapshot)' AS old;
            INSERT INTO keys SELECT * FROM old.keys WHERE key_id = '\(key)';
            INSERT INTO key_versions SELECT * FROM old.key_versions WHERE key_id = '\(key)';
            """])
        #expect(restore.status == 0, "\(restore.stderr)")
        try daemon.restart()
        let fresh = daemon.client()
        await expectKMSError(.keyUnavailable) { try await fresh.describeKey(keyID: key) }
        await expectKMSError(.keyUnavailable) { try await fresh.decrypt(ciphertextBlob: blob) }
    }
}
