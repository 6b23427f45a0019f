/// When a key's scheduled work comes due (Unix seconds), for the sweeps' indexes; nil: none.
public struct KeyDue: Sendable, Equatable {
    public var deletion: Int64?
    public var rotation: Int64?
    public var expiry: Int64?
    public init(deletion: Int64? = nil, rotation: Int64? = nil, expiry: Int64? = nil) {
        self.deletion = deletion; self.rotation = rotation; self.expiry = expiry
    }
}

/// One stored row: the record's bytes and the MAC that authenticates them.
public struct StoredRow: Sendable, Equatable {
    public var record: [UInt8]
    public var mac: [UInt8]
    public init(record: [UInt8], mac: [UInt8]) { self.record = record; self.mac = mac }
}

/// The storage backend behind the keystore: rows in, rows out, durably.
///
/// Backends know nothing of crypto: `KeyRepository` authenticates every row and wraps all key
/// material before a backend sees it. Every write returns only once it is durable. SQLite is
/// the embedded default; a shared PostgreSQL backend can implement the same protocol later.
public protocol KeyStorage: Sendable {
    /// Inserts a key and its first version (none for a key awaiting imported material)
    /// atomically. Throws when the key id exists.
    /// `owner` feeds the owner index (ListKeys); the record itself stays the authority.
    func insertKey(id: String, owner: UInt32, key: StoredRow, version: (number: UInt32, row: StoredRow)?) throws
    /// Removes a key and all its versions atomically (undo of a CreateKey whose audit record
    /// could not be written).
    func deleteKey(id: String) throws
    /// Replaces a key's record; `due` indexes its scheduled work.
    func updateKey(id: String, key: StoredRow, due: KeyDue) throws
    /// Adds a version and replaces the key's record, in one transaction.
    func addVersion(id: String, key: StoredRow, due: KeyDue, versionNumber: UInt32, version: StoredRow) throws
    /// Deletes every version of a key (its imported material) and replaces its record, in one
    /// transaction.
    func removeVersions(id: String, key: StoredRow, due: KeyDue) throws
    /// Ids of keys whose imported material expires at or before `time` (Unix seconds).
    func keysDueForExpiry(at time: Int64, limit: Int) throws -> [String]
    /// Every version row of a key, ascending.
    func versions(id: String) throws -> [(number: UInt32, row: StoredRow)]
    /// Ids of keys whose automatic rotation is due at or before `time` (Unix seconds).
    func keysDueForRotation(at time: Int64, limit: Int) throws -> [String]
    /// Deletes a key and every version and leaves its tombstone, in one transaction, if the
    /// key is still due for deletion at `time` (Unix seconds); false when it is not (say, its
    /// deletion was cancelled meanwhile).
    func destroyKey(id: String, dueBy time: Int64, tombstone: StoredRow) throws -> Bool
    func tombstone(id: String) throws -> StoredRow?
    /// Ids of keys pending deletion whose deletion time is at or before `time` (Unix seconds).
    func keysDueForDeletion(at time: Int64, limit: Int) throws -> [String]
    /// Inserts an alias row; throws when the name exists.
    func insertAlias(name: String, keyID: String, row: StoredRow) throws
    /// Replaces an alias row (its target may change).
    func updateAlias(name: String, keyID: String, row: StoredRow) throws
    func deleteAlias(name: String) throws
    func alias(name: String) throws -> StoredRow?
    /// Alias names in ascending order after `after`, all or those of one key.
    func aliasNames(keyID: String?, after: String?, limit: Int) throws -> [String]
    func aliasCount(keyID: String) throws -> Int
    func key(id: String) throws -> StoredRow?
    func version(id: String, number: UInt32) throws -> StoredRow?
    /// Key ids in ascending order, strictly after `after` (nil = from the start); only those
    /// indexed under `owner` when it is given. Costs what the page costs, not the keystore.
    func keyIDs(owner: UInt32?, after: String?, limit: Int) throws -> [String]
    func meta(_ name: String) throws -> [UInt8]?
    func setMeta(_ name: String, _ value: [UInt8]) throws

    /// Every row, for a one-time migration.
    func allRows() throws -> (keys: [(id: String, row: StoredRow)], versions: [(id: String, number: UInt32, row: StoredRow)])
    /// Replaces MACs and owner index entries and sets meta values, all in one transaction.
    func migrate(keys: [(id: String, mac: [UInt8], owner: UInt32)], versions: [(id: String, number: UInt32, mac: [UInt8])],
                 meta: [(String, [UInt8])]) throws
}

/// A storage failure (I/O, corruption, a full disk); the message names the file and the cause.
public struct StorageError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}
