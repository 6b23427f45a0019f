import Foundation
import KMSCrypto
import KMSEnvelope
import Synchronization

/// Reuses data keys across messages, as the AWS Encryption SDK's caching cryptographic
/// materials manager does, so a client can encrypt at high rates without a kmsd round trip per
/// message (`KMSClient.encryptMessage(..., cache:)`).
///
/// A data key made for one kmsd key and one encryption context is used for at most
/// `maxMessages` messages, `maxBytes` bytes of plaintext (in all) and `maxAge`, whichever comes first;
/// then the next message gets a fresh one from GenerateDataKey. Data keys opened for
/// decryption are kept (by encrypted data key and context) for at most `maxAge`. The cache
/// holds at most `capacity` entries of each kind, dropping the least recently used; an entry
/// leaves as soon as it is used up, and expired entries are swept out at the next call after
/// they expire. Every data key is in locked memory (`SecureBytes`) and zeroed when its entry
/// goes (and no message still uses it). A cached data key skips kmsd: a key disabled or a
/// policy changed there takes effect for cached data keys only when they expire.
///
/// Reuse is safe for the format: each message still has its own random message id, so its own
/// derived key (PROTOCOL.md §16.2). The trade is the AWS one: fewer calls to kmsd (cheaper, and
/// fewer audit records: one GenerateDataKey record covers up to `maxMessages` messages) against
/// a longer life of each data key in this process.
public final class DataKeyCache: Sendable {
    public struct Limits: Sendable {
        /// Messages encrypted with one data key, 1 ... 2^32.
        public var maxMessages: UInt64
        /// Plaintext bytes encrypted with one data key.
        public var maxBytes: UInt64
        /// How long a data key is used (encryption) or kept (decryption).
        public var maxAge: Duration
        /// Entries kept, for encryption and for decryption each.
        public var capacity: Int

        public init(maxMessages: UInt64 = 1000, maxBytes: UInt64 = 1 << 30, maxAge: Duration = .seconds(60), capacity: Int = 100) {
            self.maxMessages = maxMessages
            self.maxBytes = maxBytes
            self.maxAge = maxAge
            self.capacity = capacity
        }
    }

    /// Counters, for tests and monitoring.
    public struct Statistics: Sendable, Equatable {
        public var encryptHits: UInt64 = 0
        public var encryptMisses: UInt64 = 0
        public var decryptHits: UInt64 = 0
        public var decryptMisses: UInt64 = 0
        public var entries: Int = 0
    }

    final class Entry: Sendable {
        let dataKey: SecureBytes
        let encryptedDataKey: [UInt8]
        let created: ContinuousClock.Instant

        init(dataKey: SecureBytes, encryptedDataKey: [UInt8], created: ContinuousClock.Instant = .now) {
            self.dataKey = dataKey
            self.encryptedDataKey = encryptedDataKey
            self.created = created
        }
    }

    struct Usage {
        let entry: Entry
        var messages: UInt64
        var bytes: UInt64
        var lastUse: UInt64
    }

    struct State {
        var encrypting: [[UInt8]: Usage] = [:]
        var decrypting: [[UInt8]: Usage] = [:]
        var tick: UInt64 = 0
        var statistics = Statistics()
        /// When the oldest entry expires: the next call from then on sweeps every expired entry
        /// out, so no data key outlives maxAge by more than the gap between two calls.
        var sweepAt: ContinuousClock.Instant?
    }

    /// Drops every expired entry (both tables) once the oldest is due; returns them, to be
    /// released outside the lock.
    private func sweep(_ st: inout State, now: ContinuousClock.Instant) -> [Entry] {
        guard let due = st.sweepAt, now >= due else { return [] }
        var dropped: [Entry] = []
        var oldest: ContinuousClock.Instant?
        for table in [\State.encrypting, \State.decrypting] {
            for (slot, usage) in st[keyPath: table] {
                if now - usage.entry.created >= limits.maxAge {
                    dropped.append(usage.entry)
                    st[keyPath: table][slot] = nil
                } else if oldest.map({ usage.entry.created < $0 }) ?? true {
                    oldest = usage.entry.created
                }
            }
        }
        st.sweepAt = oldest.map { $0 + limits.maxAge }
        return dropped
    }

    private func scheduleSweep(_ st: inout State, for entry: Entry) {
        let due = entry.created + limits.maxAge
        if st.sweepAt.map({ due < $0 }) ?? true { st.sweepAt = due }
    }

    public let limits: Limits
    private let state = Mutex(State())

    public init(limits: Limits = Limits()) throws {
        guard limits.maxMessages >= 1, limits.maxMessages <= 1 << 32 else {
            throw KMSError(.validation, "maxMessages must be 1...\(UInt64(1) << 32)")
        }
        guard limits.maxBytes >= 1 else { throw KMSError(.validation, "maxBytes must be at least 1") }
        guard limits.maxAge > .zero else { throw KMSError(.validation, "maxAge must be positive") }
        guard limits.capacity >= 1 else { throw KMSError(.validation, "capacity must be at least 1") }
        self.limits = limits
    }

