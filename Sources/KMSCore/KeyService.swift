import Foundation
import Synchronization
import KMSCrypto
import KMSProtocol

/// The operations on keys, independent of any transport. Each method checks access, does the
/// work and returns domain values; errors are `KMSError` with stable codes.
///
/// Access until the policy layer lands: administrators may create keys and use every key;
/// a key's creator (by uid) may use it; everyone else is denied.
/// Each key's compiled grants, and a count of grant changes: a list read from storage is
/// cached only if no grant changed meanwhile, so a revoked grant cannot be put back.
struct GrantCache {
    var entries: [KeyID: [CompiledGrant]] = [:]
    var changes: UInt64 = 0
}

public final class KeyService: Sendable {
    public let repository: KeyRepository
    /// This kmsd's region (multi-region keys).
    public let region: String
    /// Who administers kmsd (replaced whole when SIGHUP reloads the configuration).
    public var administrators: Administrators { administratorSet.withLock { $0 } }
    let administratorSet: Mutex<Administrators>

    /// The time kmsd goes by (injectable, so tests can move it).
    public let clock: @Sendable () -> Date
    /// Seconds in a "day" of a deletion window: 86400, shorter only in development mode.
    public let daySeconds: Int
    /// Outstanding GetParametersForImport answers (memory only).
    let importTokens = ImportTokens()
    /// Compiled key policies, so a request does not parse JSON.
    let compiledPolicies = Mutex<[KeyID: CompiledPolicy]>([:])
    /// Most keys the per-key caches derived from records (compiled policies, grants) hold
    /// before they are emptied: twice the key cache (at least 8192), so they are not emptied
    /// while the working set fits the key cache, and a key that is cached is cached whole.
    let derivedCacheLimit: Int

    /// Compiled policies by their text (bounded), shared by the keys whose policy it is.
    let policiesByText = Mutex<[String: KeyPolicy]>([:])
    /// Each key's grants, read once and kept until one of them changes.
    let grantCache = Mutex(GrantCache())
    /// The identity policies in force (replaced whole on reload).
    let identityPolicySet = Mutex(IdentityPolicySet())

    public init(repository: KeyRepository, administrators: Administrators,
                clock: @escaping @Sendable () -> Date = { Date() }, daySeconds: Int = 86_400, region: String = "local") {
        self.repository = repository
        self.region = region
        derivedCacheLimit = max(8192, 2 * repository.cacheCapacity)
        self.administratorSet = Mutex(administrators)
        self.clock = clock
        self.daySeconds = daySeconds
    }

    public func isAdministrator(_ p: Principal) -> Bool { administratorSet.withLock { $0.contains(p) } }

    public func setAdministrators(_ a: Administrators) {
        administratorSet.withLock { $0 = a }
        repository.noteChange()
    }

    // MARK: - Management

    public struct CreateKeyInput: Sendable {
        public var description = ""
        public var keyUsage = ""
        public var keySpec = ""
        public var tags: [Tag] = []
        /// Empty or AWS_KMS: kmsd generates the material; EXTERNAL: imported later.
        public var origin = ""
        /// A key policy; empty: the default (creator and administrators).
        public var policy = ""
        public var bypassPolicyLockoutSafetyCheck = false
        /// A multi-region key (`mrk-` id), primary in this kmsd's region.
        public var multiRegion = false
        public init() {}
    }

