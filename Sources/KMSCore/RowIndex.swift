import Foundation
import KMSCrypto

/// Rollback detection for the keystore.
///
/// Every row MAC already proves a row is authentic; it cannot prove the row is the *latest*
/// one kmsd wrote (an older copy from a backup or a snapshot is just as authentic). So:
///
/// - every write transaction takes the next **generation** (a counter); every row it writes
///   carries that generation inside its MAC;
/// - the **row index** holds, for every row kmsd ever wrote (table, row key), the generation
///   of its latest write and whether it still exists (deleted rows keep an entry);
/// - the index is covered by an authenticated **digest** (meta "integrity"): 256 buckets, each
///   the XOR of HMAC(index key, entry) over its entries, and an HMAC over the generation, the
///   buckets and the buckets found untrustworthy before, bound to the keystore id.
///
/// Reading a row checks its generation against its index entry: an older copy of the row
/// (a deleted key's row, a disabled key's old Enabled row, an alias's old target) is refused
/// with KeyUnavailableException. At startup the index is checked against the digest; a bucket
/// whose entries were changed (say, an older copy of the row *and* of its index entry) is
/// untrustworthy: every row in it that was last written at or before the generation of that
/// moment is refused, for good (the digest records it); rows kmsd writes after are not. Restoring an
/// entire older keystore file is beyond this: nothing in the file can tell; that needs a
/// counter outside it.
public enum RowIndex {
    public static let bucketCount = 256
    static let metaMagic = Array("KMI1".utf8)

    /// A row a write touches: written (live) or deleted.
    public struct Touch: Sendable {
        public let table: String
        public let rowKey: String
        public let live: Bool
        public init(_ table: String, _ rowKey: String, live: Bool) { self.table = table; self.rowKey = rowKey; self.live = live }
    }

    /// The bucket of a row: FNV-1a of its table and key (not secret, only spreads rows).
    static func bucket(table: String, rowKey: String) -> UInt8 {
        var h: UInt32 = 2_166_136_261
        for b in table.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        h = (h ^ 0) &* 16_777_619
        for b in rowKey.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return UInt8(truncatingIfNeeded: h ^ (h >> 8) ^ (h >> 16) ^ (h >> 24))
    }

    /// What an entry's leaf MACs: lp(table) ‖ lp(row key) ‖ u64be generation ‖ live.
    static func leafInput(_ e: IndexEntry, into data: inout [UInt8]) {
        data.removeAll(keepingCapacity: true)
        data.appendBigEndian(UInt32(e.table.utf8.count))
        data.append(contentsOf: e.table.utf8)
        data.appendBigEndian(UInt32(e.rowKey.utf8.count))
        data.append(contentsOf: e.rowKey.utf8)
        data.appendBigEndian(e.generation)
        data.append(e.live ? 1 : 0)
    }

    static func leaf(_ e: IndexEntry, key: SecureBytes) throws -> [UInt8] {
        var data: [UInt8] = []
        leafInput(e, into: &data)
        return try HMAC.authenticate(key: key, data: data)
    }

    /// Loads and checks the row index at startup; builds it for a keystore from before.
    static func open(_ storage: any KeyStorage, key: SecureBytes, keystoreID: [UInt8]) throws -> (IntegrityState, IntegrityReport) {
        var computed = IntegrityState()
        var entries = 0
        var newestEntry: UInt64 = 0
        // One keyed context and one scratch buffer for every entry (a keystore of a million
        // keys has two million or more): this scan is most of the time to READY.
        let mac = try KeyedHMAC(key: key)
        var input: [UInt8] = []
        input.reserveCapacity(256)
        var leaf = [UInt8](repeating: 0, count: 32)
        try storage.forEachIndexEntry { e in
            entries += 1
            newestEntry = max(newestEntry, e.generation)
            leafInput(e, into: &input)
            try input.withUnsafeBytes { i in try leaf.withUnsafeMutableBytes { try mac.authenticate(i, into: $0) } }
            computed.xor(leaf, into: bucket(table: e.table, rowKey: e.rowKey))
        }
        guard let meta = try storage.meta("integrity") else {
            let rows = try storage.allRowKeys()
            if entries == 0, rows.allSatisfy({ $0.generation == 0 }) {
                // A keystore from before generations: index every row as it is now.
                var state = IntegrityState()
                let built = rows.map { IndexEntry(table: $0.table, rowKey: $0.rowKey, generation: 0, live: true) }
                for e in built { state.toggle(e, key: key) }
                try storage.initializeIndex(IntegrityWrite(entries: built, meta: try state.encoded(key: key, keystoreID: keystoreID)))
                return (state, IntegrityReport(entries: built.count, suspectBuckets: 0, built: true, problem: nil))
            }
            // Rows carry generations, so there was a digest: it was removed.
            return try distrustAll(computed, newest: newestEntry, storage: storage, key: key, keystoreID: keystoreID, entries: entries,
                                   problem: "the row index's digest is missing from a keystore that had one")
        }
        guard let stored = IntegrityState(decoding: meta, key: key, keystoreID: keystoreID) else {
            return try distrustAll(computed, newest: newestEntry, storage: storage, key: key, keystoreID: keystoreID, entries: entries,
                                   problem: "the row index's digest failed its integrity check")
        }
        var state = computed
        state.generation = max(stored.generation, newestEntry)
        state.suspect = stored.suspect
        var newlySuspect = 0
        for b in 0..<bucketCount where computed.bucket(b) != stored.bucket(b) || newestEntry > stored.generation {
            state.suspect[UInt8(b)] = state.generation
            newlySuspect += 1
        }
        var problem: String? = nil
        if newestEntry > stored.generation { problem = "the row index holds entries newer than its digest" }
        if newlySuspect > 0 {
            problem = problem ?? "\(newlySuspect) of \(bucketCount) row-index buckets do not match their authenticated digest"
            // Kept suspect from now on, even if their rows are written again.
            try storage.initializeIndex(IntegrityWrite(entries: [], meta: try state.encoded(key: key, keystoreID: keystoreID)))
        }
        return (state, IntegrityReport(entries: entries, suspectBuckets: state.suspect.count, built: false, problem: problem))
    }

