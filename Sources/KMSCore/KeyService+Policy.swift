import Foundation
import KMSProtocol
import Synchronization

/// A key's policy compiled once per text (the stored one, or the default for its owner).
struct CompiledPolicy: Sendable {
    let text: String?
    let owner: UInt32
    let policy: KeyPolicy
}

/// Key policies: the one access decision every request about a key goes through, and
/// GetKeyPolicy, PutKeyPolicy, ListKeyPolicies and (beyond AWS) SimulatePolicy.
extension KeyService {
    public static let policyName = "default"

    /// Who may create keys: administrators (AWS decides CreateKey by IAM policy; kmsd's
    /// configuration is that policy).
    public func mayCreateKeys(_ caller: Principal) -> PolicyDecision {
        isAdministrator(caller) ? PolicyDecision(effect: .allow, decidedBy: "configuration:administrators") : .implicitDeny
    }

    /// The compiled policy of a key. A stored policy that no longer parses (it was valid when
    /// written; say, a name it used is gone) cannot be: names that no longer resolve match
    /// nobody, so parsing leniently always succeeds for a policy kmsd accepted.
    func compiledPolicy(_ record: KeyRecord) -> KeyPolicy {
        if let hit = compiledPolicies.withLock({ $0[record.keyID] }), hit.text == record.policy, hit.owner == record.ownerUID {
            return hit.policy
        }
        let text = record.policy ?? DefaultKeyPolicy.text(owner: record.ownerUID)
        // Keys share policy texts (every key of one creator without a policy of its own has
        // the same default): a text is parsed once, not once per key entering the cache. Not a
        // text that names users or groups: parsing looks those up (a user deleted and another
        // given the uid), so each key parses it afresh when it enters the cache, as before.
        let policy: KeyPolicy
        if let shared = policiesByText.withLock({ $0[text] }) {
            policy = shared
        } else {
            // A policy kmsd stored always parses leniently; should it not, it allows nothing.
            policy = (try? KeyPolicy.parse(text, strict: false)) ?? KeyPolicy(id: nil, statements: [])
            if !policy.namesAccounts {
                policiesByText.withLock { cache in
                    if cache.count >= 1024 { cache.removeAll(keepingCapacity: true) }
                    cache[text] = policy
                }
            }
        }
        compiledPolicies.withLock { cache in
            if cache.count >= derivedCacheLimit { cache.removeAll(keepingCapacity: true) }
            cache[record.keyID] = CompiledPolicy(text: record.policy, owner: record.ownerUID, policy: policy)
        }
        return policy
    }

    /// The facts of `action` by `caller` on `record`: the request's encryption context (none
    /// given: absent, as in AWS) and alias, and the key's aliases, read only if a condition asks.
    public func requestFacts(_ action: Int, caller: Principal, record: KeyRecord, context: ContextPairs?, alias: String?) -> RequestFacts {
        var facts = RequestFacts(action: action, caller: caller, isAdministrator: isAdministrator(caller), key: record)
        facts.encryptionContext = (context?.isEmpty ?? true) ? nil : context
        facts.requestAlias = alias
        facts.region = region
        facts.aliasSource = repository
        return facts
    }

    /// The whole access decision of a request: key policy and identity policies (`decide`),
    /// then, when nothing there said yes or no, the key's grants. Also whether the key's policy
    /// puts encryption-context values in audit records. `keyPolicy`: a candidate in place of the
    /// key's own (SimulatePolicy).
    public func decideWithGrants(_ facts: RequestFacts, keyPolicy: KeyPolicy? = nil) -> (decision: PolicyDecision, auditContextValues: Bool) {
        guard let key = facts.key else { return (.implicitDeny, false) }
        let policy = keyPolicy ?? compiledPolicy(key)
        // The grants are read (once per key, then cached) even when the policies decide, so a
        // later request on a cached key needs no storage whatever its decision (runsWithoutStorage).
        let grants = compiledGrants(key.keyID)
        var decision = decide(facts, keyPolicy: policy)
        if decision.effect == .implicitDeny, let grant = grants.first(where: { $0.allows(facts) })?.record {
            decision = PolicyDecision(effect: .allow, decidedBy: "grant:\(grant.grantID)")
        }
        return (decision, policy.auditContextValues)
    }

    /// The access decision for one action on one key (`facts.key`), combining the key's policy
    /// and the identity policies as AWS combines key and IAM policies: an explicit Deny in
    /// either wins; else the key policy allows, or it delegates (Role IdentityPolicies) and an
    /// identity policy allows; else implicit deny (grants are consulted after that).
    public func decide(_ facts: RequestFacts) -> PolicyDecision {
        guard let key = facts.key else { return .implicitDeny }
        return decide(facts, keyPolicy: compiledPolicy(key))
    }

