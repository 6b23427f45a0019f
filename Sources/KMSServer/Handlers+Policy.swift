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
