import Foundation
import KMSCrypto
import KMSProtocol
import Synchronization

/// A grant: permission for one principal to do some operations with one key, without a
/// change to its policy (AWS KMS grants). Stored authenticated, like keys.
public struct GrantRecord: Codable, Sendable, Equatable {
    public var grantID: String
    public var keyID: KeyID
    public var name: String
    public var createdAt: Date
    /// As written: uid:N, user:NAME, group:NAME|GID, unit:NAME, exe:PATH.
    public var granteePrincipal: String
    public var retiringPrincipal: String?
    /// uid:N of whoever created it.
    public var issuingPrincipal: String
    public var operations: [String]
    public var encryptionContextSubset: [String: String]?
    public var encryptionContextEquals: [String: String]?
}

/// A grant's principal, parsed: `uid:N`, `user:NAME`, `group:NAME` (or a gid), `unit:NAME`,
/// `exe:PATH`.
public enum GrantPrincipal: Sendable, Equatable {
    case uid(UInt32), gid(UInt32), unit(String), executable(String)

    /// `strict`: a user or group name must exist now (CreateGrant); a stored grant whose name
    /// no longer resolves matches nobody (nil).
    public static func parse(_ text: String, strict: Bool = true, field: String = "GranteePrincipal") throws(KMSError) -> GrantPrincipal? {
        let parts = text.split(separator: ":", maxSplits: 1).map(String.init)
        let bad = KMSError(.validation, "\(field) '\(text.prefix(80))' must be uid:N, user:NAME, group:NAME, unit:NAME or exe:/PATH")
        guard parts.count == 2, !parts[1].isEmpty else { throw bad }
        let value = parts[1]
        switch parts[0] {
        case "uid":
            guard let uid = UInt32(value) else { throw bad }
            return .uid(uid)
        case "user":
            if let uid = PrincipalPattern.uid(of: value) { return .uid(uid) }
            if strict { throw KMSError(.validation, "\(field): there is no user '\(value.prefix(64))' on this host") }
            return nil
        case "group":
            if let gid = PrincipalPattern.gid(of: value) ?? UInt32(value) { return .gid(gid) }
            if strict { throw KMSError(.validation, "\(field): there is no group '\(value.prefix(64))' on this host") }
            return nil
        case "unit":
            guard !value.contains("/") else { throw bad }
            return .unit(value)
        case "exe":
            guard value.hasPrefix("/") else { throw bad }
            return .executable(value)
        default:
            throw bad
        }
    }

    /// True when it names the caller; never for an attribute kmsd could not establish.
    func matches(_ p: Principal) -> Bool {
        switch self {
        case .uid(let uid): p.uid == uid
        case .gid(let gid): p.gid == gid || (p.groupsKnown && p.groups.contains(gid))
        case .unit(let unit): p.systemdUnit == unit
        case .executable(let exe): p.executable == exe
        }
    }
}

/// A grant ready to evaluate: its principal parsed and its operations as an action set.
struct CompiledGrant: Sendable {
    let record: GrantRecord
    let grantee: GrantPrincipal?
    let actions: ActionSet

    init(_ g: GrantRecord) {
        record = g
        grantee = (try? GrantPrincipal.parse(g.granteePrincipal, strict: false)) ?? nil
        var set = ActionSet()
        for op in g.operations { if let i = PolicyActions.index(of: "kms:" + op) { set.insert(i) } }
        actions = set
    }

    /// The grant allows the request: its grantee is the caller, the action is one of its
    /// operations, and the request's encryption context meets its constraints.
    func allows(_ f: RequestFacts) -> Bool {
        guard let grantee, actions.contains(f.action), grantee.matches(f.caller) else { return false }
        // Bytes, as encryption contexts are bound everywhere else.
        func value(_ key: String) -> String? { f.encryptionContext?.first { $0.key.utf8.elementsEqual(key.utf8) }?.value }
        func holds(_ pairs: [String: String]) -> Bool { pairs.allSatisfy { p in value(p.key).map { $0.utf8.elementsEqual(p.value.utf8) } ?? false } }
        if let equals = record.encryptionContextEquals, (f.encryptionContext?.count ?? 0) != equals.count || !holds(equals) { return false }
        if let subset = record.encryptionContextSubset, !holds(subset) { return false }
        return true
    }
}

/// CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant, and grants in the
/// access decision.
extension KeyService {
    /// Operations a grant may allow (those of AWS KMS that kmsd implements).
    public static let grantOperations: Set<String> = [
        "Encrypt", "Decrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "ReEncryptFrom", "ReEncryptTo",
        "DescribeKey", "CreateGrant", "RetireGrant",
    ]
    static let contextOperations: Set<String> = [
        "Encrypt", "Decrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "ReEncryptFrom", "ReEncryptTo",
    ]
    public static let maxGrantsPerKey = 1000
    static let grantTokenPrefix = "kmsd-grant-token-v1:"

    /// The key's grants, compiled: read once per key and cached until one of its grants changes.
    func compiledGrants(_ id: KeyID) -> [CompiledGrant] {
        let (hit, seen) = grantCache.withLock { ($0.entries[id], $0.changes) }
        if let hit { return hit }
        // A grant row that fails its integrity check allows nothing (the others still do).
        let grants = repository.intactGrants(of: id).map(CompiledGrant.init)
        let emptied = grantCache.withLock { cache in
            // A grant changed while this read ran (a revocation, say): what was read may be
            // stale, so it is used for this request only, never cached.
            guard cache.changes == seen else { return false }
            let full = cache.entries.count >= derivedCacheLimit
            if full { cache.entries.removeAll(keepingCapacity: true) }
            cache.entries[id] = grants
            return full
        }
        // Keys whose grants were cached are not any more (KeyRepository.changes).
        if emptied { repository.noteChange() }
        return grants
    }

    /// Whether the key's grants are in the cache (a decision needing them touches no storage).
    public func grantsCached(_ id: KeyID) -> Bool { grantCache.withLock { $0.entries[id] != nil } }

    func forgetGrants(_ id: KeyID) {
        grantCache.withLock { cache in
            cache.entries[id] = nil
            cache.changes &+= 1
        }
        repository.noteChange()
    }

    public struct GrantInput: Sendable {
        public var keyID: KeyID
        public var grantee: String
        public var retiring: String
        public var operations: [String]
        public var contextSubset: [String: String]?
        public var contextEquals: [String: String]?
        public var name: String
        public init(keyID: KeyID, grantee: String, retiring: String, operations: [String], contextSubset: [String: String]?,
                    contextEquals: [String: String]?, name: String) {
            self.keyID = keyID; self.grantee = grantee; self.retiring = retiring; self.operations = operations
            self.contextSubset = contextSubset; self.contextEquals = contextEquals; self.name = name
        }
    }

