import CSQLite
import Foundation
@testable import KMSCore
import KMSCrypto
import KMSProtocol
import Testing

/// The keystore: material never on disk unwrapped, every record authenticated, rows bound to
/// their key, and the root key checked.
struct KeyRepositoryTests {
    let dir: String
    let rootMaterial: [UInt8]

    init() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("kmsd-core-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        rootMaterial = try SecureRandom.bytes(32)
    }

    func repository(root: [UInt8]? = nil) throws -> KeyRepository {
        var material = root ?? rootMaterial
        let storage = try SQLiteKeyStorage(path: dir + "/keystore.sqlite3")
        return try KeyRepository(storage: storage, root: RootKey(material: SecureBytes(consuming: &material)))
    }

    func record(_ id: KeyID = .random(), owner: UInt32 = 0) -> KeyRecord {
        KeyRecord(keyID: id, createdAt: Date(timeIntervalSince1970: 1_700_000_000), description: "test", keyUsage: .encryptDecrypt,
                  keySpec: .symmetricDefault, state: .enabled, ownerUID: owner, currentVersion: 1, tags: [], origin: "AWS_KMS")
    }

    /// Every byte of every file in the state directory, concatenated.
    func stateBytes() throws -> [UInt8] {
        var all: [UInt8] = []
        for name in try FileManager.default.contentsOfDirectory(atPath: dir) {
            all += Array(try Data(contentsOf: URL(fileURLWithPath: dir + "/" + name)))
        }
        return all
    }

    func sql(_ statement: String) throws {
        var db: OpaquePointer?
        #expect(sqlite3_open(dir + "/keystore.sqlite3", &db) == SQLITE_OK)
        defer { sqlite3_close(db) }
        #expect(sqlite3_exec(db, statement, nil, nil, nil) == SQLITE_OK)
    }

    @Test func knownKeyMaterialAppearsNowhereInTheStateDirectory() throws {
        var known = [UInt8](repeating: 0, count: 32)
        for i in known.indices { known[i] = UInt8(truncatingIfNeeded: i &* 37 &+ 11) }
        let expected = known
        let repo = try repository()
        let r = record()
        try repo.create(r, material: SecureBytes(consuming: &known))
        let all = try stateBytes()
        #expect(all.count > 4096)
        // No 8-byte window of the material, nor of the root key, is anywhere on disk.
        for secret in [expected, rootMaterial] {
            for start in stride(from: 0, through: 24, by: 8) {
                let window = Array(secret[start..<start + 8])
                #expect(all.firstRange(of: window) == nil, "secret bytes found in the state directory")
            }
        }
        // And it is really there, wrapped: a fresh repository unwraps it.
        let reopened = try repository()
        #expect(try reopened.material(r.keyID, version: 1)?.unsafeCopyToArray() == expected)
    }

    @Test func anEditedRecordIsRefused() throws {
        let repo = try repository()
        let r = record(owner: 1000)
        try repo.create(r, material: SecureBytes.random(count: 32))
        // Loosen access by hand: make uid 1001 the owner.
        try sql("UPDATE keys SET record = replace(record, '\"ownerUID\":1000', '\"ownerUID\":1001')")
        let reopened = try repository()
        #expect(throws: KMSError(.keyUnavailable, "")) { try reopened.record(r.keyID) }
    }

    @Test func aVersionRowMovedToAnotherKeyIsRefused() throws {
        let repo = try repository()
        let a = record(), b = record()
        try repo.create(a, material: SecureBytes.random(count: 32))
        try repo.create(b, material: SecureBytes.random(count: 32))
        // Give key b the wrapped material (and MAC) of key a.
        try sql("UPDATE key_versions SET record = (SELECT record FROM key_versions WHERE key_id = '\(a.keyID)'), mac = (SELECT mac FROM key_versions WHERE key_id = '\(a.keyID)') WHERE key_id = '\(b.keyID)'")
        let reopened = try repository()
        #expect(throws: KMSError(.keyUnavailable, "")) { try reopened.material(b.keyID, version: 1) }
        #expect(try reopened.material(a.keyID, version: 1) != nil)
    }

