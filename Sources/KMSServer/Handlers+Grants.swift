import Foundation
import KMSCore
import KMSProtocol

/// Request → domain conversions shared by the authorizer and the handlers.
enum Handlers {
    static func grantInput(_ r: Kmsd_V1_CreateGrantRequest, keyID: KeyID) -> KeyService.GrantInput {
        KeyService.GrantInput(keyID: keyID, grantee: r.granteePrincipal, retiring: r.retiringPrincipal, operations: r.operations,
                              contextSubset: r.hasConstraints && !r.constraints.encryptionContextSubset.isEmpty ? r.constraints.encryptionContextSubset : nil,
                              contextEquals: r.hasConstraints && !r.constraints.encryptionContextEquals.isEmpty ? r.constraints.encryptionContextEquals : nil,
                              name: r.name)
    }
}

/// CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant.
enum GrantHandlers {
    static func createGrant(_ r: Kmsd_V1_CreateGrantRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_CreateGrantResponse {
        d.noteKey(requested: r.keyID)
        guard r.grantTokens.count <= 10, r.grantTokens.allSatisfy({ $0.utf8.count <= 8192 }) else {
            throw KMSError(.validation, "GrantTokens takes at most 10 tokens of at most 8192 bytes")
        }
        let result = try ctx.service.createGrant(Handlers.grantInput(r, keyID: try KeyID(parsing: r.keyID)), caller: ctx.principal)
        d.grantID = result.grant.grantID
        if result.created {
            let service = ctx.service, grant = result.grant
            d.undo = { try service.undoGrant(created: grant, deleted: nil) }
        }
        return .with { $0.grantID = result.grant.grantID; $0.grantToken = KeyService.grantToken(result.grant) }
    }

    static func listGrants(_ r: Kmsd_V1_ListGrantsRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ListGrantsResponse {
        d.noteKey(requested: r.keyID)
        let page = try ctx.service.listGrants(r.keyID, grantID: r.grantID, grantee: r.granteePrincipal, limit: Int(r.limit),
                                              marker: r.marker, caller: ctx.principal)
        return .with {
            $0.grants = page.grants.map(entry)
            $0.nextMarker = page.nextMarker ?? ""
            $0.truncated = page.nextMarker != nil
        }
    }

    static func listRetirableGrants(_ r: Kmsd_V1_ListRetirableGrantsRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ListRetirableGrantsResponse {
        let page = try ctx.service.listRetirableGrants(r.retiringPrincipal, limit: Int(r.limit), marker: r.marker, caller: ctx.principal)
        return .with {
            $0.grants = page.grants.map(entry)
            $0.nextMarker = page.nextMarker ?? ""
            $0.truncated = page.nextMarker != nil
        }
    }

    static func retireGrant(_ r: Kmsd_V1_RetireGrantRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_RetireGrantResponse {
        let grant = try ctx.service.retireGrant(keyID: try KeyID(parsing: r.keyID), grantID: r.grantID, caller: ctx.principal)
        d.grantID = grant.grantID
        let service = ctx.service
        d.undo = { try service.undoGrant(created: nil, deleted: grant) }
        return .init()
    }

    static func revokeGrant(_ r: Kmsd_V1_RevokeGrantRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_RevokeGrantResponse {
        d.noteKey(requested: r.keyID)
        let grant = try ctx.service.revokeGrant(r.keyID, grantID: r.grantID, caller: ctx.principal)
        d.grantID = grant.grantID
        let service = ctx.service
        d.undo = { try service.undoGrant(created: nil, deleted: grant) }
        return .init()
    }

    static func entry(_ g: GrantRecord) -> Kmsd_V1_GrantListEntry {
        .with {
            $0.keyID = g.keyID.description
            $0.grantID = g.grantID
            $0.name = g.name
            $0.creationDate = Int64(g.createdAt.timeIntervalSince1970)
            $0.granteePrincipal = g.granteePrincipal
            $0.retiringPrincipal = g.retiringPrincipal ?? ""
            $0.issuingPrincipal = g.issuingPrincipal
            $0.operations = g.operations
            if g.encryptionContextSubset != nil || g.encryptionContextEquals != nil {
                $0.constraints = .with {
                    $0.encryptionContextSubset = g.encryptionContextSubset ?? [:]
                    $0.encryptionContextEquals = g.encryptionContextEquals ?? [:]
                }
            }
        }
    }
}
