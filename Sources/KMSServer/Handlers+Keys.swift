import Foundation
import KMSCore
import KMSProtocol

/// CreateKey, DescribeKey, ListKeys, and the lifecycle: EnableKey, DisableKey,
/// ScheduleKeyDeletion, CancelKeyDeletion, UpdateKeyDescription.
enum KeyHandlers {
    static func createKey(_ r: Kmsd_V1_CreateKeyRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_CreateKeyResponse {
        var input = KeyService.CreateKeyInput()
        input.description = r.description_p
        input.keySpec = r.keySpec
        input.keyUsage = r.keyUsage
        input.tags = r.tags.map { Tag(key: $0.tagKey, value: $0.tagValue) }
        input.origin = r.origin
        input.policy = r.policy
        input.bypassPolicyLockoutSafetyCheck = r.bypassPolicyLockoutSafetyCheck
        input.multiRegion = r.multiRegion
        let record = try ctx.service.createKey(input, caller: ctx.principal)
        d.keyID = record.keyID.description
        d.keyVersion = record.currentVersion
        // A key nobody was told about must not stay behind if its audit record is refused.
        let repository = ctx.service.repository, id = record.keyID
        d.undo = { try repository.delete(id) }
        return .with { $0.keyMetadata = metadata(record) }
    }

    static func describeKey(_ r: Kmsd_V1_DescribeKeyRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_DescribeKeyResponse {
        d.noteKey(requested: r.keyID)
        let record = try ctx.service.describeKey(r.keyID, caller: ctx.principal)
        d.keyID = record.keyID.description
        return .with { $0.keyMetadata = metadata(record) }
    }

    static func listKeys(_ r: Kmsd_V1_ListKeysRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ListKeysResponse {
        // Keep the response within max_frame_bytes: an entry takes under 100 bytes.
        let fits = max(1, (ctx.settings.maxFrameBytes - 256) / 100)
        let requested = r.limit == 0 ? KMSLimits.defaultListLimit : Int(r.limit)
        guard requested <= KMSLimits.maxListLimit else { throw KMSError(.validation, "Limit must be 1...\(KMSLimits.maxListLimit)") }
        let page = try ctx.service.listKeys(limit: min(requested, fits), marker: r.marker, caller: ctx.principal)
        d.integrityFailures = page.skipped.map(\.description)
        return .with {
            $0.keys = page.keys.map { id in .with { $0.keyID = id.description; $0.keyArn = id.arn } }
            $0.nextMarker = page.nextMarker ?? ""
            $0.truncated = page.nextMarker != nil
        }
    }

    // MARK: - Lifecycle

    /// Audits the key and arranges for the change to be undone if its record is refused.
    static func note(_ change: KeyService.Change, _ ctx: HandlerContext, _ d: inout AuditDetails) {
        d.keyID = change.after.keyID.description
        guard change.before != change.after else { return }
        let service = ctx.service, before = change.before, after = change.after
        d.undo = { try service.restore(before, ifCurrentIs: after) }
    }

    static func enableKey(_ r: Kmsd_V1_EnableKeyRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_EnableKeyResponse {
        d.noteKey(requested: r.keyID)
        note(try ctx.service.enableKey(r.keyID, caller: ctx.principal), ctx, &d)
        return .init()
    }

    static func disableKey(_ r: Kmsd_V1_DisableKeyRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_DisableKeyResponse {
        d.noteKey(requested: r.keyID)
        note(try ctx.service.disableKey(r.keyID, caller: ctx.principal), ctx, &d)
        return .init()
    }

    static func scheduleKeyDeletion(_ r: Kmsd_V1_ScheduleKeyDeletionRequest, _ ctx: HandlerContext,
                                    _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ScheduleKeyDeletionResponse {
        d.noteKey(requested: r.keyID)
        let change = try ctx.service.scheduleKeyDeletion(r.keyID, windowDays: r.pendingWindowInDays, caller: ctx.principal)
        note(change, ctx, &d)
        // A replica's notice for its primary, which cannot be deleted while it lists replicas.
        // The key is scheduled by now: a notice that cannot be made is left out, not an error,
        // but not silently either: the operator reads in kmsd's log that the primary will not
        // get one (the error's code and message name no secret).
        var notice: [UInt8]? = nil
        if let identity = ctx.identity {
            do throws(KMSError) { notice = try ctx.service.replicaDeletionNotice(change.after, identity: identity) } catch {
                StandardError.write("kmsd: WARNING: key \(change.after.keyID) is scheduled for deletion, but its replica deletion notice for its primary (region \(change.after.primaryRegion ?? "?")) could not be made (\(error.code.rawValue): \(error.message)); the primary keeps listing this region until it gets one (cancel the deletion and schedule it again to retry)\n")
            }
        }
        return .with {
            $0.keyID = change.after.keyID.description
            $0.deletionDate = Int64(change.after.deletionDate?.timeIntervalSince1970 ?? 0)
            $0.keyState = change.after.state.rawValue
            $0.pendingWindowInDays = change.after.pendingWindowInDays ?? 0
            if let notice { $0.replicaDeletionNotice = Data(notice) }
        }
    }

    static func cancelKeyDeletion(_ r: Kmsd_V1_CancelKeyDeletionRequest, _ ctx: HandlerContext,
                                  _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_CancelKeyDeletionResponse {
        d.noteKey(requested: r.keyID)
        let change = try ctx.service.cancelKeyDeletion(r.keyID, caller: ctx.principal)
        note(change, ctx, &d)
        return .with { $0.keyID = change.after.keyID.description }
    }

    static func updateKeyDescription(_ r: Kmsd_V1_UpdateKeyDescriptionRequest, _ ctx: HandlerContext,
                                     _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_UpdateKeyDescriptionResponse {
        d.noteKey(requested: r.keyID)
        note(try ctx.service.updateKeyDescription(r.keyID, description: r.description_p, caller: ctx.principal), ctx, &d)
        return .init()
    }

    static func metadata(_ k: KeyRecord) -> Kmsd_V1_KeyMetadata {
        .with {
            $0.keyID = k.keyID.description
            $0.arn = k.keyID.arn
            $0.creationDate = Int64(k.createdAt.timeIntervalSince1970)
            $0.enabled = k.state == .enabled
            $0.description_p = k.description
            $0.keyUsage = k.keyUsage.rawValue
            $0.keyState = k.state.rawValue
            $0.keySpec = k.keySpec.rawValue
            $0.origin = k.origin
            $0.keyManager = "CUSTOMER"
            $0.encryptionAlgorithms = ["SYMMETRIC_DEFAULT"]
            $0.ownerUid = k.ownerUID
            $0.currentKeyVersion = k.currentVersion
            $0.minimumDecryptionVersion = k.minimumDecryptionVersion ?? 1
            $0.expirationModel = k.expirationModel ?? ""
            $0.validTo = Int64(k.validTo?.timeIntervalSince1970 ?? 0)
            if k.state == .pendingDeletion {
                $0.deletionDate = Int64(k.deletionDate?.timeIntervalSince1970 ?? 0)
                $0.pendingDeletionWindowInDays = k.pendingWindowInDays ?? 0
            }
            $0.multiRegion = k.keyID.isMultiRegion
            if let type = k.multiRegionKeyType {
                let arn = k.keyID.arn
                $0.multiRegionConfiguration = .with {
                    $0.multiRegionKeyType = type
                    $0.primaryKey = .with { $0.arn = arn; $0.region = k.primaryRegion ?? "" }
                    $0.replicaKeys = (k.replicaRegions ?? []).map { region in .with { $0.arn = arn; $0.region = region } }
                }
            }
        }
    }
}
