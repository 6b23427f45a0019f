/// When a key's scheduled work comes due (Unix seconds), for the sweeps' indexes; nil: none.
public struct KeyDue: Sendable, Equatable {
    public var deletion: Int64?
    public var rotation: Int64?
    public var expiry: Int64?
    public init(deletion: Int64? = nil, rotation: Int64? = nil, expiry: Int64? = nil) {
        self.deletion = deletion; self.rotation = rotation; self.expiry = expiry
    }
}

/// One stored row: the record's bytes, the MAC that authenticates them, and the generation
/// (the keystore's write counter when the row was written; 0 for rows from before
/// generations). On reads, `index` is the row's entry in the row index, if it has one.
public struct StoredRow: Sendable, Equatable {
    public var record: [UInt8]
    public var mac: [UInt8]
    public var generation: UInt64
    public var index: IndexEntry?
    public init(record: [UInt8], mac: [UInt8], generation: UInt64 = 0, index: IndexEntry? = nil) {
        self.record = record; self.mac = mac; self.generation = generation; self.index = index
    }
}

/// The row index: for every row kmsd ever wrote (table and row key), the generation of its
/// latest write and whether it still exists. A row whose own generation differs from its
/// entry's is an older copy put back (rolled back); the entries themselves are covered by an
/// authenticated digest (`IntegrityWrite.meta`), checked when kmsd starts.
public struct IndexEntry: Sendable, Equatable, Hashable {
    public var table: String
    public var rowKey: String
    public var generation: UInt64
    public var live: Bool
    public init(table: String, rowKey: String, generation: UInt64, live: Bool) {
        self.table = table; self.rowKey = rowKey; self.generation = generation; self.live = live
    }
}

/// What a write adds to the row index, and the new authenticated digest of the whole index
/// (meta "integrity"); applied in the write's own transaction.
public struct IntegrityWrite: Sendable {
    public var entries: [IndexEntry]
    public var meta: [UInt8]
    public init(entries: [IndexEntry], meta: [UInt8]) { self.entries = entries; self.meta = meta }
}

/// The storage backend behind the keystore: rows in, rows out, durably.
///
/// Backends know nothing of crypto: `KeyRepository` authenticates every row and wraps all key
/// material before a backend sees it. Every write returns only once it is durable, and applies
/// its `IntegrityWrite` in the same transaction. SQLite is the embedded default; a shared
/// PostgreSQL backend can implement the same protocol later.
public protocol KeyStorage: Sendable {
    /// Inserts a key and its first version (none for a key awaiting imported material)
    /// atomically. Throws when the key id exists.
    /// `owner` feeds the owner index (ListKeys); the record itself stays the authority.
    func insertKey(id: String, owner: UInt32, key: StoredRow, version: (number: UInt32, row: StoredRow)?, integrity: IntegrityWrite) throws
    /// Removes a key and all its versions atomically (undo of a CreateKey whose audit record
    /// could not be written).
    func deleteKey(id: String, integrity: IntegrityWrite) throws
    /// Replaces a key's record; `due` indexes its scheduled work.
    func updateKey(id: String, key: StoredRow, due: KeyDue, integrity: IntegrityWrite) throws
    /// Adds a version and replaces the key's record, in one transaction.
    func addVersion(id: String, key: StoredRow, due: KeyDue, versionNumber: UInt32, version: StoredRow, integrity: IntegrityWrite) throws
    /// Deletes every version of a key (its imported material) and replaces its record, in one
    /// transaction.
    func removeVersions(id: String, key: StoredRow, due: KeyDue, integrity: IntegrityWrite) throws
    /// Ids of keys whose imported material expires at or before `time` (Unix seconds).
    func keysDueForExpiry(at time: Int64, limit: Int) throws -> [String]
    /// Every version row of a key, ascending.
    func versions(id: String) throws -> [(number: UInt32, row: StoredRow)]
    /// Ids of keys whose automatic rotation is due at or before `time` (Unix seconds).
    func keysDueForRotation(at time: Int64, limit: Int) throws -> [String]
    /// Deletes a key, every version, alias and grant of it, and leaves its tombstone, in one
    /// transaction, if the key is still due for deletion at `time` (Unix seconds); false (and
    /// nothing written) when it is not (say, its deletion was cancelled meanwhile).
    func destroyKey(id: String, dueBy time: Int64, tombstone: StoredRow, integrity: IntegrityWrite) throws -> Bool
    func tombstone(id: String) throws -> StoredRow?
    /// Ids of keys pending deletion whose deletion time is at or before `time` (Unix seconds).
    func keysDueForDeletion(at time: Int64, limit: Int) throws -> [String]
    /// Inserts an alias row; throws when the name exists.
    func insertAlias(name: String, keyID: String, row: StoredRow, integrity: IntegrityWrite) throws
    /// Replaces an alias row (its target may change).
    func updateAlias(name: String, keyID: String, row: StoredRow, integrity: IntegrityWrite) throws
    func deleteAlias(name: String, integrity: IntegrityWrite) throws
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

    /// How many keys are in each state (for Status; counts, not authenticated records).
    func keyCountsByState() throws -> [String: Int]

    /// Inserts a grant row.
    func insertGrant(id: String, keyID: String, retiring: String?, row: StoredRow, integrity: IntegrityWrite) throws
    /// Deletes a grant row; false when there was none.
    func deleteGrant(id: String, integrity: IntegrityWrite) throws -> Bool
    func grant(id: String) throws -> StoredRow?
    /// A key's grants in ascending id order after `after`.
    func grants(keyID: String, after: String?, limit: Int) throws -> [(id: String, row: StoredRow)]
    /// Ids of grants a retiring principal (as written) may retire, ascending after `after`.
    func grantIDs(retiring: String, after: String?, limit: Int) throws -> [String]

    /// The row-index entries of the given rows (those that have one).
    func indexEntries(_ rows: [(table: String, rowKey: String)]) throws -> [IndexEntry]
    /// Every row-index entry, streamed (startup check).
    func forEachIndexEntry(_ body: (IndexEntry) throws -> Void) throws
    /// The table, row key and generation of every stored row (building the index for an
    /// older keystore).
    func allRowKeys() throws -> [(table: String, rowKey: String, generation: UInt64)]
    /// Writes entries and the digest of a freshly built row index, in one transaction.
    func initializeIndex(_ integrity: IntegrityWrite) throws

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
