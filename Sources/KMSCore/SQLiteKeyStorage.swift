import CSQLite
import Foundation
import Synchronization

/// The embedded keystore backend: one SQLite file in WAL mode with synchronous=FULL, so a
/// committed transaction survives kill -9 and power loss.
///
/// Writes go through one connection; reads through a small pool of their own (WAL lets readers
/// run beside the writer), so one caller's slow reads do not queue everyone else's.
public final class SQLiteKeyStorage: KeyStorage {
    public let path: String
    private let db: Mutex<Connection>
    private let readers: ConnectionPool

    /// One SQLite connection, used by one thread at a time (the writer's mutex, the reader
    /// pool). Its prepared statements are kept by SQL text and reused: preparing a statement
    /// (parsing the SQL) costs more than running it.
    final class Connection: @unchecked Sendable {
        let handle: OpaquePointer
        private var statements: [String: OpaquePointer] = [:]
        /// Statements kept per connection at most (kmsd's SQL is a fixed set well below it).
        static let statementCacheLimit = 128

        init(_ h: OpaquePointer) { handle = h }

        /// A prepared statement for `sql`, reset and unbound; hand it back with `finish`.
        func statement(_ sql: String) -> (OpaquePointer?, Int32) {
            if let cached = statements.removeValue(forKey: sql) { return (cached, SQLITE_OK) }
            var stmt: OpaquePointer?
            let rc = sqlite3_prepare_v2(handle, sql, -1, &stmt, nil)
            return (stmt, rc)
        }

        /// Resets `stmt` (ending its read, releasing its snapshot) and keeps it for reuse.
        func finish(_ stmt: OpaquePointer, sql: String) {
            sqlite3_reset(stmt)
            sqlite3_clear_bindings(stmt)
            if statements.count < Self.statementCacheLimit, statements[sql] == nil {
                statements[sql] = stmt
            } else {
                sqlite3_finalize(stmt)
            }
        }

        deinit {
            for stmt in statements.values { sqlite3_finalize(stmt) }
            sqlite3_close_v2(handle)
        }
    }

