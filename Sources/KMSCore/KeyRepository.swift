import Foundation
import KMSCrypto
import KMSProtocol
import Synchronization

/// The keystore as the rest of kmsd sees it: authenticated records, wrapped material, and a
/// bounded cache of unwrapped keys in locked memory.
///
/// Every row is stored with HMAC-SHA256 under the root-derived record key over
/// `lp(table) ‖ lp(row key) ‖ record`, so an edited, swapped or forged row is refused.
/// Material is wrapped with AES-256-GCM under the root-derived wrapping key with AAD binding
/// key id, version and spec, so a blob moved to another key or version fails to unwrap.
public final class KeyRepository: Sendable {
    let storage: any KeyStorage
    let root: RootKey
    /// Random per keystore, bound into every row's MAC: a row copied in from another keystore
    /// under the same root key does not verify here.
    let keystoreID: [UInt8]
    private let cache: Mutex<LRUCache>
    /// Encrypts list markers (alias names, tag keys) so they show nothing.
    let markerKey: SecureBytes
    /// Authenticates the row index (rollback detection): its leaves and its digest.
    let indexKey: SecureBytes
    /// The keystore's write counter and the digest of the row index, moved on by every write.
    private let integrity: Mutex<IntegrityState>
    /// Counts completed changes to what an access decision reads: key records, versions,
    /// grants and aliases (each method that writes them counts once it is done, its cache
    /// updated), and, through `KeyService`, the identity policies, the administrators and the
    /// grant cache; also keys leaving the cache (evicted, removed). So a decision made after
    /// reading the count, and what was cached then, stay valid while the count is unchanged
    /// (the per-connection `DecisionMemo` of kmsd's request path relies on this).
    private let changes = Atomic<UInt64>(0)
    /// Row-index buckets whose entries did not match their authenticated digest when kmsd
    /// started (or in an earlier start): rows in them last written at or before the generation
    /// given are refused.
    let suspectBuckets: [UInt8: UInt64]
    /// What the row-index check at startup found, for the log and the audit trail.
    public let integrityReport: IntegrityReport
    /// The fingerprint of the root key the keystore is under (the one it was opened with).
    public let rootKeyFingerprint: String
    static let materialLabel = Array("kmsd/v1/key-material".utf8)
    static let rootCheckLabel = Array("kmsd/v1/root-key-check".utf8)

    /// Opens the repository and checks the root key matches the keystore (a fresh keystore
    /// records a check value). A keystore from before per-keystore ids and the owner index is
    /// migrated in one transaction (every row verified first; a row that fails keeps its old
    /// MAC and so stays refused).
    ///
    /// Throws StorageError when the keystore was created under another root key.
    public init(storage: any KeyStorage, root rootKey: RootKey, cacheCapacity: Int = 4096) throws {
        self.storage = storage
        let root = try Self.openKeystoreKey(storage, rootKey)
        self.root = root
        rootKeyFingerprint = rootKey.fingerprint
        self.cache = Mutex(LRUCache(capacity: max(1, cacheCapacity)))
        self.markerKey = try HKDF.deriveKey(from: root.recordMACKey, salt: [], info: Array("kmsd/v1/list-marker-key".utf8))
        let check = try HMAC.authenticate(key: root.recordMACKey, data: Self.rootCheckLabel)
        if let stored = try storage.meta("root_key_check") {
            guard ConstantTime.equals(stored, check) else {
                throw StorageError("the root key does not match this keystore: it was created under another root key. Start kmsd with the root key it was created with; do not delete the keystore, or every key in it is lost")
            }
        } else {
            try storage.setMeta("root_key_check", check)
        }
        if let id = try storage.meta("keystore_id") {
            keystoreID = id
        } else {
            keystoreID = try SecureRandom.bytes(16)
            try Self.migrate(storage, root: root, keystoreID: keystoreID)
        }
        indexKey = try HKDF.deriveKey(from: root.recordMACKey, salt: [], info: Array("kmsd/v1/row-index-key".utf8))
        let (state, report) = try RowIndex.open(storage, key: indexKey, keystoreID: keystoreID)
        integrity = Mutex(state)
        suspectBuckets = state.suspect
        integrityReport = report
    }