    private static func distrustAll(_ computed: IntegrityState, newest: UInt64, storage: any KeyStorage, key: SecureBytes,
                                    keystoreID: [UInt8], entries: Int, problem: String) throws -> (IntegrityState, IntegrityReport) {
        var state = computed
        state.generation = newest
        for b in 0..<bucketCount { state.suspect[UInt8(b)] = newest }
        try storage.initializeIndex(IntegrityWrite(entries: [], meta: try state.encoded(key: key, keystoreID: keystoreID)))
        return (state, IntegrityReport(entries: entries, suspectBuckets: bucketCount, built: false, problem: problem))
    }
}

/// What the startup check of the row index found.
public struct IntegrityReport: Sendable {
    public let entries: Int
    /// Buckets (of 256) whose rows are refused.
    public let suspectBuckets: Int
    /// True when the index was built now, for a keystore from before generations.
    public let built: Bool
    /// What was wrong, when something was.
    public let problem: String?
}

/// The keystore's generation and the row index's digest, as kept in memory and in meta.
struct IntegrityState: Sendable {
    var generation: UInt64 = 0
    private var buckets = [UInt8](repeating: 0, count: RowIndex.bucketCount * 32)
    /// Untrustworthy buckets: rows in them last written at or before the generation are refused.
    var suspect: [UInt8: UInt64] = [:]

    init() {}

    func bucket(_ b: Int) -> ArraySlice<UInt8> { buckets[(b * 32)..<(b * 32 + 32)] }

    mutating func xor(_ leaf: [UInt8], into b: UInt8) {
        let base = Int(b) * 32
        for i in 0..<32 { buckets[base + i] ^= leaf[i] }
    }

    /// Adds an entry to its bucket, or takes it out (XOR both ways).
    mutating func toggle(_ e: IndexEntry, key: SecureBytes) {
        guard let leaf = try? RowIndex.leaf(e, key: key) else { return }
        xor(leaf, into: RowIndex.bucket(table: e.table, rowKey: e.rowKey))
    }

    /// magic ‖ u64be generation ‖ 256 × 32 bucket bytes ‖ 256 × u64be suspect-up-to generation
    /// (0: trusted) ‖ HMAC.
    func encoded(key: SecureBytes, keystoreID: [UInt8]) throws -> [UInt8] {
        var out = RowIndex.metaMagic
        out.appendBigEndian(generation)
        out += buckets
        for b in 0..<RowIndex.bucketCount { out.appendBigEndian(suspect[UInt8(b)] ?? 0) }
        return out + (try HMAC.authenticate(key: key, data: Self.macInput(out, keystoreID: keystoreID)))
    }

    static func macInput(_ body: [UInt8], keystoreID: [UInt8]) -> [UInt8] {
        var data = Array("kmsd/v1/row-index-digest".utf8)
        data.appendLengthPrefixed(keystoreID)
        return data + body
    }

    /// nil when the bytes are not a digest this keystore's root key made.
    init?(decoding bytes: [UInt8], key: SecureBytes, keystoreID: [UInt8]) {
        let bodyCount = 4 + 8 + RowIndex.bucketCount * 32 + RowIndex.bucketCount * 8
        guard bytes.count == bodyCount + 32, Array(bytes[0..<4]) == RowIndex.metaMagic else { return nil }
        let body = Array(bytes[0..<bodyCount])
        guard (try? HMAC.isValid(Array(bytes[bodyCount...]), key: key, data: Self.macInput(body, keystoreID: keystoreID))) == true else { return nil }
        generation = bytes[4..<12].reduce(0) { $0 << 8 | UInt64($1) }
        buckets = Array(bytes[12..<(12 + RowIndex.bucketCount * 32)])
        let base = 12 + RowIndex.bucketCount * 32
        for b in 0..<RowIndex.bucketCount {
            let g = bytes[(base + b * 8)..<(base + b * 8 + 8)].reduce(0) { $0 << 8 | UInt64($1) }
            if g > 0 { suspect[UInt8(b)] = g }
        }
    }
}

extension Array where Element == UInt8 {
    mutating func appendBigEndian(_ v: UInt64) {
        for shift in stride(from: 56, through: 0, by: -8) { append(UInt8((v >> UInt64(shift)) & 0xff)) }
    }
}