    @Test func wrappedMaterialIsBoundToKeyVersionAndSpec() throws {
        let repo = try repository()
        let id = KeyID.random()
        let material = try SecureBytes.random(count: 32)
        let wrapped = try repo.wrap(material, keyID: id, version: 1, spec: .symmetricDefault)
        #expect(try repo.unwrap(wrapped, keyID: id, version: 1, spec: .symmetricDefault).constantTimeEquals(material))
        #expect(throws: CryptoError.authenticationFailure) { try repo.unwrap(wrapped, keyID: .random(), version: 1, spec: .symmetricDefault) }
        #expect(throws: CryptoError.authenticationFailure) { try repo.unwrap(wrapped, keyID: id, version: 2, spec: .symmetricDefault) }
        #expect(throws: CryptoError.authenticationFailure) { try repo.unwrap(wrapped, keyID: id, version: 1, spec: .hmac256) }
    }

    @Test func anotherRootKeyIsRefusedAtOpen() throws {
        _ = try repository()
        #expect(throws: StorageError.self) { try repository(root: SecureRandom.bytes(32)) }
    }

    @Test func aDeletedRowIsNotFoundAndAForgedRowIsRefused() throws {
        let repo = try repository()
        let r = record()
        try repo.create(r, material: SecureBytes.random(count: 32))
        let forged = KeyID.random()
        try sql("INSERT INTO keys (key_id, record, mac) SELECT '\(forged)', replace(record, '\(r.keyID)', '\(forged)'), mac FROM keys WHERE key_id = '\(r.keyID)'")
        let reopened = try repository()
        #expect(throws: KMSError(.keyUnavailable, "")) { try reopened.record(forged) }
        #expect(try reopened.record(KeyID.random()) == nil)
    }