    /// The keys this keystore's rows and material are under: derived from the keystore key,
    /// which the root key unwraps. A fresh keystore gets a random keystore key, wrapped under
    /// the root key and stored (before anything else, so a crash leaves an empty keystore); a
    /// keystore from before keystore keys derives them from the root key itself.
    static func openKeystoreKey(_ storage: any KeyStorage, _ rootKey: RootKey) throws -> RootKey {
        if let wrapped = try storage.meta("keystore_key") {
            guard let key = try rootKey.unwrapKeystoreKey(wrapped) else {
                throw StorageError("the root key does not match this keystore: the keystore is under root key \(RootKey.wrappingFingerprint(wrapped)), and this is root key \(rootKey.fingerprint). Start kmsd with the root key the keystore is under (after `kmsd rewrap`, the new one); do not delete the keystore, or every key in it is lost")
            }
            return try RootKey(material: key)
        }
        if try storage.meta("root_key_check") != nil { return rootKey }
        let key = try SecureBytes.random(count: RootKey.byteCount)
        try storage.setMeta("keystore_key", try rootKey.wrapKeystoreKey(key))
        return try RootKey(material: key)
    }

    public enum RewrapResult: Sendable, Equatable { case rewrapped, alreadyUnderNewKey }

    /// Root-key rotation: the keystore key, unwrapped with `old`, is stored wrapped under `new`
    /// in one durable write, so the keystore is under exactly one of them at any moment: the
    /// old one until the write commits, the new one after. Nothing else changes (every row,
    /// every wrapped version, the audit chain's key stay as they are). Run again after a crash
    /// it finds the keystore already under `new` and says so.
    public static func rewrap(_ storage: any KeyStorage, from old: RootKey, to new: RootKey) throws -> RewrapResult {
        guard let wrapped = try storage.meta("keystore_key") else {
            if try storage.meta("root_key_check") == nil {
                throw StorageError("the state directory holds no keystore yet: start kmsd with the new root key instead")
            }
            throw StorageError("this keystore was made before root-key rotation existed: its keys derive from the root key itself, so it cannot be moved to another root key")
        }
        if let key = try old.unwrapKeystoreKey(wrapped) {
            guard old.fingerprint != new.fingerprint else { throw StorageError("the new root key is the old one (\(old.fingerprint)); make a new one") }
            try storage.setMeta("keystore_key", try new.wrapKeystoreKey(key))
            return .rewrapped
        }
        if try new.unwrapKeystoreKey(wrapped) != nil { return .alreadyUnderNewKey }
        throw StorageError("neither root key opens this keystore: it is under root key \(RootKey.wrappingFingerprint(wrapped)); the old key given is \(old.fingerprint), the new one \(new.fingerprint)")
    }