    func decide(_ facts: RequestFacts, keyPolicy: KeyPolicy) -> PolicyDecision {
        let byKey = keyPolicy.evaluate(facts)
        if byKey.effect == .explicitDeny { return byKey }
        let identity = identityPolicySet.withLock { $0 }
        guard !identity.policies.isEmpty else { return byKey.allowed ? byKey : .implicitDeny }
        let byIdentity = identity.evaluate(facts)
        if byIdentity.effect == .explicitDeny { return byIdentity }
        if byKey.allowed { return byKey }
        if byKey.delegated, byIdentity.allowed { return byIdentity }
        return .implicitDeny
    }

    /// Replaces the identity policies in force.
    public func setIdentityPolicies(_ set: IdentityPolicySet) {
        identityPolicySet.withLock { $0 = set }
        repository.noteChange()
    }

    public var identityPolicies: IdentityPolicySet { identityPolicySet.withLock { $0 } }

    /// The text of a key's policy (the default one, written out, when none was set).
    public func getKeyPolicy(_ keyID: String, name: String, caller: Principal) throws(KMSError) -> String {
        try Self.checkPolicyName(name)
        let record = try usableRecord(KeyID(parsing: keyID), caller: caller, needsEnabled: false)
        return record.policy ?? DefaultKeyPolicy.text(owner: record.ownerUID)
    }

    /// Replaces a key's policy; refused (ValidationException) when the new policy would not let
    /// the caller change it again, unless `bypass`.
    public func putKeyPolicy(_ keyID: String, name: String, policy text: String, bypass: Bool, caller: Principal) throws(KMSError) -> Change {
        try Self.checkPolicyName(name)
        return try change(keyID, caller: caller, action: "set the policy of") { (r) throws(KMSError) in
            guard r.state != .pendingDeletion else { throw Self.invalidState(r, "given a new policy") }
            try checkNewPolicy(text, for: r, caller: caller, bypass: bypass)
            r.policy = text
        }
    }

    /// AWS's lockout safety check: the policy parses strictly and, unless `bypass`, lets the
    /// caller make a later PutKeyPolicy on the key.
    func checkNewPolicy(_ text: String, for record: KeyRecord, caller: Principal, bypass: Bool) throws(KMSError) {
        let policy = try KeyPolicy.parse(text, strict: true)
        guard !bypass else { return }
        var facts = RequestFacts(action: "PutKeyPolicy", caller: caller, isAdministrator: isAdministrator(caller), key: record)!
        facts.bypassPolicyLockoutSafetyCheck = false
        guard decide(facts, keyPolicy: policy).allowed else {
            throw KMSError(.validation, "the new key policy would not allow you (uid \(caller.uid)) to change it again (kms:PutKeyPolicy), so nobody might ever be able to; include a statement that allows it, or set BypassPolicyLockoutSafetyCheck if that is really what you want")
        }
    }

    public func listKeyPolicies(_ keyID: String, limit: Int, marker: String, caller: Principal) throws(KMSError) -> [String] {
        guard limit == 0 || (1...1000).contains(limit) else { throw KMSError(.validation, "Limit must be 1...1000") }
        guard marker.isEmpty else { throw KMSError(.invalidMarker, "Marker is not one this server returned to you; a key has one policy, so there is no second page") }
        _ = try usableRecord(KeyID(parsing: keyID), caller: caller, needsEnabled: false)
        return [Self.policyName]
    }

    static func checkPolicyName(_ name: String) throws(KMSError) {
        guard name.isEmpty || name == policyName else {
            throw KMSError(.notFound, "a key has one policy, named default; there is no policy named '\(name.prefix(64))'")
        }
    }

    /// Who a simulation is about.
    public struct SimulatedPrincipal: Sendable {
        public var uid: UInt32?
        public var user: String
        public var groups: [String]
        public var unit: String
        public var executable: String
        public init(uid: UInt32?, user: String, groups: [String], unit: String, executable: String) {
            self.uid = uid; self.user = user; self.groups = groups; self.unit = unit; self.executable = executable
        }
    }

