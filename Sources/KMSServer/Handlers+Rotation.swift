import KMSCore
import KMSProtocol

/// EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus, RotateKeyOnDemand,
/// ListKeyRotations, and (beyond AWS) SetMinimumDecryptionVersion.
enum RotationHandlers {
    static func enableKeyRotation(_ r: Kmsd_V1_EnableKeyRotationRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_EnableKeyRotationResponse {
        d.noteKey(requested: r.keyID)
        KeyHandlers.note(try ctx.service.enableKeyRotation(r.keyID, periodDays: r.rotationPeriodInDays, caller: ctx.principal), ctx, &d)
        return .init()
    }

    static func disableKeyRotation(_ r: Kmsd_V1_DisableKeyRotationRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_DisableKeyRotationResponse {
        d.noteKey(requested: r.keyID)
        KeyHandlers.note(try ctx.service.disableKeyRotation(r.keyID, caller: ctx.principal), ctx, &d)
        return .init()
    }

    static func getKeyRotationStatus(_ r: Kmsd_V1_GetKeyRotationStatusRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_GetKeyRotationStatusResponse {
        d.noteKey(requested: r.keyID)
        let k = try ctx.service.keyRotationStatus(r.keyID, caller: ctx.principal)
        d.keyID = k.keyID.description
        return .with {
            $0.keyID = k.keyID.description
            $0.keyRotationEnabled = k.rotationPeriodDays != nil
            $0.rotationPeriodInDays = k.rotationPeriodDays ?? 0
            $0.nextRotationDate = Int64(k.nextRotationDate?.timeIntervalSince1970 ?? 0)
            $0.currentKeyVersion = k.currentVersion
            $0.minimumDecryptionVersion = k.minimumDecryptionVersion ?? 1
        }
    }

    static func rotateKeyOnDemand(_ r: Kmsd_V1_RotateKeyOnDemandRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_RotateKeyOnDemandResponse {
        d.noteKey(requested: r.keyID)
        try ctx.requireAuditable("rotate a key")
        let k = try ctx.service.rotateKeyOnDemand(r.keyID, caller: ctx.principal)
        d.keyID = k.keyID.description
        d.keyVersion = k.currentVersion
        // A rotation is not undone when its record is refused: the new version may already
        // have encrypted data. So it is refused up front while journald is known not to take
        // records; should journald fail in between, the answer still says the audit failed.
        return .with { $0.keyID = k.keyID.description; $0.keyVersion = k.currentVersion }
    }

    static func listKeyRotations(_ r: Kmsd_V1_ListKeyRotationsRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ListKeyRotationsResponse {
        d.noteKey(requested: r.keyID)
        let fits = max(1, (ctx.settings.maxFrameBytes - 256) / 100)
        let requested = r.limit == 0 ? KMSLimits.defaultListLimit : Int(r.limit)
        guard requested <= KMSLimits.maxListLimit else { throw KMSError(.validation, "Limit must be 1...\(KMSLimits.maxListLimit)") }
        let page = try ctx.service.listKeyRotations(r.keyID, limit: min(requested, fits), marker: r.marker, caller: ctx.principal)
        return .with {
            $0.rotations = page.rotations.map { v in
                .with {
                    $0.keyID = v.keyID.description
                    $0.rotationDate = Int64(v.createdAt.timeIntervalSince1970)
                    $0.rotationType = v.rotationType ?? "AUTOMATIC"
                    $0.keyVersion = v.version
                }
            }
            $0.nextMarker = page.nextMarker ?? ""
            $0.truncated = page.nextMarker != nil
        }
    }

    static func setMinimumDecryptionVersion(_ r: Kmsd_V1_SetMinimumDecryptionVersionRequest, _ ctx: HandlerContext,
                                            _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_SetMinimumDecryptionVersionResponse {
        d.noteKey(requested: r.keyID)
        let change = try ctx.service.setMinimumDecryptionVersion(r.keyID, version: r.minimumDecryptionVersion, caller: ctx.principal)
        KeyHandlers.note(change, ctx, &d)
        d.keyVersion = r.minimumDecryptionVersion
        return .init()
    }
}