    @Test func cacheStaysBounded() throws {
        var material = rootMaterial
        let storage = try SQLiteKeyStorage(path: dir + "/keystore.sqlite3")
        let repo = try KeyRepository(storage: storage, root: RootKey(material: SecureBytes(consuming: &material)), cacheCapacity: 16)
        var ids: [KeyID] = []
        for _ in 0..<50 {
            let r = record()
            try repo.create(r, material: SecureBytes.random(count: 32))
            ids.append(r.keyID)
        }
        #expect(repo.cachedKeys <= 16)
        // Evicted keys are unwrapped again on demand.
        for id in ids { #expect(try repo.material(id, version: 1) != nil) }
        #expect(repo.cachedKeys <= 16)
    }

    @Test func aRowCopiedFromAnotherKeystoreUnderTheSameRootKeyIsRefused() throws {
        let repo = try repository()
        let r = record()
        try repo.create(r, material: SecureBytes.random(count: 32))
        // A second keystore, same root key, with its own key.
        let otherDir = dir + "-other"
        try FileManager.default.createDirectory(atPath: otherDir, withIntermediateDirectories: true)
        var material = rootMaterial
        let other = try KeyRepository(storage: SQLiteKeyStorage(path: otherDir + "/keystore.sqlite3"),
                                      root: RootKey(material: SecureBytes(consuming: &material)))
        let foreign = record()
        try other.create(foreign, material: SecureBytes.random(count: 32))
        try sql("ATTACH '\(otherDir)/keystore.sqlite3' AS o; INSERT INTO keys SELECT * FROM o.keys; INSERT INTO key_versions SELECT * FROM o.key_versions")
        let reopened = try repository()
        #expect(throws: KMSError(.keyUnavailable, "")) { try reopened.record(foreign.keyID) }
        #expect(try reopened.record(r.keyID) == r)
    }

    @Test func aKeystoreFromBeforePerKeystoreIDsIsMigratedWithoutLosingAKey() throws {
        let repo = try repository()
        let r = record(owner: 1000)
        var known = try SecureRandom.bytes(32)
        let expected = known
        try repo.create(r, material: SecureBytes(consuming: &known))
        // Rewrite it as the first format: row MACs without the keystore id or a generation, no
        // owner index, no row index.
        for (table, rowKey) in [("keys", r.keyID.description), ("key_versions", "\(r.keyID)/1")] {
            let row = try #require(table == "keys" ? repo.storage.key(id: r.keyID.description) : repo.storage.version(id: r.keyID.description, number: 1))
            let legacy = try HMAC.authenticate(key: repo.root.recordMACKey,
                                               data: KeyRepository.macInput(keystoreID: nil, table: table, rowKey: rowKey, record: row.record))
            let hex = legacy.map { String(format: "%02x", $0) }.joined()
            let whereClause = table == "keys" ? "key_id = '\(r.keyID)'" : "key_id = '\(r.keyID)' AND version = 1"
            try sql("UPDATE \(table) SET mac = X'\(hex)' WHERE \(whereClause)")
        }
        try sql("UPDATE keys SET owner_uid = NULL, gen = NULL; UPDATE key_versions SET gen = NULL; DELETE FROM row_index; DELETE FROM meta WHERE name IN ('keystore_id', 'integrity')")
        let migrated = try repository()
        #expect(try migrated.record(r.keyID) == r)
        let material = try #require(try migrated.material(r.keyID, version: 1))
        #expect(material.withUnsafeBytes { Array($0) } == expected)
        #expect(try migrated.keyIDs(owner: 1000, after: nil, limit: 10) == [r.keyID], "the owner index was filled")
    }

    @Test func aCorruptRowIsLeftOutOfAnOwnersListingAndReported() throws {
        let repo = try repository()
        let owner = Principal(uid: 1000, gid: 1000, pid: 1, userName: "alice")
        var mine: [KeyID] = []
        for _ in 0..<5 {
            let r = record(owner: 1000)
            try repo.create(r, material: SecureBytes.random(count: 32))
            mine.append(r.keyID)
        }
        try repo.create(record(owner: 2000), material: SecureBytes.random(count: 32))
        let broken = mine.sorted { $0.description < $1.description }[2]
        try sql("UPDATE keys SET record = replace(record, 'test', 'tset') WHERE key_id = '\(broken)'")
        // A restarted daemon: nothing cached, every record read from the keystore.
        let service = KeyService(repository: try repository(), administrators: Administrators(uids: [0]))
        let page = try service.listKeys(limit: 10, marker: "", caller: owner)
        #expect(Set(page.keys) == Set(mine).subtracting([broken]))
        #expect(page.skipped == [broken])
        // An index entry pointing at someone else's key does not list it.
        let theirs = try repo.keyIDs(owner: 2000, after: nil, limit: 10)
        try sql("UPDATE keys SET owner_uid = 1000 WHERE key_id = '\(theirs[0])'")
        #expect(!(try service.listKeys(limit: 10, marker: "", caller: owner).keys.contains(theirs[0])))
    }

    /// Forwards to SQLite and counts record reads.
    final class CountingStorage: KeyStorage, @unchecked Sendable {
        let inner: SQLiteKeyStorage
        private let lock = NSLock()
        private var reads = 0
        init(_ inner: SQLiteKeyStorage) { self.inner = inner }
        var recordReads: Int { lock.withLock { reads } }
        func insertKey(id: String, owner: UInt32, key: StoredRow, version: (number: UInt32, row: StoredRow)?, integrity: IntegrityWrite) throws {
            try inner.insertKey(id: id, owner: owner, key: key, version: version, integrity: integrity)
        }
        func deleteKey(id: String, integrity: IntegrityWrite) throws { try inner.deleteKey(id: id, integrity: integrity) }
        func updateKey(id: String, key: StoredRow, due: KeyDue, integrity: IntegrityWrite) throws { try inner.updateKey(id: id, key: key, due: due, integrity: integrity) }
        func addVersion(id: String, key: StoredRow, due: KeyDue, versionNumber: UInt32, version: StoredRow, integrity: IntegrityWrite) throws {
            try inner.addVersion(id: id, key: key, due: due, versionNumber: versionNumber, version: version, integrity: integrity)
        }
        func removeVersions(id: String, key: StoredRow, due: KeyDue, integrity: IntegrityWrite) throws {
            try inner.removeVersions(id: id, key: key, due: due, integrity: integrity)
        }
        func keysDueForExpiry(at time: Int64, limit: Int) throws -> [String] { try inner.keysDueForExpiry(at: time, limit: limit) }
        func indexEntries(_ rows: [(table: String, rowKey: String)]) throws -> [IndexEntry] { try inner.indexEntries(rows) }
        func forEachIndexEntry(_ body: (IndexEntry) throws -> Void) throws { try inner.forEachIndexEntry(body) }
        func allRowKeys() throws -> [(table: String, rowKey: String, generation: UInt64)] { try inner.allRowKeys() }
        func initializeIndex(_ integrity: IntegrityWrite) throws { try inner.initializeIndex(integrity) }
        func insertGrant(id: String, keyID: String, retiring: String?, row: StoredRow, integrity: IntegrityWrite) throws {
            try inner.insertGrant(id: id, keyID: keyID, retiring: retiring, row: row, integrity: integrity)
        }
        func deleteGrant(id: String, integrity: IntegrityWrite) throws -> Bool { try inner.deleteGrant(id: id, integrity: integrity) }
        func grant(id: String) throws -> StoredRow? { try inner.grant(id: id) }
        func grants(keyID: String, after: String?, limit: Int) throws -> [(id: String, row: StoredRow)] { try inner.grants(keyID: keyID, after: after, limit: limit) }
        func grantIDs(retiring: String, after: String?, limit: Int) throws -> [String] { try inner.grantIDs(retiring: retiring, after: after, limit: limit) }
        func keyCountsByState() throws -> [String: Int] { try inner.keyCountsByState() }
        func versions(id: String) throws -> [(number: UInt32, row: StoredRow)] { try inner.versions(id: id) }
        func keysDueForRotation(at time: Int64, limit: Int) throws -> [String] { try inner.keysDueForRotation(at: time, limit: limit) }
        func destroyKey(id: String, dueBy time: Int64, tombstone: StoredRow, integrity: IntegrityWrite) throws -> Bool {
            try inner.destroyKey(id: id, dueBy: time, tombstone: tombstone, integrity: integrity)
        }
        func tombstone(id: String) throws -> StoredRow? { try inner.tombstone(id: id) }
        func insertAlias(name: String, keyID: String, row: StoredRow, integrity: IntegrityWrite) throws {
            try inner.insertAlias(name: name, keyID: keyID, row: row, integrity: integrity)
        }
        func updateAlias(name: String, keyID: String, row: StoredRow, integrity: IntegrityWrite) throws {
            try inner.updateAlias(name: name, keyID: keyID, row: row, integrity: integrity)
        }
        func deleteAlias(name: String, integrity: IntegrityWrite) throws { try inner.deleteAlias(name: name, integrity: integrity) }
        func alias(name: String) throws -> StoredRow? { try inner.alias(name: name) }
        func aliasNames(keyID: String?, after: String?, limit: Int) throws -> [String] { try inner.aliasNames(keyID: keyID, after: after, limit: limit) }
        func aliasCount(keyID: String) throws -> Int { try inner.aliasCount(keyID: keyID) }
        func keysDueForDeletion(at time: Int64, limit: Int) throws -> [String] { try inner.keysDueForDeletion(at: time, limit: limit) }
        func key(id: String) throws -> StoredRow? { lock.withLock { reads += 1 }; return try inner.key(id: id) }
        func version(id: String, number: UInt32) throws -> StoredRow? { try inner.version(id: id, number: number) }
        func keyIDs(owner: UInt32?, after: String?, limit: Int) throws -> [String] { try inner.keyIDs(owner: owner, after: after, limit: limit) }
        func meta(_ name: String) throws -> [UInt8]? { try inner.meta(name) }
        func setMeta(_ name: String, _ value: [UInt8]) throws { try inner.setMeta(name, value) }
        func allRows() throws -> (keys: [(id: String, row: StoredRow)], versions: [(id: String, number: UInt32, row: StoredRow)]) { try inner.allRows() }
        func migrate(keys: [(id: String, mac: [UInt8], owner: UInt32)], versions: [(id: String, number: UInt32, mac: [UInt8])],
                     meta: [(String, [UInt8])]) throws { try inner.migrate(keys: keys, versions: versions, meta: meta) }
    }

    @Test func aUsersListingReadsItsPageNotTheKeystore() throws {
        let repo = try repository()
        var mine: Set<KeyID> = []
        for i in 0..<300 {
            let r = record(owner: i % 100 == 0 ? 1000 : 2000)
            try repo.create(r, material: SecureBytes.random(count: 32))
            if r.ownerUID == 1000 { mine.insert(r.keyID) }
        }
        var material = rootMaterial
        let storage = CountingStorage(try SQLiteKeyStorage(path: dir + "/keystore.sqlite3"))
        let service = KeyService(repository: try KeyRepository(storage: storage, root: RootKey(material: SecureBytes(consuming: &material))),
                                 administrators: Administrators(uids: [0]))
        let page = try service.listKeys(limit: 10, marker: "", caller: Principal(uid: 1000, gid: 1000, pid: 1, userName: "alice"))
        #expect(Set(page.keys) == mine)
        #expect(storage.recordReads == mine.count, "read \(storage.recordReads) records for a page of \(mine.count) among 300 keys")
    }
}
