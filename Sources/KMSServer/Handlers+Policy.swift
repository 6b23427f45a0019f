import KMSCore
import KMSProtocol

/// GetKeyPolicy, PutKeyPolicy, ListKeyPolicies, and (beyond AWS) SimulatePolicy.
enum PolicyHandlers {
    static func getKeyPolicy(_ r: Kmsd_V1_GetKeyPolicyRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_GetKeyPolicyResponse {
        d.noteKey(requested: r.keyID)
        let text = try ctx.service.getKeyPolicy(r.keyID, name: r.policyName, caller: ctx.principal)
        return .with { $0.policy = text; $0.policyName = KeyService.policyName }
    }

    static func putKeyPolicy(_ r: Kmsd_V1_PutKeyPolicyRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_PutKeyPolicyResponse {
        d.noteKey(requested: r.keyID)
        let change = try ctx.service.putKeyPolicy(r.keyID, name: r.policyName, policy: r.policy,
                                                  bypass: r.bypassPolicyLockoutSafetyCheck, caller: ctx.principal)
        KeyHandlers.note(change, ctx, &d)
        return .init()
    }

    static func listKeyPolicies(_ r: Kmsd_V1_ListKeyPoliciesRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ListKeyPoliciesResponse {
        d.noteKey(requested: r.keyID)
        let names = try ctx.service.listKeyPolicies(r.keyID, limit: Int(r.limit), marker: r.marker, caller: ctx.principal)
        return .with { $0.policyNames = names }
    }

    static func simulatePolicy(_ r: Kmsd_V1_SimulatePolicyRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_SimulatePolicyResponse {
        d.noteKey(requested: r.keyID)
        let p = r.principal
        let principal = KeyService.SimulatedPrincipal(uid: p.hasUid_p ? p.uid : nil, user: p.user, groups: p.groups,
                                                      unit: p.unit, executable: p.executable)
        let result = try ctx.service.simulatePolicy(r.keyID, action: r.action, principal: principal, context: r.encryptionContext,
                                                    candidate: r.policy, caller: ctx.principal)
        return .with {
            $0.decision = result.decision.effect.rawValue
            $0.decidedBy = result.decision.decidedBy
            $0.keyID = result.keyID.description
        }
    }
}

/// ReviewAccess (beyond AWS): one key's permissions, or every key's (administrators).
enum ReviewHandlers {
    static func reviewAccess(_ r: Kmsd_V1_ReviewAccessRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ReviewAccessResponse {
        let service = ctx.service
        let limit = r.limit == 0 ? 10 : Int(r.limit)
        guard (1...50).contains(limit) else { throw KMSError(.validation, "Limit must be 1...50") }
        var ids: [KeyID] = []
        var next: String? = nil
        if !r.keyID.isEmpty {
            d.noteKey(requested: r.keyID)
            ids = [try KeyID(parsing: r.keyID)]
        } else {
            let after = try KeyService.textMarkerKey(r.marker, label: "review", caller: ctx.principal, repository: service.repository)
            ids = try service.repository.keyIDs(after: after, limit: limit + 1)
            if ids.count > limit {
                ids.removeLast()
                next = KeyService.makeTextMarker(ids.last!.description, label: "review", caller: ctx.principal, repository: service.repository)
            }
        }
        // Keep the answer within a frame: stop early (with a marker) when it grows large.
        var budget = ctx.settings.maxFrameBytes / 2
        var keys: [Kmsd_V1_KeyAccess] = []
        for id in ids {
            guard let record = try? service.repository.record(id, caching: false) else { continue }
            let entries = try service.reviewAccess(record)
            let size = entries.reduce(64) { $0 + $1.source.utf8.count + $1.conditions.utf8.count + ($1.principals + $1.actions).reduce(0) { $0 + $1.utf8.count + 4 } + 32 }
            if !keys.isEmpty, size > budget {
                next = KeyService.makeTextMarker(keys.last!.keyID, label: "review", caller: ctx.principal, repository: service.repository)
                break
            }
            budget -= size
            keys.append(.with { k in
                k.keyID = id.description
                k.entries = entries.map { e in
                    .with {
                        $0.source = e.source
                        $0.effect = e.effect
                        $0.principals = e.principals
                        $0.notPrincipal = e.notPrincipal
                        $0.actions = e.actions
                        $0.notAction = e.notAction
                        $0.conditions = e.conditions
                        $0.flags = e.flags
                    }
                }
            })
        }
        return .with {
            $0.keys = keys
            $0.nextMarker = next ?? ""
            $0.truncated = next != nil
        }
    }
}