    /// Beyond AWS: would `principal` be allowed `action` on the key (with this encryption
    /// context), and which statement decides. `candidate`, when given, is evaluated instead of
    /// the key's policy (try a policy before putting it).
    public func simulatePolicy(_ keyID: String, action: String, principal p: SimulatedPrincipal, context: [String: String],
                               candidate: String, caller: Principal) throws(KMSError) -> (decision: PolicyDecision, keyID: KeyID) {
        let record = try usableRecord(KeyID(parsing: keyID), caller: caller, needsEnabled: false)
        guard let index = PolicyActions.index(of: action) else {
            throw KMSError(.validation, "Action '\(action.prefix(64))' is not a kms action (write it as kms:Encrypt)")
        }
        var uid = p.uid
        if uid == nil, !p.user.isEmpty {
            guard let resolved = PrincipalPattern.uid(of: p.user) else { throw KMSError(.validation, "there is no user '\(p.user.prefix(64))' on this host") }
            uid = resolved
        }
        guard let uid else { throw KMSError(.validation, "give the principal's uid or user name") }
        var gids: [UInt32] = []
        for g in p.groups {
            guard let gid = PrincipalPattern.gid(of: g) ?? UInt32(g) else { throw KMSError(.validation, "there is no group '\(g.prefix(64))' on this host") }
            gids.append(gid)
        }
        let principal = Principal(uid: uid, gid: gids.first ?? uid, pid: 0, userName: p.user.isEmpty ? Principal.userName(of: uid) : p.user,
                                  groups: Array(gids.dropFirst()), executable: p.executable.isEmpty ? nil : p.executable,
                                  systemdUnit: p.unit.isEmpty ? nil : p.unit)
        let facts = requestFacts(index, caller: principal, record: record, context: context.contextPairs, alias: nil)
        // A candidate policy takes the key policy's place; identity policies and grants as they are.
        let candidatePolicy = candidate.isEmpty ? nil : try KeyPolicy.parse(candidate, strict: true)
        return (decideWithGrants(facts, keyPolicy: candidatePolicy).decision, record.keyID)
    }

}

/// Access reviews (beyond AWS): every permission on a key, from its policy, the identity
/// policies and its grants, as written, with what deserves a second look flagged.
extension KeyService {
    public struct AccessEntry: Sendable, Equatable {
        public var source: String
        public var effect: String
        public var principals: [String]
        public var notPrincipal = false
        public var actions: [String]
        public var notAction = false
        public var conditions: String
        public var flags: [String]
    }

    public func reviewAccess(_ record: KeyRecord) throws(KMSError) -> [AccessEntry] {
        // An identity policy's statements have no Principal of their own: they apply to the
        // identities the policy is attached to, so they are never a wildcard principal.
        func flags(_ s: KeyPolicy.Statement, attached: Bool = false) -> [String] {
            var f: [String] = []
            if s.wildcardPrincipal, !attached { f.append("wildcard-principal") }
            if s.wildcardAction { f.append("wildcard-action") }
            if s.delegatesToIdentityPolicies { f.append("delegates-to-identity-policies") }
            return f
        }
        func entry(_ s: KeyPolicy.Statement, source: String, principals: [String], attached: Bool = false) -> AccessEntry {
            AccessEntry(source: source, effect: s.effect == .allow ? "Allow" : "Deny", principals: principals, notPrincipal: s.isNotPrincipal,
                        actions: s.actionText, notAction: s.isNotAction, conditions: s.conditionText ?? "", flags: flags(s, attached: attached))
        }
        let keyPolicy = compiledPolicy(record)
        var entries = keyPolicy.statements.map { entry($0, source: "key-policy:\($0.name)", principals: $0.principalText) }
        let delegates = keyPolicy.statements.contains { $0.delegatesToIdentityPolicies }
        for p in identityPolicies.policies {
            // An Allow counts only where the key policy lets identity policies decide; a Deny always.
            for s in p.statements(covering: record.keyID) where s.effect == .deny || delegates {
                entries.append(entry(s, source: "identity-policy:\(p.name):\(s.name)", principals: p.attachText, attached: true))
            }
        }
        for g in try repository.grants(of: record.keyID) {
            var c: [String: Any] = [:]
            if let subset = g.encryptionContextSubset { c["EncryptionContextSubset"] = subset }
            if let equals = g.encryptionContextEquals { c["EncryptionContextEquals"] = equals }
            let text = c.isEmpty ? "" : (try? JSONSerialization.data(withJSONObject: c, options: [.sortedKeys])).map { String(decoding: $0, as: UTF8.self) } ?? ""
            entries.append(AccessEntry(source: "grant:\(g.grantID)", effect: "Allow", principals: [g.granteePrincipal],
                                       actions: g.operations.map { "kms:" + $0 }, conditions: text, flags: []))
        }
        return entries
    }
}
