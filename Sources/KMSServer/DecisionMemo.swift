import KMSCore
import KMSProtocol

/// The access decisions one connection's Encrypt, GenerateDataKey(WithoutPlaintext) and
/// Decrypt requests were last allowed, used again for the same request shape while nothing a
/// decision reads has changed.
///
/// A decision is a function of the caller (fixed for a connection: its credentials are read
/// once, when it connects), the action, the key's record (state, policy, owner, tags), the
/// key's grants, the aliases, the identity policies, the administrators and the request's
/// encryption context. `KeyRepository.changeCount` moves on after every change to any of those
/// has completed; an entry is used only while the count is the one read before its decision
/// was made, so a revoked grant, a new policy, a disabled key or a reload takes effect from the
/// next request on, exactly as without the memo. Only allowed decisions on keys named by key
/// id (never an alias) are kept; a refusal is decided afresh every time.
///
/// An entry also keeps what the handler derives from the context (the validated canonical
/// form and the audit text), so a repeated request does neither again. The audit record of a
/// request answered from the memo is the same as if it had been decided afresh.
///
/// Used on the connection's event loop only (the requests handled there); bounded: a few
/// entries, each with a small context.
final class DecisionMemo: @unchecked Sendable {
    /// A class: a hit hands out one reference, not a copy of every field.
    final class Entry {
        let changeCount: UInt64
        let action: String
        /// Encrypt, GenerateDataKey(WithoutPlaintext): the key identifier as sent.
        let keyText: String
        /// Decrypt: the key the ciphertext names.
        let blobKey: KeyID?
        /// The encryption context as sent, pair by pair.
        let context: [WirePair]
        let record: KeyRecord
        /// What the decision noted for the audit record.
        let keyIDText: String
        let keyState: String
        let decidedBy: String
        let contextValues: Bool
        let encryptionContext: EncryptionContext
        let contextText: String
        /// The key version whose material, with the key's record and grants, was cached when
        /// the entry was made (nil: not all of it was). `KeyRepository.changeCount` also moves
        /// when keys leave the cache, so while the entry is valid they are still cached.
        let storageFreeVersion: UInt32?

        init(changeCount: UInt64, action: String, keyText: String, blobKey: KeyID?, context: [WirePair], record: KeyRecord,
             keyIDText: String, keyState: String, decidedBy: String, contextValues: Bool,
             encryptionContext: EncryptionContext, contextText: String, storageFreeVersion: UInt32?) {
            self.changeCount = changeCount
            self.action = action
            self.keyText = keyText
            self.blobKey = blobKey
            self.context = context
            self.record = record
            self.keyIDText = keyIDText
            self.keyState = keyState
            self.decidedBy = decidedBy
            self.contextValues = contextValues
            self.encryptionContext = encryptionContext
            self.contextText = contextText
            self.storageFreeVersion = storageFreeVersion
        }
    }

    static let capacity = 4
    /// Requests with a larger context (canonical form) are decided afresh each time.
    static let maxContextBytes = 512

    private var entries: [Entry] = []
    private var nextSlot = 0

    func lookup(action: String, keyText: String, blobKey: KeyID?, context: [WirePair], changeCount: UInt64) -> Entry? {
        for e in entries where e.changeCount == changeCount && e.blobKey == blobKey && e.keyText == keyText
            && e.action == action && e.context == context {
            return e
        }
        return nil
    }

    /// Whether a valid entry shows that using the key named by `keyText` (Encrypt,
    /// GenerateDataKey) needs no storage: its record, current material and grants are cached.
    func storageFree(keyText: String, changeCount: UInt64) -> Bool {
        entries.contains { $0.changeCount == changeCount && $0.blobKey == nil && $0.storageFreeVersion != nil && $0.keyText == keyText }
    }

    /// The same for a ciphertext of `version` of key `blobKey` (Decrypt).
    func storageFree(blobKey: KeyID, version: UInt32, changeCount: UInt64) -> Bool {
        entries.contains { $0.changeCount == changeCount && $0.storageFreeVersion == version && $0.blobKey == blobKey }
    }

    func store(_ entry: Entry) {
        guard entry.encryptionContext.canonicalBytes.count <= Self.maxContextBytes else { return }
        // A newer entry means this decision straddled a change: it could never be used. Entries
        // of an older count can never be used again.
        if entries.contains(where: { $0.changeCount > entry.changeCount }) { return }
        entries.removeAll { $0.changeCount < entry.changeCount }
        if entries.count < Self.capacity {
            entries.append(entry)
        } else {
            entries[nextSlot % Self.capacity] = entry
            nextSlot &+= 1
        }
    }
}