    /// Checks a CreateGrant request's shape (before the access decision, which may depend on it).
    public static func validateGrant(_ g: GrantInput) throws(KMSError) {
        _ = try GrantPrincipal.parse(g.grantee)
        if !g.retiring.isEmpty { _ = try GrantPrincipal.parse(g.retiring, field: "RetiringPrincipal") }
        guard !g.operations.isEmpty else { throw KMSError(.validation, "Operations must name at least one operation") }
        for op in g.operations where !grantOperations.contains(op) {
            throw KMSError(.validation, "Operations: '\(op.prefix(64))' cannot be granted; use \(grantOperations.sorted().joined(separator: ", "))")
        }
        guard Set(g.operations).count == g.operations.count else { throw KMSError(.validation, "Operations names an operation twice") }
        for constraint in [g.contextSubset, g.contextEquals].compactMap({ $0 }) {
            let bytes = constraint.reduce(0) { $0 + $1.key.utf8.count + $1.value.utf8.count + 8 }
            guard constraint.count <= KMSLimits.maxContextPairs, bytes <= KMSLimits.maxCanonicalContextBytes else {
                throw KMSError(.validation, "Constraints: at most \(KMSLimits.maxContextPairs) pairs and \(KMSLimits.maxCanonicalContextBytes) bytes each")
            }
        }
        if g.contextSubset != nil || g.contextEquals != nil {
            guard g.operations.allSatisfy(contextOperations.contains) else {
                throw KMSError(.validation, "Constraints apply only to grants whose operations all take an encryption context (\(contextOperations.sorted().joined(separator: ", ")))")
            }
        }
        guard g.name.utf8.count <= 256, g.name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || ":/_-".contains($0)) }) else {
            throw KMSError(.validation, "Name may hold letters, digits and : / _ - only, 256 characters at most")
        }
    }

    /// Creates a grant on a key (or, with a Name, returns the same grant created before with
    /// identical parameters, as AWS does). Returns the grant and whether it is new.
    public func createGrant(_ input: GrantInput, caller: Principal) throws(KMSError) -> (grant: GrantRecord, created: Bool) {
        try Self.validateGrant(input)
        return try locked(input.keyID) { () throws(KMSError) -> (grant: GrantRecord, created: Bool) in
            let record = try usableRecord(input.keyID, caller: caller, needsEnabled: false)
            guard record.state != .pendingDeletion else { throw Self.invalidState(record, "given a grant") }
            let existing = try repository.grants(of: record.keyID)
            let sortedOps = input.operations.sorted()
            if !input.name.isEmpty, let same = existing.first(where: {
                $0.name == input.name && $0.granteePrincipal == input.grantee && $0.operations.sorted() == sortedOps
                    && $0.encryptionContextSubset == input.contextSubset && $0.encryptionContextEquals == input.contextEquals
                    && ($0.retiringPrincipal ?? "") == input.retiring
            }) {
                return (same, false)
            }
            guard existing.count < Self.maxGrantsPerKey else {
                throw KMSError(.limitExceeded, "key \(record.keyID) has \(Self.maxGrantsPerKey) grants, the most a key may have; retire or revoke some")
            }
            let id: String
            do { id = Hex.encode(try SecureRandom.bytes(32)) } catch {
                throw KMSError(.internalError, "could not generate random bytes inside kmsd")
            }
            let grant = GrantRecord(grantID: id, keyID: record.keyID, name: input.name,
                                    createdAt: Date(timeIntervalSince1970: clock().timeIntervalSince1970.rounded(.down)),
                                    granteePrincipal: input.grantee, retiringPrincipal: input.retiring.isEmpty ? nil : input.retiring,
                                    issuingPrincipal: "uid:\(caller.uid)", operations: input.operations,
                                    encryptionContextSubset: input.contextSubset, encryptionContextEquals: input.contextEquals)
            do { try repository.createGrant(grant) } catch let e as KMSError { throw e } catch {
                throw KMSError(.internalError, "the grant could not be stored (\(error)); nothing was created")
            }
            forgetGrants(record.keyID)
            return (grant, true)
        }
    }

    public static func grantToken(_ g: GrantRecord) -> String { grantTokenPrefix + g.keyID.description + ":" + g.grantID }

    /// The key id and grant id a grant token names.
    public static func parseGrantToken(_ token: String) throws(KMSError) -> (keyID: KeyID, grantID: String) {
        let parts = token.hasPrefix(grantTokenPrefix) ? token.dropFirst(grantTokenPrefix.count).split(separator: ":").map(String.init) : []
        guard parts.count == 2, let key = try? KeyID(parsing: parts[0]), parts[1].count == 64 else {
            throw KMSError(.validation, "GrantToken is not one kmsd issued")
        }
        return (key, parts[1])
    }

    /// A key's grants (optionally one grant id, or one grantee), one page.
    public func listGrants(_ keyID: String, grantID: String, grantee: String, limit: Int, marker: String,
                           caller: Principal) throws(KMSError) -> (grants: [GrantRecord], nextMarker: String?) {
        let limit = limit == 0 ? KMSLimits.defaultListLimit : limit
        guard (1...KMSLimits.maxListLimit).contains(limit) else { throw KMSError(.validation, "Limit must be 1...\(KMSLimits.maxListLimit)") }
        let record = try usableRecord(KeyID(parsing: keyID), caller: caller, needsEnabled: false)
        let after = try Self.textMarker(marker, label: "grants/\(record.keyID)", caller: caller, repository: repository)
        // Unfiltered, one more than a page says whether there is a next one.
        let unfiltered = grantID.isEmpty && grantee.isEmpty
        let all = try repository.grants(of: record.keyID, after: after, limit: unfiltered ? limit + 1 : Int.max)
            .filter { (grantID.isEmpty || $0.grantID == grantID) && (grantee.isEmpty || $0.granteePrincipal == grantee) }
        // A page stays well within a frame: grants with large constraints end it early.
        var page: [GrantRecord] = []
        var bytes = 0
        for g in all {
            let size = 200 + g.name.utf8.count + g.granteePrincipal.utf8.count + (g.retiringPrincipal?.utf8.count ?? 0)
                + [g.encryptionContextSubset, g.encryptionContextEquals].compactMap { $0 }.reduce(0) { $0 + $1.reduce(0) { $0 + $1.key.utf8.count + $1.value.utf8.count + 8 } }
            guard page.count < limit, bytes + size <= 24_000 || page.isEmpty else { break }
            page.append(g)
            bytes += size
        }
        guard page.count < all.count else { return (page, nil) }
        return (page, Self.makeTextMarker(page.last!.grantID, label: "grants/\(record.keyID)", caller: caller, repository: repository))
    }

    /// Who may list the grants `retiring` may retire: that principal itself, or an
    /// administrator (AWS decides this by IAM policy; kmsd's configuration is that policy).
    public func mayListRetirableGrants(_ retiring: String, caller: Principal) throws(KMSError) -> PolicyDecision {
        guard let principal = try GrantPrincipal.parse(retiring, strict: false, field: "RetiringPrincipal") else { return .implicitDeny }
        if principal.matches(caller) { return PolicyDecision(effect: .allow, decidedBy: "retiring-principal") }
        return isAdministrator(caller) ? PolicyDecision(effect: .allow, decidedBy: "configuration:administrators") : .implicitDeny
    }

    /// Grants that `retiring` (as written when they were made) may retire, one page.
    public func listRetirableGrants(_ retiring: String, limit: Int, marker: String,
                                    caller: Principal) throws(KMSError) -> (grants: [GrantRecord], nextMarker: String?) {
        let limit = limit == 0 ? KMSLimits.defaultListLimit : limit
        guard (1...KMSLimits.maxListLimit).contains(limit) else { throw KMSError(.validation, "Limit must be 1...\(KMSLimits.maxListLimit)") }
        let after = try Self.textMarker(marker, label: "retirable/\(retiring)", caller: caller, repository: repository)
        let ids = try repository.grantIDs(retiring: retiring, after: after, limit: limit + 1)
        var grants: [GrantRecord] = []
        for id in ids { if let g = try repository.grant(id) { grants.append(g) } }
        guard grants.count > limit else { return (grants, nil) }
        let page = Array(grants.prefix(limit))
        return (page, Self.makeTextMarker(page.last!.grantID, label: "retirable/\(retiring)", caller: caller, repository: repository))
    }

    /// Who may retire a grant: its retiring principal, its grantee when it grants RetireGrant,
    /// and whom the key's policy allows kms:RetireGrant.
    public func mayRetire(_ grant: GrantRecord, key: KeyRecord, caller: Principal) -> PolicyDecision {
        if let retirer = grant.retiringPrincipal.flatMap({ (try? GrantPrincipal.parse($0, strict: false)) ?? nil }), retirer.matches(caller) {
            return PolicyDecision(effect: .allow, decidedBy: "retiring-principal")
        }
        if grant.operations.contains("RetireGrant"), let grantee = (try? GrantPrincipal.parse(grant.granteePrincipal, strict: false)) ?? nil,
           grantee.matches(caller) {
            return PolicyDecision(effect: .allow, decidedBy: "grant:\(grant.grantID)")
        }
        return decide(RequestFacts(action: "RetireGrant", caller: caller, isAdministrator: isAdministrator(caller), key: key)!)
    }

    /// Retires a grant (who may was decided before: `mayRetire`).
    public func retireGrant(keyID: KeyID, grantID: String, caller: Principal) throws(KMSError) -> GrantRecord {
        guard let grant = try repository.grant(grantID), grant.keyID == keyID else {
            throw KMSError(.notFound, "key \(keyID) has no grant \(grantID.prefix(16))…")
        }
        try deleteGrant(grant)
        return grant
    }

    /// Revokes a grant (the key policy decided kms:RevokeGrant before).
    public func revokeGrant(_ keyID: String, grantID: String, caller: Principal) throws(KMSError) -> GrantRecord {
        let id = try KeyID(parsing: keyID)
        guard let grant = try repository.grant(grantID), grant.keyID == id else {
            throw KMSError(.notFound, "key \(id) has no grant \(grantID.prefix(16))…")
        }
        try deleteGrant(grant)
        return grant
    }

    private func deleteGrant(_ grant: GrantRecord) throws(KMSError) {
        do { _ = try repository.deleteGrant(grant.grantID) } catch {
            throw KMSError(.internalError, "the grant could not be deleted (\(error)); nothing was changed")
        }
        forgetGrants(grant.keyID)
    }

    /// Puts back a grant whose deletion could not be audited, or removes one whose creation
    /// could not be.
    public func undoGrant(created: GrantRecord?, deleted: GrantRecord?) throws {
        if let created { _ = try repository.deleteGrant(created.grantID); forgetGrants(created.keyID) }
        if let deleted { try repository.createGrant(deleted); forgetGrants(deleted.keyID) }
    }
}
