import Foundation
import KMSCore
import KMSProtocol

/// CreateAlias, UpdateAlias, DeleteAlias, ListAliases; TagResource, UntagResource,
/// ListResourceTags. Each change is undone when its audit record is refused.
enum AliasHandlers {
    static func createAlias(_ r: Kmsd_V1_CreateAliasRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_CreateAliasResponse {
        d.alias = auditAlias(r.aliasName)
        d.keyID = AuditDetails.keyID(requested: r.targetKeyID)
        let alias = try ctx.service.createAlias(r.aliasName, targetKeyID: r.targetKeyID, caller: ctx.principal)
        d.keyID = alias.keyID.description
        let service = ctx.service, name = alias.aliasName
        d.undo = { try service.restoreAlias(nil, ifCurrentIs: alias, name: name) }
        return .init()
    }

    static func updateAlias(_ r: Kmsd_V1_UpdateAliasRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_UpdateAliasResponse {
        d.alias = auditAlias(r.aliasName)
        d.keyID = AuditDetails.keyID(requested: r.targetKeyID)
        let change = try ctx.service.updateAlias(r.aliasName, targetKeyID: r.targetKeyID, expectedCurrent: d.decidedAliasTarget, caller: ctx.principal)
        d.keyID = change.after.keyID.description
        let service = ctx.service, before = change.before, after = change.after
        d.undo = { try service.restoreAlias(before, ifCurrentIs: after, name: before.aliasName) }
        return .init()
    }

    static func deleteAlias(_ r: Kmsd_V1_DeleteAliasRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_DeleteAliasResponse {
        d.alias = auditAlias(r.aliasName)
        let alias = try ctx.service.deleteAlias(r.aliasName, expectedCurrent: d.decidedAliasTarget, caller: ctx.principal)
        d.keyID = alias.keyID.description
        let service = ctx.service
        d.undo = { try service.restoreAlias(alias, ifCurrentIs: nil, name: alias.aliasName) }
        return .init()
    }

    static func listAliases(_ r: Kmsd_V1_ListAliasesRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ListAliasesResponse {
        d.keyID = AuditDetails.keyID(requested: r.keyID)
        // Keep the response within max_frame_bytes: an entry takes at most about 600 bytes.
        let fits = max(1, (ctx.settings.maxFrameBytes - 256) / 600)
        let requested = r.limit == 0 ? KMSLimits.defaultListLimit : Int(r.limit)
        guard requested <= KMSLimits.maxListLimit else { throw KMSError(.validation, "Limit must be 1...\(KMSLimits.maxListLimit)") }
        let page = try ctx.service.listAliases(keyID: r.keyID, limit: min(requested, fits), marker: r.marker, caller: ctx.principal)
        return .with {
            $0.aliases = page.aliases.map { a in
                .with {
                    $0.aliasName = a.aliasName
                    $0.aliasArn = KMSLimits.aliasARNPrefix + a.aliasName.dropFirst("alias/".count)
                    $0.targetKeyID = a.keyID.description
                    $0.creationDate = Int64(a.createdAt.timeIntervalSince1970)
                    $0.lastUpdatedDate = Int64(a.updatedAt.timeIntervalSince1970)
                }
            }
            $0.nextMarker = page.nextMarker ?? ""
            $0.truncated = page.nextMarker != nil
        }
    }

    static func tagResource(_ r: Kmsd_V1_TagResourceRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_TagResourceResponse {
        d.keyID = AuditDetails.keyID(requested: r.keyID)
        let tags = r.tags.map { Tag(key: $0.tagKey, value: $0.tagValue) }
        KeyHandlers.note(try ctx.service.tagResource(r.keyID, tags: tags, caller: ctx.principal), ctx, &d)
        return .init()
    }

    static func untagResource(_ r: Kmsd_V1_UntagResourceRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_UntagResourceResponse {
        d.keyID = AuditDetails.keyID(requested: r.keyID)
        KeyHandlers.note(try ctx.service.untagResource(r.keyID, tagKeys: r.tagKeys, caller: ctx.principal), ctx, &d)
        return .init()
    }

    static func listResourceTags(_ r: Kmsd_V1_ListResourceTagsRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ListResourceTagsResponse {
        d.keyID = AuditDetails.keyID(requested: r.keyID)
        // The page stops early rather than outgrow max_frame_bytes (room left for the rest).
        let page = try ctx.service.listResourceTags(r.keyID, limit: Int(r.limit), marker: r.marker,
                                                    maxBytes: ctx.settings.maxFrameBytes - 512, caller: ctx.principal)
        return .with {
            $0.tags = page.tags.map { t in .with { $0.tagKey = t.key; $0.tagValue = t.value } }
            $0.nextMarker = page.nextMarker ?? ""
            $0.truncated = page.nextMarker != nil
        }
    }

    /// The alias name for the audit record: only a name that could be one (so a secret pasted
    /// into the field never reaches the journal), else "invalid".
    static func auditAlias(_ text: String) -> String {
        let name = AuditDetails.alias(requested: text)
        return name.isEmpty && !text.isEmpty ? "invalid" : name
    }
}