    /// Re-MACs every verified row under the keystore id and fills the owner index, then records
    /// the id: all in one transaction, so a crash leaves the old keystore intact.
    static func migrate(_ storage: any KeyStorage, root: RootKey, keystoreID: [UInt8]) throws {
        let rows = try storage.allRows()
        func mac(_ table: String, _ rowKey: String, _ record: [UInt8], _ id: [UInt8]?) throws -> [UInt8] {
            try HMAC.authenticate(key: root.recordMACKey, data: macInput(keystoreID: id, table: table, rowKey: rowKey, record: record))
        }
        func verified(_ table: String, _ rowKey: String, _ row: StoredRow) -> Bool {
            guard let expected = try? mac(table, rowKey, row.record, nil) else { return false }
            return ConstantTime.equals(expected, row.mac)
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .secondsSince1970
        var keys: [(id: String, mac: [UInt8], owner: UInt32)] = []
        for k in rows.keys where verified("keys", k.id, k.row) {
            guard let record = try? decoder.decode(KeyRecord.self, from: Data(k.row.record)) else { continue }
            keys.append((k.id, try mac("keys", k.id, k.row.record, keystoreID), record.ownerUID))
        }
        var versions: [(id: String, number: UInt32, mac: [UInt8])] = []
        for v in rows.versions where verified("key_versions", "\(v.id)/\(v.number)", v.row) {
            versions.append((v.id, v.number, try mac("key_versions", "\(v.id)/\(v.number)", v.row.record, keystoreID)))
        }
        try storage.migrate(keys: keys, versions: versions, meta: [("keystore_id", keystoreID)])
    }

    public func keyCountsByState() -> [String: Int] { (try? storage.keyCountsByState()) ?? [:] }
    public var cacheCapacity: Int { cache.withLock { $0.capacity } }

    /// The count of completed changes (see `changes`).
    public var changeCount: UInt64 { changes.load(ordering: .acquiring) }

    /// Counts one more completed change; call after the change is visible everywhere.
    public func noteChange() { changes.wrappingAdd(1, ordering: .releasing) }

    /// The audit chain's checkpoint (kept in the keystore so the next start links to it).
    public func auditCheckpoint() -> [UInt8]? { try? storage.meta("audit_chain") }
    public func setAuditCheckpoint(_ bytes: [UInt8]) throws { try storage.setMeta("audit_chain", bytes) }

    /// The audit chain's key: derived from the root key, so only this kmsd can extend or check
    /// the chain.
    public func auditChainKey() throws -> SecureBytes {
        try HKDF.deriveKey(from: root.recordMACKey, salt: [], info: Array("kmsd/v1/audit-chain-key".utf8))
    }

    /// Stores a new key with version 1 holding `material` (none: an EXTERNAL key awaiting
    /// imported material). Durable when it returns.
    public func create(_ record: KeyRecord, material: SecureBytes?) throws {
        defer { noteChange() }  // after the cache has followed: see `changes`
        let id = record.keyID.description
        try commit { gen in
            var version: (number: UInt32, row: StoredRow)? = nil
            var rows: [RowIndex.Touch] = [.init("keys", id, live: true)]
            if let material {
                let v = KeyVersionRecord(keyID: record.keyID, version: 1, keySpec: record.keySpec, createdAt: record.createdAt,
                                         wrappedMaterial: try wrap(material, keyID: record.keyID, version: 1, spec: record.keySpec))
                version = (1, try seal(v, table: "key_versions", rowKey: "\(id)/1", generation: gen))
                rows.append(.init("key_versions", "\(id)/1", live: true))
            }
            let keyRow = try seal(record, table: "keys", rowKey: id, generation: gen)
            return (rows, { try self.storage.insertKey(id: id, owner: record.ownerUID, key: keyRow, version: version, integrity: $0); return true })
        }
        cache.withLock { $0.put(record.keyID, CachedKey(record: record, versions: material.map { [1: $0] } ?? [:])) }
    }

    /// Replaces a key's record (state, description, deletion date), durably, in one
    /// transaction; the cache follows.
    public func update(_ record: KeyRecord) throws {
        defer { noteChange() }  // after the cache has followed: see `changes`
        let id = record.keyID.description
        try commit { gen in
            let row = try seal(record, table: "keys", rowKey: id, generation: gen)
            return ([.init("keys", id, live: true)], { try self.storage.updateKey(id: id, key: row, due: Self.due(record), integrity: $0); return true })
        }
        cache.withLock { cache in
            cache.mutations &+= 1
            if var entry = cache.peek(record.keyID) {
                entry.record = record
                cache.put(record.keyID, entry)
            }
        }
    }

    /// The scheduled work a record calls for, for the sweeps' indexes: deletion of a key
    /// pending deletion; automatic rotation only of keys that can rotate (Enabled, rotation
    /// on); expiry of imported material that has a ValidTo.
    static func due(_ r: KeyRecord) -> KeyDue {
        func seconds(_ d: Date?) -> Int64? { d.map { Int64($0.timeIntervalSince1970.rounded(.up)) } }
        return KeyDue(deletion: r.state == .pendingDeletion ? seconds(r.deletionDate) : nil,
                      rotation: r.state == .enabled && r.rotationPeriodDays != nil ? seconds(r.nextRotationDate) : nil,
                      expiry: r.expirationModel != nil ? seconds(r.validTo) : nil)
    }

    /// Adds version `record.currentVersion` holding `material` and stores `record`, in one
    /// transaction; the cache then encrypts under the new version.
    public func rotate(_ record: KeyRecord, material: SecureBytes, rotationType: String?, at time: Date) throws {
        defer { noteChange() }  // after the cache has followed: see `changes`
        let number = record.currentVersion, id = record.keyID.description
        let version = KeyVersionRecord(keyID: record.keyID, version: number, keySpec: record.keySpec, createdAt: time,
                                       wrappedMaterial: try wrap(material, keyID: record.keyID, version: number, spec: record.keySpec),
                                       rotationType: rotationType)
        try commit { gen in
            let keyRow = try seal(record, table: "keys", rowKey: id, generation: gen)
            let versionRow = try seal(version, table: "key_versions", rowKey: "\(id)/\(number)", generation: gen)
            return ([.init("key_versions", "\(id)/\(number)", live: true), .init("keys", id, live: true)], {
                try self.storage.addVersion(id: id, key: keyRow, due: Self.due(record), versionNumber: number, version: versionRow, integrity: $0)
                return true
            })
        }
        cache.withLock { cache in
            cache.mutations &+= 1
            if var entry = cache.peek(record.keyID) {
                entry.record = record
                entry.versions[number] = material
                cache.put(record.keyID, entry)
            }
        }
    }

    /// Stores imported material as version `record.currentVersion` with `record`, in one
    /// transaction.
    public func importMaterial(_ record: KeyRecord, material: SecureBytes, at time: Date) throws {
        try rotate(record, material: material, rotationType: nil, at: time)
    }

    /// Removes every version's material (imported material deleted or expired) and stores
    /// `record`, in one transaction; cached material is zeroed.
    public func removeMaterial(_ record: KeyRecord) throws {
        defer { noteChange() }  // after the cache has followed: see `changes`
        let id = record.keyID.description
        try commit { gen in
            let gone = try self.storage.versions(id: id).map { RowIndex.Touch("key_versions", "\(id)/\($0.number)", live: false) }
            let keyRow = try seal(record, table: "keys", rowKey: id, generation: gen)
            return (gone + [.init("keys", id, live: true)], { try self.storage.removeVersions(id: id, key: keyRow, due: Self.due(record), integrity: $0); return true })
        }
        cache.withLock { $0.remove(record.keyID); $0.mutations &+= 1 }
    }

    public func dueForExpiry(at time: Date, limit: Int = 1000) throws -> [KeyID] {
        try storage.keysDueForExpiry(at: Int64(time.timeIntervalSince1970), limit: limit).compactMap { try? KeyID(parsing: $0) }
    }

    /// A keyed one-way check value of imported material (HKDF with a root-derived salt):
    /// equal for equal material of the same key, and shows nothing of it.
    public func materialCheck(_ material: SecureBytes, keyID: KeyID) throws -> Data {
        var out = [UInt8](repeating: 0, count: 32)
        let info = Array("kmsd/v1/imported-material-check".utf8) + keyID.bytes
        try material.withUnsafeBytes { m in
            try root.recordMACKey.withUnsafeBytes { salt in
                try info.withUnsafeBytes { i in
                    try out.withUnsafeMutableBytes { try HKDF.derive(ikm: m, salt: salt, info: i, into: $0) }
                }
            }
        }
        return Data(out)
    }

    /// Every version's record (no material), ascending; KeyUnavailableException for a row that
    /// fails its integrity check.
    public func versions(_ id: KeyID) throws(KMSError) -> [KeyVersionRecord] {
        let rows: [(number: UInt32, row: StoredRow)]
        do { rows = try storage.versions(id: id.description) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        var out: [KeyVersionRecord] = []
        for r in rows {
            let v: KeyVersionRecord = try open(r.row, table: "key_versions", rowKey: "\(id)/\(r.number)")
            guard v.keyID == id, v.version == r.number else { throw Self.tampered(id) }
            out.append(v)
        }
        return out
    }

    public func dueForRotation(at time: Date, limit: Int = 1000) throws -> [KeyID] {
        try storage.keysDueForRotation(at: Int64(time.timeIntervalSince1970), limit: limit).compactMap { try? KeyID(parsing: $0) }
    }

    /// Deletes a key for good: its record and every version's wrapped material go, in one
    /// transaction with its tombstone; its cached material is zeroed.
    /// Returns false (and changes nothing) when the key is no longer due at `time`.
    public func destroy(_ id: KeyID, at time: Date) throws -> Bool {
        defer { noteChange() }  // after the cache has followed: see `changes`
        let key = id.description
        let destroyed = try commit { gen in
            let tombstone = try seal(KeyTombstone(keyID: id, deletedAt: time), table: "deleted_keys", rowKey: key, generation: gen)
            var rows: [RowIndex.Touch] = try self.storage.versions(id: key).map { .init("key_versions", "\(key)/\($0.number)", live: false) }
            rows += try self.storage.aliasNames(keyID: key, after: nil, limit: Int.max).map { .init("aliases", $0, live: false) }
            rows += try self.storage.grants(keyID: key, after: nil, limit: Int.max).map { .init("grants", $0.id, live: false) }
            rows += [.init("keys", key, live: false), .init("deleted_keys", key, live: true)]
            return (rows, { try self.storage.destroyKey(id: key, dueBy: Int64(time.timeIntervalSince1970), tombstone: tombstone, integrity: $0) })
        }
        guard destroyed else { return false }
        cache.withLock { $0.remove(id); $0.mutations &+= 1 }
        return true
    }

    /// The tombstone of a deleted key, or nil when the key was never deleted here.
    public func tombstone(_ id: KeyID) throws(KMSError) -> KeyTombstone? {
        let row: StoredRow?
        do { row = try storage.tombstone(id: id.description) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        guard let row else { return nil }
        let tombstone: KeyTombstone = try open(row, table: "deleted_keys", rowKey: id.description)
        guard tombstone.keyID == id else { throw Self.tampered(id) }
        return tombstone
    }

    // MARK: - Grants

    public func createGrant(_ grant: GrantRecord) throws {
        defer { noteChange() }  // after the cache has followed: see `changes`
        try commit { gen in
            let row = try seal(grant, table: "grants", rowKey: grant.grantID, generation: gen)
            return ([.init("grants", grant.grantID, live: true)], {
                try self.storage.insertGrant(id: grant.grantID, keyID: grant.keyID.description, retiring: grant.retiringPrincipal, row: row, integrity: $0)
                return true
            })
        }
    }

    /// Deletes a grant; false when it was not there.
    public func deleteGrant(_ id: String) throws -> Bool {
        defer { noteChange() }  // after the cache has followed: see `changes`
        return try commit { _ in ([.init("grants", id, live: false)], { try self.storage.deleteGrant(id: id, integrity: $0) }) }
    }

    public func grant(_ id: String) throws(KMSError) -> GrantRecord? {
        let row: StoredRow?
        do { row = try storage.grant(id: id) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        guard let row else { return nil }
        let grant: GrantRecord = try open(row, table: "grants", rowKey: id, orElse: Self.grantTampered(id))
        guard grant.grantID == id else { throw Self.grantTampered(id) }
        return grant
    }

    /// A key's grants, ascending by id, one page.
    public func grants(of keyID: KeyID, after: String? = nil, limit: Int = Int.max) throws(KMSError) -> [GrantRecord] {
        let rows: [(id: String, row: StoredRow)]
        do { rows = try storage.grants(keyID: keyID.description, after: after, limit: limit) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        var out: [GrantRecord] = []
        for r in rows {
            let g: GrantRecord = try open(r.row, table: "grants", rowKey: r.id, orElse: Self.grantTampered(r.id))
            guard g.grantID == r.id, g.keyID == keyID else { throw Self.grantTampered(r.id) }
            out.append(g)
        }
        return out
    }

    /// A key's grants whose rows check out; a row that does not is left out (and allows nothing).
    public func intactGrants(of keyID: KeyID) -> [GrantRecord] {
        guard let rows = try? storage.grants(keyID: keyID.description, after: nil, limit: Int.max) else { return [] }
        return rows.compactMap { r in
            guard let g: GrantRecord = try? open(r.row, table: "grants", rowKey: r.id, orElse: Self.grantTampered(r.id)),
                  g.grantID == r.id, g.keyID == keyID else { return nil }
            return g
        }
    }

    public func grantIDs(retiring: String, after: String?, limit: Int) throws(KMSError) -> [String] {
        do { return try storage.grantIDs(retiring: retiring, after: after, limit: limit) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
    }

    static func grantTampered(_ id: String) -> KMSError {
        KMSError(.keyUnavailable, "the stored grant \(id.prefix(16))… failed its integrity check: the keystore was modified outside kmsd. Restore it from a backup")
    }

    // MARK: - Aliases

    /// Stores a new alias; AlreadyExistsException when the name is taken.
    public func createAlias(_ alias: AliasRecord) throws(KMSError) {
        defer { noteChange() }  // after the cache has followed: see `changes`
        do {
            try commit { gen in
                let row = try seal(alias, table: "aliases", rowKey: alias.aliasName, generation: gen)
                return ([.init("aliases", alias.aliasName, live: true)], {
                    try self.storage.insertAlias(name: alias.aliasName, keyID: alias.keyID.description, row: row, integrity: $0)
                    return true
                })
            }
        } catch {
            if (try? storage.alias(name: alias.aliasName)) != nil {
                throw KMSError(.alreadyExists, "alias \(alias.aliasName) already exists; choose another name or update-alias it")
            }
            throw KMSError(.internalError, "the alias could not be stored (\(error)); nothing was created")
        }
    }

    public func updateAlias(_ alias: AliasRecord) throws {
        defer { noteChange() }  // after the cache has followed: see `changes`
        try commit { gen in
            let row = try seal(alias, table: "aliases", rowKey: alias.aliasName, generation: gen)
            return ([.init("aliases", alias.aliasName, live: true)], {
                try self.storage.updateAlias(name: alias.aliasName, keyID: alias.keyID.description, row: row, integrity: $0)
                return true
            })
        }
    }

    public func deleteAlias(_ name: String) throws {
        defer { noteChange() }  // after the cache has followed: see `changes`
        try commit { _ in ([.init("aliases", name, live: false)], { try self.storage.deleteAlias(name: name, integrity: $0); return true }) }
    }

    /// The alias, or nil; KeyUnavailableException when its row fails its integrity check.
    public func alias(_ name: String) throws(KMSError) -> AliasRecord? {
        let row: StoredRow?
        do { row = try storage.alias(name: name) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        guard let row else { return nil }
        let failed = KMSError(.keyUnavailable, "the stored alias \(name) failed its integrity check: the keystore was modified outside kmsd. Restore it from a backup")
        let alias: AliasRecord = try open(row, table: "aliases", rowKey: name, orElse: failed)
        guard alias.aliasName == name else { throw failed }
        return alias
    }

    public func aliasNames(keyID: KeyID?, after: String?, limit: Int) throws(KMSError) -> [String] {
        do { return try storage.aliasNames(keyID: keyID?.description, after: after, limit: limit) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
    }

    public func aliasCount(_ keyID: KeyID) throws(KMSError) -> Int {
        do { return try storage.aliasCount(keyID: keyID.description) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
    }

    /// Keys pending deletion whose deletion time has come.
    public func dueForDeletion(at time: Date, limit: Int = 1000) throws -> [KeyID] {
        try storage.keysDueForDeletion(at: Int64(time.timeIntervalSince1970), limit: limit).compactMap { try? KeyID(parsing: $0) }
    }

    /// Removes a key and every version, from storage and the cache (whose material is zeroed).
    /// Used to undo a CreateKey whose audit record could not be written.
    public func delete(_ id: KeyID) throws {
        defer { noteChange() }  // after the cache has followed: see `changes`
        cache.withLock { $0.remove(id); $0.mutations &+= 1 }
        noteChange()  // out of the cache already
        let key = id.description
        try commit { _ in
            let rows: [RowIndex.Touch] = try self.storage.versions(id: key).map { .init("key_versions", "\(key)/\($0.number)", live: false) }
            return (rows + [.init("keys", key, live: false)], { try self.storage.deleteKey(id: key, integrity: $0); return true })
        }
    }

    /// The key's record, or nil when there is none.
    ///
    /// Throws KeyUnavailableException when the stored record fails its integrity check.
    public func record(_ id: KeyID, caching: Bool = true) throws(KMSError) -> KeyRecord? {
        let (hit, seen) = cache.withLock { ($0.get(id)?.record, $0.mutations) }
        if let hit { return hit }
        let row: StoredRow?
        do { row = try storage.key(id: id.description) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        guard let row else { try checkNotRemoved("keys", id.description, id); return nil }
        let record: KeyRecord = try open(row, table: "keys", rowKey: id.description)
        guard record.keyID == id else { throw Self.tampered(id) }
        // A key kmsd deleted keeps a tombstone; its rows back beside it were restored from an
        // older copy of the keystore (authentic, but rolled back): refused.
        let tombstone: StoredRow?
        do { tombstone = try storage.tombstone(id: id.description) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        if tombstone != nil {
            throw KMSError(.keyUnavailable, "key \(id) was deleted, yet its record is back in the keystore: an older copy was restored over it. The key is refused; restore the keystore from its latest backup")
        }
        if caching {
            let evicted = cache.withLock { cache in
                cache.mutations == seen && cache.peek(id) == nil && cache.put(id, CachedKey(record: record, versions: [:]))
            }
            // Keys that were cached are not any more: counted as a change (`changes`).
            if evicted { noteChange() }
        }
        return record
    }

    /// The unwrapped material of one version, from the cache or the keystore.
    ///
    /// Throws KeyUnavailableException when the row or the wrapped material fails to verify.
    public func material(_ id: KeyID, version: UInt32) throws(KMSError) -> SecureBytes? {
        if let hit = cache.withLock({ $0.get(id)?.versions[version] }) { return hit }
        let row: StoredRow?
        do { row = try storage.version(id: id.description, number: version) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        guard let row else { try checkNotRemoved("key_versions", "\(id)/\(version)", id); return nil }
        let stored: KeyVersionRecord = try open(row, table: "key_versions", rowKey: "\(id)/\(version)")
        guard stored.keyID == id, stored.version == version else { throw Self.tampered(id) }
        let material: SecureBytes
        do {
            material = try unwrap(stored.wrappedMaterial, keyID: id, version: version, spec: stored.keySpec)
        } catch {
            throw Self.tampered(id)
        }
        cache.withLock { cache in
            if var entry = cache.get(id) {
                entry.versions[version] = material
                cache.put(id, entry)
            }
        }
        return material
    }

    /// True when the key's record and the material of `version` (nil: the current version)
    /// are in the cache, so using it touches no storage.
    public func isCached(_ id: KeyID, version: UInt32? = nil) -> Bool {
        cache.withLock { cache in
            guard let entry = cache.peek(id) else { return false }
            return entry.versions[version ?? entry.record.currentVersion] != nil
        }
    }

    /// Key ids in ascending order after `after`: all of them, or those indexed under `owner`.
    /// A row whose id is not a key id was not written by kmsd: KeyUnavailableException.
    public func keyIDs(owner: UInt32? = nil, after: KeyID?, limit: Int) throws(KMSError) -> [KeyID] {
        let rows: [String]
        do { rows = try storage.keyIDs(owner: owner, after: after?.description, limit: limit) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        var ids: [KeyID] = []
        for row in rows {
            guard let id = try? KeyID(parsing: row), id.description == row else {
                throw KMSError(.keyUnavailable, "the keystore holds a row that kmsd did not write: it was modified outside kmsd; restore it from a backup")
            }
            ids.append(id)
        }
        return ids
    }

    /// Number of keys whose unwrapped material is cached.
    public var cachedKeys: Int { cache.withLock { $0.count } }

    // MARK: - Wrapping and authentication

    static func materialAAD(keyID: KeyID, version: UInt32, spec: KeySpec) -> [UInt8] {
        var aad = materialLabel + keyID.bytes
        aad.appendBigEndian(version)
        aad.appendLengthPrefixed(Array(spec.rawValue.utf8))
        return aad
    }

    func wrap(_ material: SecureBytes, keyID: KeyID, version: UInt32, spec: KeySpec) throws -> [UInt8] {
        let nonce = try SecureRandom.bytes(AESGCM.nonceBytes)
        let aad = Self.materialAAD(keyID: keyID, version: version, spec: spec)
        let sealed = try material.withUnsafeBytes { m in
            try AESGCM.seal(key: root.wrappingKey, nonce: nonce, plaintext: m, aad: aad)
        }
        return nonce + sealed
    }

    func unwrap(_ wrapped: [UInt8], keyID: KeyID, version: UInt32, spec: KeySpec) throws -> SecureBytes {
        guard wrapped.count > AESGCM.nonceBytes + AESGCM.tagBytes else { throw CryptoError.authenticationFailure }
        return try AESGCM.open(key: root.wrappingKey, nonce: Array(wrapped[0..<AESGCM.nonceBytes]),
                               sealed: Array(wrapped[AESGCM.nonceBytes...]),
                               aad: Self.materialAAD(keyID: keyID, version: version, spec: spec))
    }

    func macInput(table: String, rowKey: String, generation: UInt64, record: [UInt8]) -> [UInt8] {
        Self.macInput(keystoreID: keystoreID, table: table, rowKey: rowKey, generation: generation, record: record)
    }

    /// `lp(keystore id) ‖ lp(table) ‖ lp(row key) ‖ [lp(u64be generation)] ‖ record`;
    /// keystores from before per-keystore ids (nil) had no first part, rows from before
    /// generations (0) no generation part (a record is JSON, so it never begins like one).
    static func macInput(keystoreID: [UInt8]?, table: String, rowKey: String, generation: UInt64 = 0, record: [UInt8]) -> [UInt8] {
        var data: [UInt8] = []
        if let keystoreID { data.appendLengthPrefixed(keystoreID) }
        data.appendLengthPrefixed(Array(table.utf8))
        data.appendLengthPrefixed(Array(rowKey.utf8))
        if generation > 0 {
            var g: [UInt8] = []
            g.appendBigEndian(generation)
            data.appendLengthPrefixed(g)
        }
        return data + record
    }

    func seal<T: Encodable>(_ value: T, table: String, rowKey: String, generation: UInt64) throws -> StoredRow {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        encoder.dateEncodingStrategy = .secondsSince1970
        let bytes = Array(try encoder.encode(value))
        let mac = try HMAC.authenticate(key: root.recordMACKey, data: macInput(table: table, rowKey: rowKey, generation: generation, record: bytes))
        return StoredRow(record: bytes, mac: mac, generation: generation)
    }

    /// One write to the keystore. Under the integrity lock, `plan` gets the generation to
    /// write at, seals its rows with it, and names every row it writes or deletes (each once);
    /// its `apply` runs the storage write with those rows' index entries and the index's new
    /// digest, in one transaction. The in-memory digest moves on only once that committed
    /// (and `apply` returned true). Every caller counts a change when it is done (`noteChange`).
    @discardableResult
    func commit(_ plan: (UInt64) throws -> (rows: [RowIndex.Touch], apply: (IntegrityWrite) throws -> Bool)) throws -> Bool {
        try integrity.withLock { state in
            let generation = state.generation + 1
            let p = try plan(generation)
            let old = try storage.indexEntries(p.rows.map { (table: $0.table, rowKey: $0.rowKey) })
            var next = state
            next.generation = generation
            for e in old { next.toggle(e, key: indexKey) }
            for t in p.rows { next.toggle(IndexEntry(table: t.table, rowKey: t.rowKey, generation: generation, live: t.live), key: indexKey) }
            guard try p.apply(IntegrityWrite(entries: p.rows.map { IndexEntry(table: $0.table, rowKey: $0.rowKey, generation: generation, live: $0.live) },
                                             meta: try next.encoded(key: indexKey, keystoreID: keystoreID))) else { return false }
            state = next
            return true
        }
    }

    /// The record of an authenticated row; `failure` (default: the key named by the row key is
    /// tampered) when its MAC or its contents do not check out.
    func open<T: Decodable>(_ row: StoredRow, table: String, rowKey: String, orElse failure: KMSError? = nil) throws(KMSError) -> T {
        let failed = failure ?? Self.tampered((try? KeyID(parsing: String(rowKey.prefix(36)))) ?? KeyID(bytes: [UInt8](repeating: 0, count: 16)))
        let valid = (try? HMAC.isValid(row.mac, key: root.recordMACKey,
                                       data: macInput(table: table, rowKey: rowKey, generation: row.generation, record: row.record))) ?? false
        guard valid else { throw failed }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .secondsSince1970
        guard let value = try? decoder.decode(T.self, from: Data(row.record)) else { throw failed }
        // Authentic, but is it the latest? Its generation must be the one the row index holds
        // for it, and the index entry must be trustworthy (its bucket matched at startup).
        let distrusted = suspectBuckets[RowIndex.bucket(table: table, rowKey: rowKey)].map { row.generation <= $0 } ?? false
        guard !distrusted, let entry = row.index, entry.live, entry.generation == row.generation else {
            throw Self.rolledBack(table: table, rowKey: rowKey, row: row, suspect: distrusted)
        }
        return value
    }

    /// A row that is missing although the row index says kmsd last wrote it and did not
    /// delete it was removed outside kmsd: KeyUnavailableException, not "never existed".
    func checkNotRemoved(_ table: String, _ rowKey: String, _ id: KeyID) throws(KMSError) {
        let entries: [IndexEntry]
        do { entries = try storage.indexEntries([(table: table, rowKey: rowKey)]) } catch {
            throw KMSError(.internalError, "the keystore could not be read (\(error)); see the daemon's log")
        }
        guard let e = entries.first, e.live else { return }
        let what = table == "keys" ? "record of key \(id)" : "version \(rowKey.split(separator: "/").last ?? "") of key \(id)"
        throw KMSError(.keyUnavailable, "the stored \(what) is missing although kmsd never deleted it (generation \(e.generation)): it was removed outside kmsd. It is refused; restore the keystore from its latest backup")
    }

    static func rolledBack(table: String, rowKey: String, row: StoredRow, suspect: Bool) -> KMSError {
        let what = switch table {
        case "keys": "record of key \(rowKey)"
        case "key_versions": "version \(rowKey.split(separator: "/").last ?? "") of key \(rowKey.split(separator: "/").first ?? "")"
        case "aliases": "alias \(rowKey)"
        case "grants": "grant \(rowKey.prefix(16))…"
        default: "deletion record of key \(rowKey)"
        }
        let why: String
        if suspect {
            why = "the keystore's row index did not match its authenticated digest when kmsd started, so no row it covers can be trusted to be the latest"
        } else if let e = row.index, !e.live {
            why = "kmsd deleted it (generation \(e.generation)), yet an older copy is back"
        } else if let e = row.index {
            why = "it is from generation \(row.generation) but kmsd last wrote it at generation \(e.generation): an older copy was put back"
        } else {
            why = "kmsd has no record of writing it: it was put there from elsewhere"
        }
        return KMSError(.keyUnavailable, "the stored \(what) was rolled back: \(why). It is refused; restore the keystore from its latest backup")
    }

    static func tampered(_ id: KeyID) -> KMSError {
        KMSError(.keyUnavailable, "the stored record of key \(id) failed its integrity check: the keystore was modified outside kmsd. The key is refused; restore the keystore from a backup")
    }
}

struct CachedKey {
    var record: KeyRecord
    var versions: [UInt32: SecureBytes]
}

/// A small least-recently-used map. Eviction drops the entry, which zeroes its key material.
struct LRUCache {
    let capacity: Int
    private var entries: [KeyID: (value: CachedKey, tick: UInt64)] = [:]
    private var tick: UInt64 = 0
    /// Counts changes to stored keys (update, rotate, destroy, delete). A record read from
    /// storage is cached only if none happened since the read began, so a slow reader cannot
    /// put back a record that a change has already replaced.
    var mutations: UInt64 = 0

    init(capacity: Int) { self.capacity = capacity }

    var count: Int { entries.count }

    /// Looks without counting as a use.
    func peek(_ id: KeyID) -> CachedKey? { entries[id]?.value }

    mutating func get(_ id: KeyID) -> CachedKey? {
        // One hash lookup; the entry's use is noted in place.
        guard let i = entries.index(forKey: id) else { return nil }
        tick += 1
        entries.values[i].tick = tick
        return entries.values[i].value
    }

    mutating func remove(_ id: KeyID) { entries[id] = nil }

    /// True when it evicted other keys to make room.
    @discardableResult
    mutating func put(_ id: KeyID, _ value: CachedKey) -> Bool {
        tick += 1
        var evicted = false
        if entries[id] == nil, entries.count >= capacity {
            // Evict the least recently used eighth at once, so eviction stays cheap per insert.
            let victims = entries.sorted { $0.value.tick < $1.value.tick }.prefix(max(1, capacity / 8))
            for v in victims { entries[v.key] = nil }
            evicted = true
        }
        entries[id] = (value, tick)
        return evicted
    }
}