    public var statistics: Statistics {
        state.withLock { st in
            var s = st.statistics
            s.entries = st.encrypting.count + st.decrypting.count
            return s
        }
    }

    /// Drops every entry (their data keys are zeroed).
    public func removeAll() {
        let dropped = state.withLock { st in
            let all = (Array(st.encrypting.values) + Array(st.decrypting.values)).map(\.entry)
            st.encrypting.removeAll()
            st.decrypting.removeAll()
            return all
        }
        _ = dropped  // released here, outside the lock
    }

    /// The partition of a data key for encryption: kmsd key and canonical context.
    static func encryptionSlot(keyID: String, canonicalContext: [UInt8]) -> [UInt8] {
        var slot: [UInt8] = []
        slot.appendBE(UInt32(keyID.utf8.count))
        slot += Array(keyID.utf8)
        slot += canonicalContext
        return slot
    }

    /// The partition for decryption: the encrypted data key, its context, and the key id the
    /// caller restricts to (a data key opened without a restriction is not reused under one).
    static func decryptionSlot(encryptedDataKey: [UInt8], canonicalContext: [UInt8], keyID: String) -> [UInt8] {
        var slot: [UInt8] = []
        slot.appendBE(UInt32(encryptedDataKey.count))
        slot += encryptedDataKey
        slot += canonicalContext  // self-delimiting (§9.3)
        slot += Array(keyID.utf8)
        return slot
    }

    /// A cached data key for one more message of `bytes` bytes, counted against its limits;
    /// nil when there is none usable (expired or used up entries are dropped).
    /// An entry that reaches a limit with this message is dropped at once (the caller's
    /// reference keeps its key for this one message).
    func takeForEncryption(slot: [UInt8], bytes: UInt64) -> Entry? {
        let now = ContinuousClock.now
        let (entry, dropped): (Entry?, [Entry]) = state.withLock { st in
            var dropped = sweep(&st, now: now)
            // usage.bytes <= maxBytes always, so the subtraction cannot wrap.
            guard var usage = st.encrypting[slot], now - usage.entry.created < limits.maxAge,
                  usage.messages < limits.maxMessages, bytes <= limits.maxBytes - usage.bytes else {
                if let stale = st.encrypting.removeValue(forKey: slot) { dropped.append(stale.entry) }
                st.statistics.encryptMisses += 1
                return (nil, dropped)
            }
            st.tick += 1
            usage.messages += 1
            usage.bytes += bytes
            usage.lastUse = st.tick
            if usage.messages >= limits.maxMessages || usage.bytes >= limits.maxBytes {
                st.encrypting[slot] = nil
            } else {
                st.encrypting[slot] = usage
            }
            st.statistics.encryptHits += 1
            return (usage.entry, dropped)
        }
        _ = dropped
        return entry
    }

    /// Keeps a fresh data key that was just used for one message of `bytes` bytes (unless that
    /// message alone reached a limit).
    func storeForEncryption(slot: [UInt8], entry: Entry, bytes: UInt64) {
        guard limits.maxMessages > 1, bytes < limits.maxBytes else { return }
        let evicted: [Entry] = state.withLock { st in
            scheduleSweep(&st, for: entry)
            st.tick += 1
            let old = st.encrypting.updateValue(Usage(entry: entry, messages: 1, bytes: bytes, lastUse: st.tick), forKey: slot)
            return (old.map { [$0.entry] } ?? []) + Self.evict(&st.encrypting, capacity: limits.capacity)
        }
        _ = evicted
    }

    func takeForDecryption(slot: [UInt8]) -> Entry? {
        let now = ContinuousClock.now
        let (entry, dropped): (Entry?, [Entry]) = state.withLock { st in
            var dropped = sweep(&st, now: now)
            guard var usage = st.decrypting[slot], now - usage.entry.created < limits.maxAge else {
                if let stale = st.decrypting.removeValue(forKey: slot) { dropped.append(stale.entry) }
                st.statistics.decryptMisses += 1
                return (nil, dropped)
            }
            st.tick += 1
            usage.lastUse = st.tick
            usage.messages += 1
            st.decrypting[slot] = usage
            st.statistics.decryptHits += 1
            return (usage.entry, dropped)
        }
        _ = dropped
        return entry
    }

    func storeForDecryption(slot: [UInt8], entry: Entry) {
        let evicted: [Entry] = state.withLock { st in
            scheduleSweep(&st, for: entry)
            st.tick += 1
            let old = st.decrypting.updateValue(Usage(entry: entry, messages: 1, bytes: 0, lastUse: st.tick), forKey: slot)
            return (old.map { [$0.entry] } ?? []) + Self.evict(&st.decrypting, capacity: limits.capacity)
        }
        _ = evicted
    }

    /// Removes least recently used entries beyond `capacity`; returns them (to be released
    /// outside the lock).
    private static func evict(_ table: inout [[UInt8]: Usage], capacity: Int) -> [Entry] {
        var out: [Entry] = []
        while table.count > capacity, let oldest = table.min(by: { $0.value.lastUse < $1.value.lastUse }) {
            out.append(oldest.value.entry)
            table[oldest.key] = nil
        }
        return out
    }
}