    /// Creates a SYMMETRIC_DEFAULT key owned by the caller. Who may is decided before (see
    /// `KeyService.mayCreateKeys`).
    public func createKey(_ input: CreateKeyInput, caller: Principal) throws(KMSError) -> KeyRecord {
        let spec = try Self.parse(KeySpec.self, input.keySpec, default: .symmetricDefault, field: "KeySpec")
        let usage = try Self.parse(KeyUsage.self, input.keyUsage, default: .encryptDecrypt, field: "KeyUsage")
        guard spec == .symmetricDefault else {
            throw KMSError(.unsupportedOperation, "KeySpec \(spec.rawValue) is not supported yet; this version creates SYMMETRIC_DEFAULT keys")
        }
        guard usage == .encryptDecrypt else {
            throw KMSError(.validation, "KeyUsage \(usage.rawValue) is not valid for KeySpec SYMMETRIC_DEFAULT; use ENCRYPT_DECRYPT")
        }
        guard input.description.utf8.count <= KMSLimits.maxDescriptionBytes else {
            throw KMSError(.validation, "Description is \(input.description.utf8.count) bytes; at most \(KMSLimits.maxDescriptionBytes) are allowed")
        }
        try Self.validate(tags: input.tags)
        let external: Bool
        switch input.origin {
        case "", KeyRecord.kmsOrigin: external = false
        case KeyRecord.externalOrigin: external = true
        case "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE":
            throw KMSError(.unsupportedOperation, "Origin \(input.origin) is not supported by kmsd; use AWS_KMS or EXTERNAL")
        default:
            throw KMSError(.validation, "Origin '\(input.origin.prefix(64))' is not a known value; use AWS_KMS or EXTERNAL")
        }
        if input.multiRegion && external {
            throw KMSError(.unsupportedOperation, "multi-region keys with imported material (Origin EXTERNAL) are not supported by kmsd")
        }
        var record = KeyRecord(keyID: input.multiRegion ? .randomMultiRegion() : .random(), createdAt: Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down)),
                               description: input.description, keyUsage: usage, keySpec: spec,
                               state: external ? .pendingImport : .enabled,
                               ownerUID: caller.uid, currentVersion: 1, tags: input.tags,
                               origin: external ? KeyRecord.externalOrigin : KeyRecord.kmsOrigin)
        if input.multiRegion {
            record.multiRegionKeyType = "PRIMARY"
            record.primaryRegion = region
            record.replicaRegions = []
        }
        if !input.policy.isEmpty {
            try checkNewPolicy(input.policy, for: record, caller: caller, bypass: input.bypassPolicyLockoutSafetyCheck)
            record.policy = input.policy
        }
        do {
            let material = external ? nil : try SecureBytes.random(count: 32)
            try repository.create(record, material: material)
        } catch let error as KMSError {
            throw error
        } catch {
            throw KMSError(.internalError, "the key could not be stored (\(error)); nothing was created")
        }
        return record
    }

    /// The metadata of a key the caller may use.
    public func describeKey(_ keyID: String, caller: Principal) throws(KMSError) -> KeyRecord {
        try usableRecord(resolve(keyID, caller: caller), caller: caller, needsEnabled: false)
    }

    /// One page of keys visible to the caller, the marker of the next page, and the keys left
    /// out because their stored record failed its integrity check (for the audit record).
    ///
    /// Administrators see every key id; anyone else the keys indexed under their uid, each
    /// confirmed against its authenticated record, so the cost follows the page, not the
    /// keystore. Markers are opaque, encrypted and bound to the caller (`makeTextMarker`), so a
    /// marker kmsd did not hand this caller is InvalidMarkerException and cannot be used to
    /// probe which key ids exist.
    public func listKeys(limit: Int, marker: String, caller: Principal) throws(KMSError) -> (keys: [KeyID], nextMarker: String?, skipped: [KeyID]) {
        let limit = limit == 0 ? KMSLimits.defaultListLimit : limit
        guard (1...KMSLimits.maxListLimit).contains(limit) else {
            throw KMSError(.validation, "Limit must be 1...\(KMSLimits.maxListLimit)")
        }
        var after: KeyID? = nil
        if let text = try Self.textMarker(marker, label: "keys", caller: caller, repository: repository) {
            after = try? KeyID(parsing: text)
        }
        let owner: UInt32? = isAdministrator(caller) ? nil : caller.uid
        var page: [KeyID] = []
        var skipped: [KeyID] = []
        // The index only narrows the search; each non-administrator entry is confirmed against
        // its authenticated record (an index entry edited to point at someone else's key does
        // not list it). A record that fails its check is left out and reported, not fatal.
        var exhausted = false
        while page.count < limit + 1, skipped.count < KMSLimits.maxListLimit {
            let ids = try repository.keyIDs(owner: owner, after: after, limit: limit + 1 - page.count)
            if ids.isEmpty { exhausted = true; break }
            for id in ids {
                after = id
                if owner == nil { page.append(id); continue }
                do {
                    if let r = try repository.record(id, caching: false), r.ownerUID == caller.uid { page.append(id) }
                } catch let e where e.code == .keyUnavailable {
                    skipped.append(id)
                }
            }
        }
        if page.count > limit {
            page.removeLast()
            return (page, page.last.flatMap { Self.makeTextMarker($0.description, label: "keys", caller: caller, repository: repository) }, skipped)
        }
        if !exhausted, page.count <= limit, let last = after {
            // Stopped early on many records that failed their check: the listing goes on after
            // the last key looked at, so no key goes unlisted.
            return (page, Self.makeTextMarker(last.description, label: "keys", caller: caller, repository: repository), skipped)
        }
        return (page, nil, skipped)
    }

    // MARK: - Lifecycle

    /// The outcome of a state change: the record before (to undo it) and after.
    public struct Change: Sendable {
        public let before: KeyRecord
        public let after: KeyRecord
    }

    /// Enabled or Disabled → Enabled. KMSInvalidStateException when PendingDeletion or
    /// PendingImport.
    public func enableKey(_ keyID: String, caller: Principal) throws(KMSError) -> Change {
        try change(keyID, caller: caller, action: "enable") { (r) throws(KMSError) in
            guard r.state == .enabled || r.state == .disabled else { throw Self.invalidState(r, "enabled") }
            r.state = .enabled
        }
    }

    /// Enabled or Disabled → Disabled. KMSInvalidStateException when PendingDeletion or
    /// PendingImport.
    public func disableKey(_ keyID: String, caller: Principal) throws(KMSError) -> Change {
        try change(keyID, caller: caller, action: "disable") { (r) throws(KMSError) in
            guard r.state == .enabled || r.state == .disabled else { throw Self.invalidState(r, "disabled") }
            r.state = .disabled
        }
    }

    /// Any state but PendingDeletion → PendingDeletion, deleted by kmsd after `windowDays`
    /// (7...30; 0 means 30) days.
    public func scheduleKeyDeletion(_ keyID: String, windowDays: UInt32, caller: Principal) throws(KMSError) -> Change {
        let days = try Self.days(windowDays, default: KMSLimits.defaultPendingWindowDays, in: KMSLimits.pendingWindowDays, field: "PendingWindowInDays")
        let now = clock()
        return try change(keyID, caller: caller, action: "schedule for deletion") { (r) throws(KMSError) in
            guard r.state != .pendingDeletion else {
                throw KMSError(.invalidState, "key \(r.keyID) is already pending deletion (on \(Self.date(r.deletionDate))); cancel it first to change the window")
            }
            if r.multiRegionKeyType == "PRIMARY", let replicas = r.replicaRegions, !replicas.isEmpty {
                throw KMSError(.invalidState, "key \(r.keyID) is the primary of replicas in \(replicas.joined(separator: ", ")): schedule their deletion there first and import each one's replica deletion notice here (kmsctl import-replica), or make another region the primary")
            }
            r.state = .pendingDeletion
            r.pendingWindowInDays = days
            r.deletionDate = date(days, after: now)
        }
    }

    /// PendingDeletion → Disabled (PendingImport for an EXTERNAL key without material), as
    /// AWS KMS does.
    public func cancelKeyDeletion(_ keyID: String, caller: Principal) throws(KMSError) -> Change {
        try change(keyID, caller: caller, action: "cancel the deletion of") { (r) throws(KMSError) in
            guard r.state == .pendingDeletion else {
                throw KMSError(.invalidState, "key \(r.keyID) is \(r.state.rawValue), not pending deletion; there is nothing to cancel")
            }
            // As AWS KMS: Disabled, or PendingImport for an EXTERNAL key without material.
            r.state = r.awaitsMaterial ? .pendingImport : .disabled
            r.deletionDate = nil
            r.pendingWindowInDays = nil
        }
    }

    /// A new description; not while PendingDeletion.
    public func updateKeyDescription(_ keyID: String, description: String, caller: Principal) throws(KMSError) -> Change {
        guard description.utf8.count <= KMSLimits.maxDescriptionBytes else {
            throw KMSError(.validation, "Description is \(description.utf8.count) bytes; at most \(KMSLimits.maxDescriptionBytes) are allowed")
        }
        return try change(keyID, caller: caller, action: "describe") { (r) throws(KMSError) in
            guard r.state != .pendingDeletion else { throw Self.invalidState(r, "described anew") }
            r.description = description
        }
    }

    /// Puts a record back as it was (undo of a change whose audit record was refused), unless
    /// another change has come since: that one is not reverted.
    public func restore(_ before: KeyRecord, ifCurrentIs after: KeyRecord) throws {
        try locked(before.keyID) {
            guard try repository.record(before.keyID) == after else { return }
            try repository.update(before)
        }
    }

    /// Changes to one key happen one at a time (read, change, write), so two concurrent
    /// changes cannot both start from the same record and one silently revert the other.
    private let keyLocks: [NSLock] = (0..<64).map { _ in NSLock() }
    /// Keys a sweep could not read (tampered, rolled back): passed over by later sweeps, so
    /// they cannot fill the head of the due-index query for good.
    let stuck = Mutex<Set<KeyID>>([])

    func locked<T, E: Error>(_ id: KeyID, _ body: () throws(E) -> T) throws(E) -> T {
        let lock = keyLocks[Int(id.lastByte) % keyLocks.count]
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    /// What a sweep of scheduled work did: the keys it handled, and those whose work failed
    /// (tried again at the next sweep).
    public struct Sweep<T> {
        public var done: [T] = []
        public var failures: [(key: KeyID, error: any Error)] = []
    }

    /// Scheduled work on every key `due` returns (asked for `limit` ids), one key at a time
    /// under its lock, on its record read again (it may have changed since it was found). A key
    /// whose record cannot be read is set aside for good (`stuck`, its row is refused anyway); a
    /// key whose work fails does not hold up the others and is tried again next time.
    func sweep<T>(due: (_ limit: Int) throws -> [KeyID], _ work: (KeyRecord) throws -> T?) throws -> Sweep<T> {
        let skip = stuck.withLock { $0 }
        var result = Sweep<T>()
        for id in try due(1000 + skip.count) where !skip.contains(id) {
            do {
                let done = try locked(id) { () throws -> T? in
                    guard let record = try? repository.record(id, caching: false) else {
                        stuck.withLock { _ = $0.insert(id) }
                        return nil
                    }
                    return try work(record)
                }
                if let done { result.done.append(done) }
            } catch {
                result.failures.append((id, error))
            }
        }
        return result
    }

    /// Deletes every key whose deletion time has come (a CancelKeyDeletion may have come in
    /// between: the record is read again).
    public func deleteDueKeys() throws -> Sweep<KeyID> {
        let now = clock()
        return try sweep(due: { try repository.dueForDeletion(at: now, limit: $0) }) { r in
            guard r.state == .pendingDeletion, let due = r.deletionDate, due <= now, try repository.destroy(r.keyID, at: now) else { return nil }
            forgetGrants(r.keyID)
            return r.keyID
        }
    }

    func change(_ keyID: String, caller: Principal, action: String,
                        _ body: (inout KeyRecord) throws(KMSError) -> Void) throws(KMSError) -> Change {
        let id = try KeyID(parsing: keyID)
        return try locked(id) { () throws(KMSError) -> Change in
            let before = try usableRecord(id, caller: caller, needsEnabled: false)
            var after = before
            try body(&after)
            guard after != before else { return Change(before: before, after: after) }
            do { try repository.update(after) } catch {
                throw KMSError(.internalError, "the key could not be updated (\(error)); nothing was changed")
            }
            return Change(before: before, after: after)
        }
    }

    /// A number of days from a request: 0 means `value`'s default; outside `range`, ValidationException.
    static func days(_ value: UInt32, default fallback: UInt32, in range: ClosedRange<UInt32>, field: String) throws(KMSError) -> UInt32 {
        let days = value == 0 ? fallback : value
        guard range.contains(days) else { throw KMSError(.validation, "\(field) must be \(range.lowerBound)...\(range.upperBound)") }
        return days
    }

    /// The moment `days` (of `daySeconds`) after `start`, rounded up to a whole second.
    func date(_ days: UInt32, after start: Date) -> Date {
        Date(timeIntervalSince1970: (start.timeIntervalSince1970 + Double(Int(days) * daySeconds)).rounded(.up))
    }

    static func invalidState(_ r: KeyRecord, _ wanted: String) -> KMSError {
        KMSError(.invalidState, "key \(r.keyID) is \(r.state.rawValue) and cannot be \(wanted)\(r.state == .pendingDeletion ? "; cancel its deletion first" : "")")
    }

    static func date(_ d: Date?) -> String {
        guard let d else { return "an unknown date" }
        return ISO8601DateFormatter().string(from: d)
    }

    // MARK: - Rotation

    /// Turns on automatic rotation every `periodDays` (90...2560; 0 means 365), the first one
    /// that long from now. Enabled keys only (DisabledException, KMSInvalidStateException).
    public func enableKeyRotation(_ keyID: String, periodDays: UInt32, caller: Principal) throws(KMSError) -> Change {
        let days = try Self.days(periodDays, default: KMSLimits.defaultRotationPeriodDays, in: KMSLimits.rotationPeriodDays, field: "RotationPeriodInDays")
        let now = clock()
        return try change(keyID, caller: caller, action: "rotate") { (r) throws(KMSError) in
            try Self.requireRotatable(r)
            r.rotationPeriodDays = days
            r.nextRotationDate = date(days, after: now)
        }
    }

    public func disableKeyRotation(_ keyID: String, caller: Principal) throws(KMSError) -> Change {
        try change(keyID, caller: caller, action: "stop rotating") { (r) throws(KMSError) in
            try Self.requireRotatable(r)
            r.rotationPeriodDays = nil
            r.nextRotationDate = nil
        }
    }

    public func keyRotationStatus(_ keyID: String, caller: Principal) throws(KMSError) -> KeyRecord {
        try usableRecord(KeyID(parsing: keyID), caller: caller, needsEnabled: false)
    }

    /// A new version now; new ciphertexts use it, older versions keep decrypting. At most
    /// `KMSLimits.maxOnDemandRotations` per key, as AWS KMS.
    public func rotateKeyOnDemand(_ keyID: String, caller: Principal) throws(KMSError) -> KeyRecord {
        let id = try KeyID(parsing: keyID)
        return try locked(id) { () throws(KMSError) -> KeyRecord in
            let record = try usableRecord(id, caller: caller, needsEnabled: false)
            try Self.requireRotatable(record)
            guard (record.onDemandRotations ?? 0) < KMSLimits.maxOnDemandRotations else {
                throw KMSError(.limitExceeded, "key \(record.keyID) has had \(KMSLimits.maxOnDemandRotations) on-demand rotations, the most a key may have; automatic rotation still runs")
            }
            var next = record
            next.onDemandRotations = (record.onDemandRotations ?? 0) + 1
            return try rotate(next, type: "ON_DEMAND")
        }
    }

    /// Rotates every key whose automatic rotation is due; returns the new records.
    public func rotateDueKeys() throws -> Sweep<KeyRecord> {
        let now = clock()
        return try sweep(due: { try repository.dueForRotation(at: now, limit: $0) }) { r in
            guard r.state == .enabled, let period = r.rotationPeriodDays, let due = r.nextRotationDate, due <= now else { return nil }
            var next = r
            // The next one a whole period after this one was due (not after it ran late).
            var following = due.timeIntervalSince1970 + Double(Int(period) * daySeconds)
            while following <= now.timeIntervalSince1970 { following += Double(Int(period) * daySeconds) }
            next.nextRotationDate = Date(timeIntervalSince1970: following)
            return try rotate(next, type: "AUTOMATIC")
        }
    }

    private func rotate(_ record: KeyRecord, type: String) throws(KMSError) -> KeyRecord {
        var next = record
        next.currentVersion = record.currentVersion + 1
        do {
            let material = try SecureBytes.random(count: 32)
            try repository.rotate(next, material: material, rotationType: type, at: clock())
        } catch let error as KMSError {
            throw error
        } catch {
            throw KMSError(.internalError, "the new key version could not be stored (\(error)); nothing was changed")
        }
        return next
    }

    /// The rotations of a key (versions 2 and later), oldest first, one page.
    public func listKeyRotations(_ keyID: String, limit: Int, marker: String, caller: Principal) throws(KMSError) -> (rotations: [KeyVersionRecord], nextMarker: String?) {
        let limit = limit == 0 ? KMSLimits.defaultListLimit : limit
        guard (1...KMSLimits.maxListLimit).contains(limit) else { throw KMSError(.validation, "Limit must be 1...\(KMSLimits.maxListLimit)") }
        let record = try usableRecord(KeyID(parsing: keyID), caller: caller, needsEnabled: false)
        let after = try Self.textMarker(marker, label: "rotations/\(record.keyID)", caller: caller, repository: repository).flatMap { UInt32($0) } ?? 1
        let rest = try repository.versions(record.keyID).filter { $0.version > after }
        guard rest.count > limit else { return (rest, nil) }
        let page = Array(rest.prefix(limit))
        return (page, Self.makeTextMarker(String(page.last!.version), label: "rotations/\(record.keyID)", caller: caller, repository: repository))
    }

    /// Beyond AWS: blobs of versions below `version` refuse to decrypt from now on (after the
    /// data was re-encrypted, say). 1...current version; not while PendingDeletion.
    public func setMinimumDecryptionVersion(_ keyID: String, version: UInt32, caller: Principal) throws(KMSError) -> Change {
        try change(keyID, caller: caller, action: "restrict") { (r) throws(KMSError) in
            guard r.state != .pendingDeletion else { throw Self.invalidState(r, "changed") }
            guard (1...r.currentVersion).contains(version) else {
                throw KMSError(.validation, "MinimumDecryptionVersion must be 1...\(r.currentVersion), the key's current version")
            }
            r.minimumDecryptionVersion = version
        }
    }

    /// Rotation needs kmsd-made material: imported keys do not rotate (as in AWS KMS).
    static func requireRotatable(_ r: KeyRecord) throws(KMSError) {
        guard r.origin != KeyRecord.externalOrigin else {
            throw KMSError(.unsupportedOperation, "key \(r.keyID) holds imported material (Origin EXTERNAL); kmsd cannot rotate it. Create a new key and re-encrypt instead")
        }
        guard r.multiRegionKeyType != "REPLICA" else {
            throw KMSError(.unsupportedOperation, "key \(r.keyID) is a replica: rotate its primary in region \(r.primaryRegion ?? "?"), then bring the replica up to date (kmsctl sync-replica)")
        }
        try requireEnabled(r)
    }

    static func requireEnabled(_ r: KeyRecord) throws(KMSError) {
        switch r.state {
        case .enabled: return
        case .disabled: throw KMSError(.disabled, "key \(r.keyID) is disabled; enable it first")
        case .pendingDeletion, .pendingImport: throw invalidState(r, "rotated")
        }
    }

    // MARK: - Aliases

    /// A key identifier where AWS KMS accepts aliases too: key id, key ARN, `alias/NAME` or
    /// `kmsd:alias/NAME`. NotFoundException when the alias does not exist.
    ///
    /// Whether the caller may use the key it names is decided by the key's policy before the
    /// operation (`KeyService.decide`), which also answers a refused alias as a missing one.
    public func resolve(_ text: String, caller: Principal) throws(KMSError) -> KeyID {
        guard let name = Self.aliasName(text) else { return try KeyID(parsing: text) }
        try Self.validateAlias(name)
        guard let alias = try repository.alias(name) else {
            throw KMSError(.notFound, "alias \(name) does not exist; list aliases with kmsctl list-aliases")
        }
        return alias.keyID
    }

    /// `alias/NAME` from `alias/NAME` or its ARN `kmsd:alias/NAME`; nil for anything else.
    public static func aliasName(_ text: String) -> String? {
        if text.hasPrefix("alias/") { return text }
        if text.hasPrefix(KMSLimits.aliasARNPrefix) { return String(text.dropFirst(KMSLimits.aliasARNPrefix.count - "alias/".count)) }
        return nil
    }

    /// AWS's rule: `alias/` then letters, digits, `/ _ - :`; 1...256 characters in all; not
    /// `alias/aws/...`, which AWS reserves.
    public static func checkAliasName(_ name: String) throws(KMSError) { try validateAlias(name) }

    static let aliasCharacters = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_-:".utf8)

    static func validateAlias(_ name: String) throws(KMSError) {
        let allowed = aliasCharacters
        let rest = name.utf8.dropFirst("alias/".count)
        guard name.hasPrefix("alias/"), !rest.isEmpty, name.utf8.count <= 256, rest.allSatisfy(allowed.contains) else {
            throw KMSError(.validation, "alias name '\(name.prefix(80))' is not valid: alias/ followed by letters, digits, / _ - or :, 256 characters at most")
        }
        guard !name.hasPrefix("alias/aws/") else {
            throw KMSError(.validation, "alias names beginning alias/aws/ are reserved (as in AWS KMS); choose another")
        }
    }

    /// A key that an alias may point to: the caller may use it, and it is not pending deletion.
    private func aliasTarget(_ text: String, caller: Principal, current: KeyID? = nil) throws(KMSError) -> KeyRecord {
        try Self.checkTargetIsKey(text)
        let record = try usableRecord(KeyID(parsing: text), caller: caller, needsEnabled: false)
        guard record.state != .pendingDeletion else { throw Self.invalidState(record, "given an alias") }
        // An alias already pointing at this key does not add to its count.
        let count = record.keyID == current ? 0 : try repository.aliasCount(record.keyID)
        guard count < KMSLimits.maxAliasesPerKey else {
            throw KMSError(.limitExceeded, "key \(record.keyID) already has \(KMSLimits.maxAliasesPerKey) aliases, the most a key may have")
        }
        return record
    }

    public static func checkTargetIsKey(_ text: String) throws(KMSError) {
        guard aliasName(text) == nil else {
            throw KMSError(.validation, "TargetKeyId must be a key id or key ARN, not an alias")
        }
    }

    public func createAlias(_ name: String, targetKeyID: String, caller: Principal) throws(KMSError) -> AliasRecord {
        try Self.validateAlias(name)
        let target = try aliasTarget(targetKeyID, caller: caller)
        let now = Date(timeIntervalSince1970: clock().timeIntervalSince1970.rounded(.down))
        let alias = AliasRecord(aliasName: name, keyID: target.keyID, createdAt: now, updatedAt: now)
        try repository.createAlias(alias)
        return alias
    }

    /// Points an existing alias at another key; returns the alias before and after.
    /// `expectedCurrent`: the key the alias named when access was decided; if it names
    /// another by now, nothing changes (KMSInvalidStateException; retry).
    public func updateAlias(_ name: String, targetKeyID: String, expectedCurrent: KeyID? = nil, caller: Principal) throws(KMSError) -> (before: AliasRecord, after: AliasRecord) {
        try Self.validateAlias(name)
        try Self.checkTargetIsKey(targetKeyID)
        guard let before = try repository.alias(name) else { throw KMSError(.notFound, "alias \(name) does not exist") }
        try Self.checkStillNames(before, expectedCurrent)
        _ = try usableRecord(before.keyID, caller: caller, needsEnabled: false)
        let target = try aliasTarget(targetKeyID, caller: caller, current: before.keyID)
        var after = before
        after.keyID = target.keyID
        after.updatedAt = Date(timeIntervalSince1970: clock().timeIntervalSince1970.rounded(.down))
        do { try repository.updateAlias(after) } catch {
            throw KMSError(.internalError, "the alias could not be updated (\(error)); nothing was changed")
        }
        return (before, after)
    }

    public func deleteAlias(_ name: String, expectedCurrent: KeyID? = nil, caller: Principal) throws(KMSError) -> AliasRecord {
        try Self.validateAlias(name)
        guard let alias = try repository.alias(name) else { throw KMSError(.notFound, "alias \(name) does not exist") }
        try Self.checkStillNames(alias, expectedCurrent)
        _ = try usableRecord(alias.keyID, caller: caller, needsEnabled: false)
        do { try repository.deleteAlias(name) } catch {
            throw KMSError(.internalError, "the alias could not be deleted (\(error)); nothing was changed")
        }
        return alias
    }

    static func checkStillNames(_ alias: AliasRecord, _ expected: KeyID?) throws(KMSError) {
        guard let expected, alias.keyID != expected else { return }
        throw KMSError(.invalidState, "alias \(alias.aliasName) was moved to another key while this request was being decided; nothing was changed, retry")
    }

    /// Puts an alias back as it was (`before`; nil: it did not exist), unless it has changed
    /// again since the change being undone left it as `after` (nil: deleted).
    public func restoreAlias(_ before: AliasRecord?, ifCurrentIs after: AliasRecord?, name: String) throws {
        guard try repository.alias(name) == after else { return }
        guard let before else { try repository.deleteAlias(name); return }
        if after == nil { try repository.createAlias(before) } else { try repository.updateAlias(before) }
    }

    /// One page of aliases the caller may see: all for administrators, else those of keys the
    /// caller may use; only `keyID`'s when given.
    public func listAliases(keyID: String, limit: Int, marker: String, caller: Principal) throws(KMSError) -> (aliases: [AliasRecord], nextMarker: String?) {
        let limit = limit == 0 ? KMSLimits.defaultListLimit : limit
        guard (1...KMSLimits.maxListLimit).contains(limit) else { throw KMSError(.validation, "Limit must be 1...\(KMSLimits.maxListLimit)") }
        var key: KeyID? = nil
        if !keyID.isEmpty { key = try usableRecord(KeyID(parsing: keyID), caller: caller, needsEnabled: false).keyID }
        var after = try Self.textMarker(marker, label: "aliases", caller: caller, repository: repository)
        let admin = isAdministrator(caller)
        var page: [AliasRecord] = []
        var scanned = 0
        var exhausted = false
        while page.count <= limit, scanned < 10 * KMSLimits.maxListLimit {
            let names = try repository.aliasNames(keyID: key, after: after, limit: 256)
            if names.isEmpty { exhausted = true; break }
            for name in names where page.count <= limit {
                after = name
                scanned += 1
                // The authenticated row decides, not the index column it was found by.
                guard let alias = try? repository.alias(name) else { continue }
                if let key { if alias.keyID == key { page.append(alias) }; continue }
                if admin || (try? repository.record(alias.keyID, caching: false))??.ownerUID == caller.uid { page.append(alias) }
            }
        }
        if page.count > limit {
            page.removeLast()
            return (page, Self.makeTextMarker(page.last!.aliasName, label: "aliases", caller: caller, repository: repository))
        }
        if !exhausted, let last = after {
            // Stopped after scanning many aliases this caller may not see: go on from there.
            return (page, Self.makeTextMarker(last, label: "aliases", caller: caller, repository: repository))
        }
        return (page, nil)
    }

    // MARK: - Tags

    public func tagResource(_ keyID: String, tags: [Tag], caller: Principal) throws(KMSError) -> Change {
        try Self.validate(tags: tags)
        return try change(keyID, caller: caller, action: "tag") { (r) throws(KMSError) in
            guard r.state != .pendingDeletion else { throw Self.invalidState(r, "tagged") }
            for t in tags {
                if let i = r.tags.firstIndex(where: { Array($0.key.utf8) == Array(t.key.utf8) }) { r.tags[i].value = t.value } else { r.tags.append(t) }
            }
            guard r.tags.count <= KMSLimits.maxTags else {
                throw KMSError(.limitExceeded, "a key may have at most \(KMSLimits.maxTags) tags; this would make \(r.tags.count)")
            }
        }
    }

    public func untagResource(_ keyID: String, tagKeys: [String], caller: Principal) throws(KMSError) -> Change {
        try change(keyID, caller: caller, action: "untag") { (r) throws(KMSError) in
            guard r.state != .pendingDeletion else { throw Self.invalidState(r, "untagged") }
            let gone = Set(tagKeys.map { Array($0.utf8) })
            r.tags.removeAll { gone.contains(Array($0.key.utf8)) }
        }
    }

    /// The key's tags sorted by key bytes, one page.
    /// `maxBytes` bounds the page's encoded size (tags of up to 384 characters each can
    /// otherwise outgrow a frame): the page stops early, with a marker, when the next tag
    /// would not fit.
    public func listResourceTags(_ keyID: String, limit: Int, marker: String, maxBytes: Int = .max, caller: Principal) throws(KMSError) -> (tags: [Tag], nextMarker: String?) {
        let limit = limit == 0 ? KMSLimits.maxTags : limit
        guard (1...KMSLimits.maxTags).contains(limit) else { throw KMSError(.validation, "Limit must be 1...\(KMSLimits.maxTags)") }
        let record = try usableRecord(KeyID(parsing: keyID), caller: caller, needsEnabled: false)
        let after = try Self.textMarker(marker, label: "tags/\(record.keyID)", caller: caller, repository: repository)
        let sorted = record.tags.sorted { Array($0.key.utf8).lexicographicallyPrecedes(Array($1.key.utf8)) }
        let rest = after.map { a in sorted.filter { Array(a.utf8).lexicographicallyPrecedes(Array($0.key.utf8)) } } ?? sorted
        var page: [Tag] = []
        var bytes = 0
        for t in rest {
            let size = t.key.utf8.count + t.value.utf8.count + 12  // field tags and lengths
            guard page.count < limit, bytes + size <= maxBytes || page.isEmpty else { break }
            page.append(t)
            bytes += size
        }
        guard page.count < rest.count else { return (page, nil) }
        return (page, Self.makeTextMarker(page.last!.key, label: "tags/\(record.keyID)", caller: caller, repository: repository))
    }

    /// List markers: the text (a key id, an alias name, a tag key, a version) encrypted and authenticated with
    /// AES-256-GCM under a root-derived key, bound to the listing and the caller: a marker shows
    /// nothing (it may point past entries the caller may not see) and cannot be forged.
    public static func makeTextMarker(_ text: String, label: String, caller: Principal, repository: KeyRepository) -> String? {
        let key = repository.markerKey
        guard let nonce = try? SecureRandom.bytes(AESGCM.nonceBytes) else { return nil }
        let sealed = try? Array(text.utf8).withUnsafeBytes { p in
            try AESGCM.seal(key: key, nonce: nonce, plaintext: p, aad: markerAAD(label, caller))
        }
        return sealed.map { Hex.encode(nonce + $0) }
    }

    static func markerAAD(_ label: String, _ caller: Principal) -> [UInt8] {
        var aad = Array("kmsd/v1/marker/\(label)".utf8)
        aad.appendBigEndian(caller.uid)
        return aad
    }

    /// A list marker naming a key id (for listings outside KeyService).
    public static func textMarkerKey(_ marker: String, label: String, caller: Principal, repository: KeyRepository) throws(KMSError) -> KeyID? {
        try textMarker(marker, label: label, caller: caller, repository: repository).flatMap { try? KeyID(parsing: $0) }
    }

    static func textMarker(_ marker: String, label: String, caller: Principal, repository: KeyRepository) throws(KMSError) -> String? {
        guard !marker.isEmpty else { return nil }
        let invalid = KMSError(.invalidMarker, "Marker is not one this server returned to you; pass the NextMarker of the previous page, or start again without one")
        guard let bytes = Hex.decode(marker), bytes.count > AESGCM.nonceBytes + AESGCM.tagBytes else { throw invalid }
        let key = repository.markerKey
        guard let text = try? AESGCM.open(key: key, nonce: Array(bytes[..<AESGCM.nonceBytes]), sealed: Array(bytes[AESGCM.nonceBytes...]),
                                          aad: markerAAD(label, caller)) else { throw invalid }
        return String(decoding: text.unsafeCopyToArray(), as: UTF8.self)
    }

    // MARK: - Cryptographic operations

    public struct Sealed: Sendable {
        public var blob: [UInt8]
        public var keyID: KeyID
        public var keyVersion: UInt32
    }

    public struct Opened: Sendable {
        public var plaintext: SecureBytes
        public var keyID: KeyID
        public var keyVersion: UInt32
    }

    /// Encrypts under the key `record` describes (the record an access decision was made on).
    public func encrypt(record: KeyRecord, plaintext: UnsafeRawBufferPointer, context ctx: EncryptionContext) throws(KMSError) -> Sealed {
        guard (1...KMSLimits.maxPlaintextBytes).contains(plaintext.count) else {
            throw KMSError(.validation, "Plaintext must be 1...\(KMSLimits.maxPlaintextBytes) bytes; use envelope encryption (GenerateDataKey) for more")
        }
        try checkUsable(record, needsEnabled: true)
        return try seal(plaintext, record: record, context: ctx)
    }

    /// Decrypts a blob; `keyID`, when given, must name the blob's key.
    /// `decided`: the key's record as the request's access decision read it (when it is the
    /// key the blob names, it is used instead of reading the record again).
    public func decrypt(blob: [UInt8], context ctx: EncryptionContext, keyID: String, caller: Principal,
                        decided: KeyRecord? = nil) throws(KMSError) -> Opened {
        guard (1...KMSLimits.maxCiphertextBlobBytes).contains(blob.count) else {
            throw KMSError(.validation, "CiphertextBlob must be 1...\(KMSLimits.maxCiphertextBlobBytes) bytes")
        }
        let parsed = try SymmetricCiphertext(parsing: blob)
        if !keyID.isEmpty {
            let expected = try resolve(keyID, caller: caller)
            guard expected == parsed.keyID else {
                throw KMSError(.incorrectKey, "the ciphertext was encrypted under another key than \(expected); omit KeyId or pass the right one")
            }
        }
        var found = decided.flatMap { $0.keyID == parsed.keyID ? $0 : nil }
        if found == nil { found = try repository.record(parsed.keyID) }
        guard let record = found else {
            // A deleted key is named as such; a key id that never existed means a forged blob.
            if let gone = try repository.tombstone(parsed.keyID) { throw Self.deleted(gone) }
            throw SymmetricCiphertext.invalid
        }
        try checkUsable(record, needsEnabled: true)
        if let minimum = record.minimumDecryptionVersion, parsed.keyVersion < minimum {
            throw KMSError(.invalidState, "version \(parsed.keyVersion) of key \(record.keyID) is retired: its minimum decryption version is \(minimum)")
        }
        if record.multiRegionKeyType == "REPLICA", parsed.keyVersion > record.currentVersion {
            throw KMSError(.invalidState, "version \(parsed.keyVersion) of key \(record.keyID) has not reached this replica yet (it has versions 1 to \(record.currentVersion)): run kmsctl sync-replica on the primary in region \(record.primaryRegion ?? "?") and import the bundle here")
        }
        guard let material = try repository.material(parsed.keyID, version: parsed.keyVersion) else {
            throw SymmetricCiphertext.invalid
        }
        let plaintext = try parsed.open(versionKey: material, context: ctx)
        return Opened(plaintext: plaintext, keyID: parsed.keyID, keyVersion: parsed.keyVersion)
    }

    /// Decrypts under the source key and encrypts under the destination; the plaintext stays
    /// in locked memory and is never returned.
    public func reEncrypt(blob: [UInt8], sourceContext: EncryptionContext, sourceKeyID: String,
                          destinationKeyID: String, destinationContext destContext: EncryptionContext,
                          caller: Principal) throws(KMSError) -> (sealed: Sealed, source: Opened) {
        let destinationID = try resolve(destinationKeyID, caller: caller)
        let opened = try decrypt(blob: blob, context: sourceContext, keyID: sourceKeyID, caller: caller)
        let destination = try usableRecord(destinationID, caller: caller, needsEnabled: true)
        let sealed = try opened.plaintext.withUnsafeBytes { (p) throws(KMSError) in try seal(p, record: destination, context: destContext) }
        return (sealed, opened)
    }

    /// A data key sealed under the key `record` describes (the record an access decision was
    /// made on).
    public func generateDataKey(record: KeyRecord, keySpec: String, numberOfBytes: UInt32,
                                context ctx: EncryptionContext) throws(KMSError) -> (plaintext: SecureBytes, sealed: Sealed) {
        let count = try Self.dataKeyBytes(keySpec: keySpec, numberOfBytes: numberOfBytes)
        try checkUsable(record, needsEnabled: true)
        let dataKey: SecureBytes
        do { dataKey = try SecureBytes.dataKey(count: count) } catch {
            throw KMSError(.internalError, "could not generate random bytes inside kmsd")
        }
        let sealed = try dataKey.withUnsafeBytes { (p) throws(KMSError) in try seal(p, record: record, context: ctx) }
        return (dataKey, sealed)
    }

    /// The size of a data key: KeySpec or NumberOfBytes, exactly one of them.
    static func dataKeyBytes(keySpec: String, numberOfBytes: UInt32) throws(KMSError) -> Int {
        switch (keySpec, numberOfBytes) {
        case ("AES_256", 0): return 32
        case ("AES_128", 0): return 16
        case ("", 1...UInt32(KMSLimits.maxDataKeyBytes)): return Int(numberOfBytes)
        case ("", 0):
            throw KMSError(.validation, "give KeySpec (AES_128 or AES_256) or NumberOfBytes (1...\(KMSLimits.maxDataKeyBytes))")
        case ("", _):
            throw KMSError(.validation, "NumberOfBytes must be 1...\(KMSLimits.maxDataKeyBytes)")
        case (_, 0):
            throw KMSError(.validation, "KeySpec must be AES_128 or AES_256")
        default:
            throw KMSError(.validation, "give KeySpec or NumberOfBytes, not both")
        }
    }

    /// Random bytes from OpenSSL's CSPRNG. Any caller.
    public func generateRandom(count: UInt32) throws(KMSError) -> [UInt8] {
        guard (1...UInt32(KMSLimits.maxRandomBytes)).contains(count) else {
            throw KMSError(.validation, "NumberOfBytes must be 1...\(KMSLimits.maxRandomBytes)")
        }
        do { return try SecureRandom.bytes(Int(count)) } catch {
            throw KMSError(.internalError, "could not generate random bytes inside kmsd")
        }
    }

    // MARK: - Helpers

    private func seal(_ plaintext: UnsafeRawBufferPointer, record: KeyRecord, context: EncryptionContext) throws(KMSError) -> Sealed {
        guard let material = try repository.material(record.keyID, version: record.currentVersion) else {
            throw KeyRepository.tampered(record.keyID)
        }
        do {
            let ct = try SymmetricCiphertext.seal(versionKey: material, keyID: record.keyID, keyVersion: record.currentVersion,
                                                  plaintext: plaintext, context: context)
            return Sealed(blob: ct.serialized, keyID: record.keyID, keyVersion: record.currentVersion)
        } catch {
            throw KMSError(.internalError, "encryption failed inside kmsd (\(error)); see the daemon's log")
        }
    }

    public static func deleted(_ t: KeyTombstone) -> KMSError {
        KMSError(.notFound, "key \(t.keyID) was deleted on \(date(t.deletedAt)); its material is gone and nothing encrypted under it can be decrypted")
    }

    func usableRecord(_ id: KeyID, caller: Principal, needsEnabled: Bool) throws(KMSError) -> KeyRecord {
        guard let record = try repository.record(id) else {
            if let gone = try repository.tombstone(id) { throw Self.deleted(gone) }
            throw KMSError(.notFound, "key \(id) does not exist; list keys with kmsctl list-keys")
        }
        try checkUsable(record, needsEnabled: needsEnabled)
        return record
    }

    /// Whether the key's state allows the operation. Access was decided before the operation
    /// started, once, by the key's policy (`KeyService.decide`); nothing here checks it again.
    private func checkUsable(_ record: KeyRecord, needsEnabled: Bool) throws(KMSError) {
        guard needsEnabled else { return }
        switch record.state {
        case .enabled: return
        case .disabled: throw KMSError(.disabled, "key \(record.keyID) is disabled; enable it first")
        case .pendingDeletion, .pendingImport:
            throw KMSError(.invalidState, "key \(record.keyID) is \(record.state.rawValue) and cannot be used")
        }
    }

    static func parse<T: RawRepresentable>(_: T.Type, _ text: String, default value: T, field: String) throws(KMSError) -> T where T.RawValue == String {
        if text.isEmpty { return value }
        guard let v = T(rawValue: text) else { throw KMSError(.validation, "\(field) '\(text.prefix(64))' is not a known value") }
        return v
    }

    static func validate(tags: [Tag]) throws(KMSError) {
        guard tags.count <= KMSLimits.maxTags else { throw KMSError(.validation, "at most \(KMSLimits.maxTags) tags are allowed") }
        for t in tags where t.key.hasPrefix("aws:") {
            throw KMSError(.validation, "tag key '\(t.key.prefix(64))' begins with aws:, which AWS reserves")
        }
        var seen = Set<[UInt8]>()
        for t in tags {
            guard (1...KMSLimits.maxTagKeyLength).contains(t.key.unicodeScalars.count),
                  t.value.unicodeScalars.count <= KMSLimits.maxTagValueLength else {
                throw KMSError(.validation, "tag keys must be 1...\(KMSLimits.maxTagKeyLength) characters and values at most \(KMSLimits.maxTagValueLength)")
            }
            guard seen.insert(Array(t.key.utf8)).inserted else { throw KMSError(.validation, "duplicate tag key '\(t.key.prefix(64))'") }
        }
    }
}
