import Foundation
import KMSCore
import KMSProtocol

/// GetReplicationIdentity and PinReplicationIdentity (administrators only, decided in
/// Authorizer): which kmsd this is, and which others may send it keys.
enum ReplicationHandlers {
    static func message(_ p: ReplicationPeer) -> Kmsd_V1_ReplicationIdentity {
        .with {
            $0.region = p.region
            $0.agreementPublicKey = Data(p.agreementPublicKey)
            $0.signingPublicKey = Data(p.signingPublicKey)
            $0.fingerprint = p.fingerprint
        }
    }

    static func identity(_ ctx: HandlerContext) throws(KMSError) -> ReplicationIdentity {
        guard let identity = ctx.identity else { throw KMSError(.unsupportedOperation, "this server has no replication identity") }
        return identity
    }

    static func getReplicationIdentity(_ ctx: HandlerContext) throws(KMSError) -> Kmsd_V1_GetReplicationIdentityResponse {
        let mine = try identity(ctx)
        let pinned = try ctx.service.repository.replicationPeers()
        return .with {
            $0.identity = message(mine.peer)
            $0.pinned = pinned.map(message)
        }
    }

    static func pinReplicationIdentity(_ r: Kmsd_V1_PinReplicationIdentityRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_PinReplicationIdentityResponse {
        let mine = try identity(ctx)
        let given = r.identity
        guard ServerConfiguration.isValidRegion(given.region) else {
            throw KMSError(.validation, "Region '\(given.region.prefix(64))' is not a region name: 1 to 63 lowercase letters, digits and hyphens")
        }
        guard given.agreementPublicKey.count == 32, given.signingPublicKey.count == 32 else {
            throw KMSError(.validation, "AgreementPublicKey and SigningPublicKey must be 32 bytes each (X25519 and Ed25519), as get-replication-identity prints them")
        }
        let peer = ReplicationPeer(region: given.region, agreementPublicKey: Array(given.agreementPublicKey), signingPublicKey: Array(given.signingPublicKey))
        guard given.fingerprint.isEmpty || given.fingerprint.lowercased() == peer.fingerprint else {
            throw KMSError(.validation, "the fingerprint given (\(given.fingerprint.prefix(40))) is not that of these keys and region (\(peer.fingerprint)): the identity was altered or copied wrongly")
        }
        guard peer.region != mine.region else {
            throw KMSError(.validation, "region \(peer.region) is this kmsd's own region; pin the identities of other regions")
        }
        let replaced: ReplicationPeer?
        let repository = ctx.service.repository
        do { replaced = try repository.pin(peer) } catch let e as KMSError { throw e } catch {
            throw KMSError(.internalError, "the pin could not be stored: \(error)")
        }
        // Unaudited, the pin is taken back (the earlier one of its region restored).
        d.undo = { try repository.unpin(region: peer.region, restoring: replaced) }
        return .with {
            $0.identity = message(peer)
            $0.replaced = replaced != nil
        }
    }

    static func replicateKey(_ r: Kmsd_V1_ReplicateKeyRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ReplicateKeyResponse {
        let mine = try identity(ctx)
        let decided = try ctx.decidedRecord()
        var input = KeyService.ReplicateInput()
        input.replicaRegion = r.replicaRegion
        input.policy = r.policy
        input.description = r.description_p
        input.tags = r.tags.map { Tag(key: $0.tagKey, value: $0.tagValue) }
        // The service changes the key's record as it is now (under the key's lock), not the
        // decision's copy, so a change made in between is not lost; unaudited, the replica
        // region is taken back only if nothing changed the key since (KeyHandlers.note).
        let (bundle, change) = try ctx.service.replicate(decided.keyID, input, identity: mine, caller: ctx.principal)
        KeyHandlers.note(change, ctx, &d)
        d.keyVersion = change.after.currentVersion
        return .with {
            $0.replicationBundle = Data(bundle)
            $0.keyMetadata = KeyHandlers.metadata(change.after)
        }
    }

    static func importReplica(_ r: Kmsd_V1_ImportReplicaRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ImportReplicaResponse {
        let mine = try identity(ctx)
        let (record, added, created, forgotten) = try ctx.service.importReplica(Array(r.replicationBundle), identity: mine, caller: ctx.principal)
        d.keyID = record.keyID.description
        // Unaudited, a replica deletion notice taken is undone: the primary lists the region
        // again (unless the key changed since).
        if let forgotten { KeyHandlers.note(forgotten, ctx, &d) }
        // Unaudited, a replica this bundle created is removed again (versions added to an
        // existing replica stay: they are the primary's, and the next bundle brings them anyway).
        if created {
            let repository = ctx.service.repository, created = record.keyID
            d.undo = { try repository.delete(created) }
        }
        d.keyVersion = record.currentVersion
        return .with {
            $0.keyMetadata = KeyHandlers.metadata(record)
            $0.importedVersions = UInt32(added)
        }
    }

    static func updatePrimaryRegion(_ r: Kmsd_V1_UpdatePrimaryRegionRequest, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_UpdatePrimaryRegionResponse {
        let mine = try identity(ctx)
        let decided = try ctx.decidedRecord()
        // Changed as stored now, under the key's lock, as ReplicateKey.
        let (bundle, change) = try ctx.service.updatePrimaryRegion(decided.keyID, to: r.primaryRegion, identity: mine, caller: ctx.principal)
        // Unaudited, the key stays the primary (nobody got the bundle that promotes the other),
        // unless it changed again since (KeyHandlers.note: compare and restore).
        KeyHandlers.note(change, ctx, &d)
        d.keyVersion = change.after.currentVersion
        return .with {
            $0.replicationBundle = Data(bundle)
            $0.keyMetadata = KeyHandlers.metadata(change.after)
        }
    }
}