    /// Opens (creating if needed) the database at `path` with mode 0600.
    ///
    /// Throws StorageError when the file cannot be opened or is not a kmsd keystore.
    public init(path: String, readConnections: Int = 4) throws {
        self.path = path
        let oldMask = umask(0o077)
        defer { umask(oldMask) }
        let conn = try Self.open(path, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
        for sql in [
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=FULL",
            "PRAGMA foreign_keys=ON",
            "PRAGMA secure_delete=ON",
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
            "CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, record BLOB NOT NULL, mac BLOB NOT NULL, owner_uid INTEGER)",
            "CREATE TABLE IF NOT EXISTS key_versions (key_id TEXT NOT NULL REFERENCES keys(key_id), version INTEGER NOT NULL, record BLOB NOT NULL, mac BLOB NOT NULL, PRIMARY KEY (key_id, version))",
            "CREATE TABLE IF NOT EXISTS deleted_keys (key_id TEXT PRIMARY KEY, record BLOB NOT NULL, mac BLOB NOT NULL)",
            "CREATE TABLE IF NOT EXISTS aliases (alias_name TEXT PRIMARY KEY, key_id TEXT NOT NULL, record BLOB NOT NULL, mac BLOB NOT NULL)",
            "CREATE INDEX IF NOT EXISTS aliases_by_key ON aliases (key_id, alias_name)",
            "CREATE TABLE IF NOT EXISTS grants (grant_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, retiring TEXT, record BLOB NOT NULL, mac BLOB NOT NULL, gen INTEGER)",
            "CREATE INDEX IF NOT EXISTS grants_by_key ON grants (key_id, grant_id)",
            "CREATE INDEX IF NOT EXISTS grants_by_retiring ON grants (retiring, grant_id) WHERE retiring IS NOT NULL",
        ] {
            try Self.exec(conn, sql, path: path)
        }
        // Keystores written before the owner index: add the column (filled by KeyRepository's
        // migration from the authenticated records).
        let columns = try Self.query(conn, "PRAGMA table_info(keys)", [], path: path) { String(cString: sqlite3_column_text($0, 1)) }
        if !columns.contains("owner_uid") {
            try Self.exec(conn, "ALTER TABLE keys ADD COLUMN owner_uid INTEGER", path: path)
        }
        if !columns.contains("deletion_due") {
            try Self.exec(conn, "ALTER TABLE keys ADD COLUMN deletion_due INTEGER", path: path)
        }
        if !columns.contains("rotation_due") {
            try Self.exec(conn, "ALTER TABLE keys ADD COLUMN rotation_due INTEGER", path: path)
        }
        if !columns.contains("state") {
            // Key states for counting only (Status): the authenticated record stays the authority.
            try Self.exec(conn, "ALTER TABLE keys ADD COLUMN state TEXT", path: path)
            try Self.exec(conn, "UPDATE keys SET state = json_extract(CAST(record AS TEXT), '$.state')", path: path)
        }
        if !columns.contains("expiry_due") {
            try Self.exec(conn, "ALTER TABLE keys ADD COLUMN expiry_due INTEGER", path: path)
        }
        try Self.exec(conn, "CREATE INDEX IF NOT EXISTS keys_by_expiry ON keys (expiry_due) WHERE expiry_due IS NOT NULL", path: path)
        try Self.exec(conn, "CREATE INDEX IF NOT EXISTS keys_by_rotation ON keys (rotation_due) WHERE rotation_due IS NOT NULL", path: path)
        // Generations and the row index (rollback detection); rows from before have gen NULL.
        try Self.exec(conn, "CREATE TABLE IF NOT EXISTS row_index (tbl TEXT NOT NULL, row_key TEXT NOT NULL, gen INTEGER NOT NULL, live INTEGER NOT NULL, PRIMARY KEY (tbl, row_key))", path: path)
        for table in ["keys", "key_versions", "aliases", "deleted_keys"] {
            let cols = try Self.query(conn, "PRAGMA table_info(\(table))", [], path: path) { String(cString: sqlite3_column_text($0, 1)) }
            if !cols.contains("gen") { try Self.exec(conn, "ALTER TABLE \(table) ADD COLUMN gen INTEGER", path: path) }
        }
        try Self.exec(conn, "CREATE INDEX IF NOT EXISTS keys_by_owner ON keys (owner_uid, key_id)", path: path)
        try Self.exec(conn, "CREATE INDEX IF NOT EXISTS keys_by_deletion ON keys (deletion_due) WHERE deletion_due IS NOT NULL", path: path)
        db = Mutex(conn)
        var pool: [Connection] = []
        for _ in 0..<max(1, readConnections) {
            let reader = try Self.open(path, flags: SQLITE_OPEN_READONLY)
            try Self.exec(reader, "PRAGMA foreign_keys=ON", path: path)
            pool.append(reader)
        }
        readers = ConnectionPool(pool)
    }

    private static func open(_ path: String, flags: Int32) throws -> Connection {
        var handle: OpaquePointer?
        let rc = sqlite3_open_v2(path, &handle, flags | SQLITE_OPEN_FULLMUTEX, nil)
        guard rc == SQLITE_OK, let handle else {
            let msg = handle.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            if let handle { sqlite3_close_v2(handle) }
            throw StorageError("cannot open keystore \(path): \(msg)")
        }
        sqlite3_busy_timeout(handle, 5000)
        return Connection(handle)
    }

    private func write<T>(_ body: (Connection) throws -> T) throws -> T {
        try db.withLock { conn in try body(conn) }
    }

    private func transaction(_ body: (Connection) throws -> Void) throws {
        try write { conn in
            try Self.exec(conn, "BEGIN IMMEDIATE", path: path)
            do {
                try body(conn)
                try Self.exec(conn, "COMMIT", path: path)
            } catch {
                try? Self.exec(conn, "ROLLBACK", path: path)
                throw error
            }
        }
    }

    public func insertKey(id: String, owner: UInt32, key: StoredRow, version: (number: UInt32, row: StoredRow)?, integrity: IntegrityWrite) throws {
        try transaction(integrity) { conn in
            try Self.run(conn, "INSERT INTO keys (key_id, record, mac, owner_uid, gen, state) VALUES (?1, ?2, ?3, ?4, ?5, json_extract(CAST(?2 AS TEXT), '$.state'))",
                         [.text(id), .blob(key.record), .blob(key.mac), .int(Int64(owner)), Self.gen(key)], path: path)
            if let version {
                try Self.run(conn, "INSERT INTO key_versions (key_id, version, record, mac, gen) VALUES (?1, ?2, ?3, ?4, ?5)",
                             [.text(id), .int(Int64(version.number)), .blob(version.row.record), .blob(version.row.mac), Self.gen(version.row)], path: path)
            }
        }
    }

    public func deleteKey(id: String, integrity: IntegrityWrite) throws {
        try transaction(integrity) { conn in
            try Self.run(conn, "DELETE FROM key_versions WHERE key_id = ?1", [.text(id)], path: path)
            try Self.run(conn, "DELETE FROM keys WHERE key_id = ?1", [.text(id)], path: path)
        }
    }

    public func updateKey(id: String, key: StoredRow, due: KeyDue, integrity: IntegrityWrite) throws {
        try transaction(integrity) { conn in try setKey(conn, id: id, key: key, due: due) }
    }

    /// Replaces a key's record and its due-work columns; inside a transaction.
    private func setKey(_ conn: Connection, id: String, key: StoredRow, due: KeyDue) throws {
        func value(_ v: Int64?) -> Value { v.map { .int($0) } ?? .null }
        try Self.run(conn, "UPDATE keys SET record = ?2, mac = ?3, deletion_due = ?4, rotation_due = ?5, expiry_due = ?6, gen = ?7, state = json_extract(CAST(?2 AS TEXT), '$.state') WHERE key_id = ?1",
                     [.text(id), .blob(key.record), .blob(key.mac), value(due.deletion), value(due.rotation), value(due.expiry), Self.gen(key)], path: path)
        guard sqlite3_changes(conn.handle) == 1 else { throw StorageError("keystore \(path): key \(id) is not there to update") }
    }

    public func addVersion(id: String, key: StoredRow, due: KeyDue, versionNumber: UInt32, version: StoredRow, integrity: IntegrityWrite) throws {
        try transaction(integrity) { conn in
            try Self.run(conn, "INSERT INTO key_versions (key_id, version, record, mac, gen) VALUES (?1, ?2, ?3, ?4, ?5)",
                         [.text(id), .int(Int64(versionNumber)), .blob(version.record), .blob(version.mac), Self.gen(version)], path: path)
            try setKey(conn, id: id, key: key, due: due)
        }
    }

    public func removeVersions(id: String, key: StoredRow, due: KeyDue, integrity: IntegrityWrite) throws {
        try transaction(integrity) { conn in
            try Self.run(conn, "DELETE FROM key_versions WHERE key_id = ?1", [.text(id)], path: path)
            try setKey(conn, id: id, key: key, due: due)
        }
    }

    public func keysDueForExpiry(at time: Int64, limit: Int) throws -> [String] {
        try readers.with { conn in
            try Self.query(conn, "SELECT key_id FROM keys WHERE expiry_due IS NOT NULL AND expiry_due <= ?1 ORDER BY expiry_due LIMIT ?2",
                           [.int(time), .int(Int64(limit))], path: path) { stmt in String(cString: sqlite3_column_text(stmt, 0)) }
        }
    }

    public func versions(id: String) throws -> [(number: UInt32, row: StoredRow)] {
        try readers.with { conn in
            try Self.query(conn, "SELECT v.record, v.mac, v.gen, i.gen, i.live, v.version FROM key_versions v LEFT JOIN row_index i ON i.tbl = 'key_versions' AND i.row_key = v.key_id || '/' || v.version WHERE v.key_id = ?1 ORDER BY v.version",
                           [.text(id)], path: path) { stmt in
                (number: UInt32(truncatingIfNeeded: sqlite3_column_int64(stmt, 5)), row: Self.row(stmt, table: "key_versions", rowKey: "\(id)/\(sqlite3_column_int64(stmt, 5))"))
            }
        }
    }

    public func keysDueForRotation(at time: Int64, limit: Int) throws -> [String] {
        try readers.with { conn in
            try Self.query(conn, "SELECT key_id FROM keys WHERE rotation_due IS NOT NULL AND rotation_due <= ?1 ORDER BY rotation_due LIMIT ?2",
                           [.int(time), .int(Int64(limit))], path: path) { stmt in String(cString: sqlite3_column_text(stmt, 0)) }
        }
    }

    public func destroyKey(id: String, dueBy time: Int64, tombstone: StoredRow, integrity: IntegrityWrite) throws -> Bool {
        var destroyed = false
        try write { conn in
            try Self.exec(conn, "BEGIN IMMEDIATE", path: path)
            do {
                // Checked inside the write transaction: no cancellation can slip in between.
                let due = try Self.query(conn, "SELECT 1 FROM keys WHERE key_id = ?1 AND deletion_due IS NOT NULL AND deletion_due <= ?2",
                                         [.text(id), .int(time)], path: path) { _ in true }
                if !due.isEmpty {
                    try Self.run(conn, "DELETE FROM aliases WHERE key_id = ?1", [.text(id)], path: path)
                    try Self.run(conn, "DELETE FROM grants WHERE key_id = ?1", [.text(id)], path: path)
                    try Self.run(conn, "DELETE FROM key_versions WHERE key_id = ?1", [.text(id)], path: path)
                    try Self.run(conn, "DELETE FROM keys WHERE key_id = ?1", [.text(id)], path: path)
                    try Self.run(conn, "INSERT OR REPLACE INTO deleted_keys (key_id, record, mac, gen) VALUES (?1, ?2, ?3, ?4)",
                                 [.text(id), .blob(tombstone.record), .blob(tombstone.mac), Self.gen(tombstone)], path: path)
                    try applyIntegrity(conn, integrity)
                    destroyed = true
                }
                try Self.exec(conn, "COMMIT", path: path)
            } catch {
                try? Self.exec(conn, "ROLLBACK", path: path)
                throw error
            }
        }
        return destroyed
    }

    public func insertAlias(name: String, keyID: String, row: StoredRow, integrity: IntegrityWrite) throws {
        try transaction(integrity) { conn in
            try Self.run(conn, "INSERT INTO aliases (alias_name, key_id, record, mac, gen) VALUES (?1, ?2, ?3, ?4, ?5)",
                         [.text(name), .text(keyID), .blob(row.record), .blob(row.mac), Self.gen(row)], path: path)
        }
    }

    public func updateAlias(name: String, keyID: String, row: StoredRow, integrity: IntegrityWrite) throws {
        try transaction(integrity) { conn in
            try Self.run(conn, "UPDATE aliases SET key_id = ?2, record = ?3, mac = ?4, gen = ?5 WHERE alias_name = ?1",
                         [.text(name), .text(keyID), .blob(row.record), .blob(row.mac), Self.gen(row)], path: path)
            guard sqlite3_changes(conn.handle) == 1 else { throw StorageError("keystore \(path): alias \(name) is not there to update") }
        }
    }

    public func deleteAlias(name: String, integrity: IntegrityWrite) throws {
        try transaction(integrity) { conn in
            try Self.run(conn, "DELETE FROM aliases WHERE alias_name = ?1", [.text(name)], path: path)
        }
    }

    public func alias(name: String) throws -> StoredRow? {
        try readers.with { conn in
            try Self.query(conn, "SELECT a.record, a.mac, a.gen, i.gen, i.live FROM aliases a LEFT JOIN row_index i ON i.tbl = 'aliases' AND i.row_key = a.alias_name WHERE a.alias_name = ?1",
                           [.text(name)], path: path) { Self.row($0, table: "aliases", rowKey: name) }.first
        }
    }

    public func aliasNames(keyID: String?, after: String?, limit: Int) throws -> [String] {
        try readers.with { conn in
            if let keyID {
                return try Self.query(conn, "SELECT alias_name FROM aliases WHERE key_id = ?1 AND alias_name > ?2 ORDER BY alias_name LIMIT ?3",
                                      [.text(keyID), .text(after ?? ""), .int(Int64(limit))], path: path) { String(cString: sqlite3_column_text($0, 0)) }
            }
            return try Self.query(conn, "SELECT alias_name FROM aliases WHERE alias_name > ?1 ORDER BY alias_name LIMIT ?2",
                                  [.text(after ?? ""), .int(Int64(limit))], path: path) { String(cString: sqlite3_column_text($0, 0)) }
        }
    }

    public func aliasCount(keyID: String) throws -> Int {
        try readers.with { conn in
            try Self.query(conn, "SELECT count(*) FROM aliases WHERE key_id = ?1", [.text(keyID)], path: path) { Int(sqlite3_column_int64($0, 0)) }.first ?? 0
        }
    }

    public func tombstone(id: String) throws -> StoredRow? {
        try readers.with { conn in
            try Self.query(conn, "SELECT d.record, d.mac, d.gen, i.gen, i.live FROM deleted_keys d LEFT JOIN row_index i ON i.tbl = 'deleted_keys' AND i.row_key = d.key_id WHERE d.key_id = ?1",
                           [.text(id)], path: path) { Self.row($0, table: "deleted_keys", rowKey: id) }.first
        }
    }

    public func keysDueForDeletion(at time: Int64, limit: Int) throws -> [String] {
        try readers.with { conn in
            try Self.query(conn, "SELECT key_id FROM keys WHERE deletion_due IS NOT NULL AND deletion_due <= ?1 ORDER BY deletion_due LIMIT ?2",
                           [.int(time), .int(Int64(limit))], path: path) { stmt in String(cString: sqlite3_column_text(stmt, 0)) }
        }
    }

    public func key(id: String) throws -> StoredRow? {
        try readers.with { conn in
            try Self.query(conn, "SELECT k.record, k.mac, k.gen, i.gen, i.live FROM keys k LEFT JOIN row_index i ON i.tbl = 'keys' AND i.row_key = k.key_id WHERE k.key_id = ?1",
                           [.text(id)], path: path) { Self.row($0, table: "keys", rowKey: id) }.first
        }
    }

    public func version(id: String, number: UInt32) throws -> StoredRow? {
        try readers.with { conn in
            try Self.query(conn, "SELECT v.record, v.mac, v.gen, i.gen, i.live FROM key_versions v LEFT JOIN row_index i ON i.tbl = 'key_versions' AND i.row_key = ?3 WHERE v.key_id = ?1 AND v.version = ?2",
                           [.text(id), .int(Int64(number)), .text("\(id)/\(number)")], path: path) { Self.row($0, table: "key_versions", rowKey: "\(id)/\(number)") }.first
        }
    }

    public func keyIDs(owner: UInt32?, after: String?, limit: Int) throws -> [String] {
        try readers.with { conn in
            if let owner {
                return try Self.query(conn, "SELECT key_id FROM keys WHERE owner_uid = ?1 AND key_id > ?2 ORDER BY key_id LIMIT ?3",
                                      [.int(Int64(owner)), .text(after ?? ""), .int(Int64(limit))], path: path) { stmt in
                    String(cString: sqlite3_column_text(stmt, 0))
                }
            }
            return try Self.query(conn, "SELECT key_id FROM keys WHERE key_id > ?1 ORDER BY key_id LIMIT ?2",
                                  [.text(after ?? ""), .int(Int64(limit))], path: path) { stmt in
                String(cString: sqlite3_column_text(stmt, 0))
            }
        }
    }

    public func meta(_ name: String) throws -> [UInt8]? {
        try write { conn in
            try Self.query(conn, "SELECT value FROM meta WHERE name = ?1", [.text(name)], path: path) { Self.blob($0, 0) }.first
        }
    }

    public func setMeta(_ name: String, _ value: [UInt8]) throws {
        try write { conn in
            try Self.run(conn, "INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                         [.text(name), .blob(value)], path: path)
        }
    }

    public func keyCountsByState() throws -> [String: Int] {
        let rows = try readers.with { conn in
            try Self.query(conn, "SELECT coalesce(state, ''), count(*) FROM keys GROUP BY state", [], path: path) {
                (String(cString: sqlite3_column_text($0, 0)), Int(sqlite3_column_int64($0, 1)))
            }
        }
        return Dictionary(rows, uniquingKeysWith: +)
    }

    /// A consistent copy of the whole keystore at `path` (a new file), taken in one read
    /// transaction (`VACUUM INTO`) while writes go on; for backups.
    public func snapshot(to path: String) throws {
        try readers.with { conn in try Self.run(conn, "VACUUM INTO ?1", [.text(path)], path: self.path) }
    }

    /// The number of keys (every state) in a snapshot file, read without touching the keystore.
    public static func keyCount(snapshot path: String) throws -> Int {
        let conn = try open(path, flags: SQLITE_OPEN_READONLY)
        return try query(conn, "SELECT count(*) FROM keys", [], path: path) { Int(sqlite3_column_int64($0, 0)) }.first ?? 0
    }

    // MARK: - Grants

    public func insertGrant(id: String, keyID: String, retiring: String?, row: StoredRow, integrity: IntegrityWrite) throws {
        try transaction(integrity) { conn in
            try Self.run(conn, "INSERT INTO grants (grant_id, key_id, retiring, record, mac, gen) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                         [.text(id), .text(keyID), retiring.map { .text($0) } ?? .null, .blob(row.record), .blob(row.mac), Self.gen(row)], path: path)
        }
    }

    public func deleteGrant(id: String, integrity: IntegrityWrite) throws -> Bool {
        var deleted = false
        try write { conn in
            try Self.exec(conn, "BEGIN IMMEDIATE", path: path)
            do {
                try Self.run(conn, "DELETE FROM grants WHERE grant_id = ?1", [.text(id)], path: path)
                deleted = sqlite3_changes(conn.handle) == 1
                if deleted { try applyIntegrity(conn, integrity) }
                try Self.exec(conn, "COMMIT", path: path)
            } catch {
                try? Self.exec(conn, "ROLLBACK", path: path)
                throw error
            }
        }
        return deleted
    }

    public func grant(id: String) throws -> StoredRow? {
        try readers.with { conn in
            try Self.query(conn, "SELECT g.record, g.mac, g.gen, i.gen, i.live FROM grants g LEFT JOIN row_index i ON i.tbl = 'grants' AND i.row_key = g.grant_id WHERE g.grant_id = ?1",
                           [.text(id)], path: path) { Self.row($0, table: "grants", rowKey: id) }.first
        }
    }

    public func grants(keyID: String, after: String?, limit: Int) throws -> [(id: String, row: StoredRow)] {
        try readers.with { conn in
            try Self.query(conn, "SELECT g.record, g.mac, g.gen, i.gen, i.live, g.grant_id FROM grants g LEFT JOIN row_index i ON i.tbl = 'grants' AND i.row_key = g.grant_id WHERE g.key_id = ?1 AND g.grant_id > ?2 ORDER BY g.grant_id LIMIT ?3",
                           [.text(keyID), .text(after ?? ""), .int(Int64(limit))], path: path) { stmt in
                let id = String(cString: sqlite3_column_text(stmt, 5))
                return (id: id, row: Self.row(stmt, table: "grants", rowKey: id))
            }
        }
    }

    public func grantIDs(retiring: String, after: String?, limit: Int) throws -> [String] {
        try readers.with { conn in
            try Self.query(conn, "SELECT grant_id FROM grants WHERE retiring = ?1 AND grant_id > ?2 ORDER BY grant_id LIMIT ?3",
                           [.text(retiring), .text(after ?? ""), .int(Int64(limit))], path: path) { String(cString: sqlite3_column_text($0, 0)) }
        }
    }

    // MARK: - Row index

    public func indexEntries(_ rows: [(table: String, rowKey: String)]) throws -> [IndexEntry] {
        // Readers see every committed write, and writers commit under KeyRepository's integrity
        // lock before the next one reads here: no stale entry.
        try readers.with { conn in
            try rows.flatMap { r in
                try Self.query(conn, "SELECT gen, live FROM row_index WHERE tbl = ?1 AND row_key = ?2", [.text(r.table), .text(r.rowKey)], path: path) { stmt in
                    IndexEntry(table: r.table, rowKey: r.rowKey, generation: UInt64(bitPattern: sqlite3_column_int64(stmt, 0)),
                               live: sqlite3_column_int64(stmt, 1) != 0)
                }
            }
        }
    }

    public func forEachIndexEntry(_ body: (IndexEntry) throws -> Void) throws {
        try write { conn in
            let sql = "SELECT tbl, row_key, gen, live FROM row_index"
            let stmt = try Self.prepare(conn, sql, [], path: path)
            defer { conn.finish(stmt, sql: sql) }
            while true {
                let rc = sqlite3_step(stmt)
                if rc == SQLITE_DONE { return }
                guard rc == SQLITE_ROW else { throw StorageError("keystore \(path): \(String(cString: sqlite3_errmsg(conn.handle))) (code \(rc))") }
                try body(IndexEntry(table: String(cString: sqlite3_column_text(stmt, 0)), rowKey: String(cString: sqlite3_column_text(stmt, 1)),
                                    generation: UInt64(bitPattern: sqlite3_column_int64(stmt, 2)), live: sqlite3_column_int64(stmt, 3) != 0))
            }
        }
    }

    public func allRowKeys() throws -> [(table: String, rowKey: String, generation: UInt64)] {
        try write { conn in
            try Self.query(conn, """
                SELECT 'keys', key_id, gen FROM keys UNION ALL SELECT 'key_versions', key_id || '/' || version, gen FROM key_versions
                UNION ALL SELECT 'aliases', alias_name, gen FROM aliases UNION ALL SELECT 'deleted_keys', key_id, gen FROM deleted_keys
                UNION ALL SELECT 'grants', grant_id, gen FROM grants
                """, [], path: path) { (table: String(cString: sqlite3_column_text($0, 0)), rowKey: String(cString: sqlite3_column_text($0, 1)),
                                         generation: UInt64(bitPattern: sqlite3_column_int64($0, 2))) }
        }
    }

    public func initializeIndex(_ integrity: IntegrityWrite) throws {
        try transaction(integrity) { _ in }
    }

    /// Writes a transaction's row-index entries and the index digest; inside the transaction.
    private func applyIntegrity(_ conn: Connection, _ integrity: IntegrityWrite) throws {
        for e in integrity.entries {
            try Self.run(conn, "INSERT INTO row_index (tbl, row_key, gen, live) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(tbl, row_key) DO UPDATE SET gen = excluded.gen, live = excluded.live",
                         [.text(e.table), .text(e.rowKey), .int(Int64(bitPattern: e.generation)), .int(e.live ? 1 : 0)], path: path)
        }
        try Self.run(conn, "INSERT INTO meta (name, value) VALUES ('integrity', ?1) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                     [.blob(integrity.meta)], path: path)
    }

    private func transaction(_ integrity: IntegrityWrite, _ body: (Connection) throws -> Void) throws {
        try transaction { conn in
            try body(conn)
            try applyIntegrity(conn, integrity)
        }
    }

    /// A row read with its index entry: columns record, mac, gen, index gen, index live.
    private static func row(_ stmt: OpaquePointer, table: String, rowKey: String) -> StoredRow {
        let indexed = sqlite3_column_type(stmt, 3) != SQLITE_NULL
        return StoredRow(record: blob(stmt, 0), mac: blob(stmt, 1), generation: UInt64(bitPattern: sqlite3_column_int64(stmt, 2)),
                         index: indexed ? IndexEntry(table: table, rowKey: rowKey, generation: UInt64(bitPattern: sqlite3_column_int64(stmt, 3)),
                                                     live: sqlite3_column_int64(stmt, 4) != 0) : nil)
    }

    private static func gen(_ row: StoredRow) -> Value { row.generation == 0 ? .null : .int(Int64(bitPattern: row.generation)) }

    public func allRows() throws -> (keys: [(id: String, row: StoredRow)], versions: [(id: String, number: UInt32, row: StoredRow)]) {
        try write { conn in
            let keys = try Self.query(conn, "SELECT key_id, record, mac FROM keys ORDER BY key_id", [], path: path) { stmt in
                (id: String(cString: sqlite3_column_text(stmt, 0)), row: StoredRow(record: Self.blob(stmt, 1), mac: Self.blob(stmt, 2)))
            }
            let versions = try Self.query(conn, "SELECT key_id, version, record, mac FROM key_versions ORDER BY key_id, version", [], path: path) { stmt in
                (id: String(cString: sqlite3_column_text(stmt, 0)), number: UInt32(truncatingIfNeeded: sqlite3_column_int64(stmt, 1)),
                 row: StoredRow(record: Self.blob(stmt, 2), mac: Self.blob(stmt, 3)))
            }
            return (keys, versions)
        }
    }

    public func migrate(keys: [(id: String, mac: [UInt8], owner: UInt32)], versions: [(id: String, number: UInt32, mac: [UInt8])],
                        meta: [(String, [UInt8])]) throws {
        try transaction { conn in
            for k in keys {
                try Self.run(conn, "UPDATE keys SET mac = ?2, owner_uid = ?3 WHERE key_id = ?1",
                             [.text(k.id), .blob(k.mac), .int(Int64(k.owner))], path: path)
            }
            for v in versions {
                try Self.run(conn, "UPDATE key_versions SET mac = ?3 WHERE key_id = ?1 AND version = ?2",
                             [.text(v.id), .int(Int64(v.number)), .blob(v.mac)], path: path)
            }
            for (name, value) in meta {
                try Self.run(conn, "INSERT INTO meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                             [.text(name), .blob(value)], path: path)
            }
        }
    }

    // MARK: - SQLite plumbing

    enum Value { case text(String), blob([UInt8]), int(Int64), null }

    private static func exec(_ conn: Connection, _ sql: String, path: String) throws {
        var err: UnsafeMutablePointer<CChar>?
        guard sqlite3_exec(conn.handle, sql, nil, nil, &err) == SQLITE_OK else {
            let msg = err.map { String(cString: $0) } ?? "unknown error"
            sqlite3_free(err)
            throw StorageError("keystore \(path): \(msg) (in: \(sql.prefix(40)))")
        }
    }

    private static func prepare(_ conn: Connection, _ sql: String, _ values: [Value], path: String) throws -> OpaquePointer {
        let (prepared, rc) = conn.statement(sql)
        guard rc == SQLITE_OK, let stmt = prepared else {
            if let prepared { sqlite3_finalize(prepared) }
            throw StorageError("keystore \(path): \(String(cString: sqlite3_errmsg(conn.handle)))")
        }
        for (i, v) in values.enumerated() {
            let idx = Int32(i + 1)
            switch v {
            case .text(let s): sqlite3_bind_text(stmt, idx, s, -1, kms_sqlite_transient())
            case .int(let n): sqlite3_bind_int64(stmt, idx, n)
            case .blob(let b): b.withUnsafeBytes { _ = sqlite3_bind_blob(stmt, idx, $0.baseAddress, Int32($0.count), kms_sqlite_transient()) }
            case .null: sqlite3_bind_null(stmt, idx)
            }
        }
        return stmt
    }

    private static func run(_ conn: Connection, _ sql: String, _ values: [Value], path: String) throws {
        let stmt = try prepare(conn, sql, values, path: path)
        defer { conn.finish(stmt, sql: sql) }
        let rc = sqlite3_step(stmt)
        guard rc == SQLITE_DONE else {
            throw StorageError("keystore \(path): \(String(cString: sqlite3_errmsg(conn.handle))) (code \(rc))")
        }
    }

    private static func query<T>(_ conn: Connection, _ sql: String, _ values: [Value], path: String,
                                 _ row: (OpaquePointer) -> T) throws -> [T] {
        let stmt = try prepare(conn, sql, values, path: path)
        defer { conn.finish(stmt, sql: sql) }
        var out: [T] = []
        while true {
            let rc = sqlite3_step(stmt)
            if rc == SQLITE_ROW { out.append(row(stmt)); continue }
            if rc == SQLITE_DONE { return out }
            throw StorageError("keystore \(path): \(String(cString: sqlite3_errmsg(conn.handle))) (code \(rc))")
        }
    }

    private static func blob(_ stmt: OpaquePointer, _ col: Int32) -> [UInt8] {
        let n = Int(sqlite3_column_bytes(stmt, col))
        guard n > 0, let p = sqlite3_column_blob(stmt, col) else { return [] }
        return Array(UnsafeRawBufferPointer(start: p, count: n))
    }
}

/// Read-only connections handed out one caller at a time; a caller waits only when every
/// connection is busy.
final class ConnectionPool: Sendable {
    private let free: Mutex<[SQLiteKeyStorage.Connection]>
    private let available: DispatchSemaphore

    init(_ connections: [SQLiteKeyStorage.Connection]) {
        free = Mutex(connections)
        available = DispatchSemaphore(value: connections.count)
    }

    func with<T>(_ body: (SQLiteKeyStorage.Connection) throws -> T) throws -> T {
        available.wait()
        let conn = free.withLock { $0.removeLast() }
        defer {
            free.withLock { $0.append(conn) }
            available.signal()
        }
        return try body(conn)
    }
}
