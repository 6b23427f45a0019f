import Foundation
import KMSCrypto
import KMSProtocol

/// Multi-region keys (PROTOCOL.md §15.3, §15.4): a primary's versions travel to a replica's
/// kmsd in a replication bundle, wrapped to the replica's pinned X25519 identity and signed with
/// the primary's Ed25519 identity; the material is never unwrapped outside a kmsd.
extension KeyService {
    static let bundleSignatureLabel = Array("kmsd/v1/replication-bundle".utf8)
    static let bundleWrapLabel = Array("kmsd/v1/replication-wrap".utf8)
    static let bundleVersionLabel = Array("kmsd/v1/replicated-version".utf8)

    /// The key that wraps a bundle's versions: HKDF-SHA256(X25519 shared secret, salt =
    /// ephemeral public ‖ target agreement public, info = label ‖ lp(key id) ‖ u64be(sequence)).
    static func bundleKey(shared: SecureBytes, ephemeralPublic: [UInt8], targetPublic: [UInt8], keyID: String, sequence: UInt64) throws -> SecureBytes {
        var info = bundleWrapLabel
        info.appendLengthPrefixed(Array(keyID.utf8))
        info.appendBigEndian(sequence)
        return try HKDF.deriveKey(from: shared, salt: ephemeralPublic + targetPublic, info: info)
    }

    static func versionAAD(keyID: String, version: UInt32) -> [UInt8] {
        var aad = bundleVersionLabel
        aad.appendLengthPrefixed(Array(keyID.utf8))
        aad.appendBigEndian(version)
        return aad
    }

    public struct ReplicateInput: Sendable {
        public var replicaRegion = ""
        public var policy = ""
        public var description = ""
        public var tags: [Tag] = []
        public init() {}
    }

    /// A bundle of every version of the primary `id` for `input.replicaRegion`, signed by
    /// `identity`; the primary's record then lists the replica region. Access was decided before
    /// (kms:ReplicateKey on the key).
    ///
    /// The key is read, changed and written under its lock, from its record as stored now, not
    /// the one the access decision read: a change that came in between (TagResource,
    /// DisableKey) is kept, not overwritten with an older record. The returned change is undone
    /// with `restore(_:ifCurrentIs:)`, so an undo does not revert a later change either.
    public func replicate(_ id: KeyID, _ input: ReplicateInput, identity: ReplicationIdentity, caller: Principal) throws(KMSError) -> (bundle: [UInt8], change: Change) {
        try locked(id) { () throws(KMSError) -> (bundle: [UInt8], change: Change) in
            let record = try usableRecord(id, caller: caller, needsEnabled: false)
            try Self.requirePrimary(record, "replicate it")
            guard input.replicaRegion != region else {
                throw KMSError(.validation, "ReplicaRegion \(input.replicaRegion) is this kmsd's own region")
            }
            guard let target = try repository.replicationPeers().first(where: { $0.region == input.replicaRegion }) else {
                throw KMSError(.validation, "no identity is pinned for region '\(input.replicaRegion.prefix(64))': pin the replica's identity first (kmsctl pin-replication-identity)")
            }
            if !input.description.isEmpty, input.description.utf8.count > KMSLimits.maxDescriptionBytes {
                throw KMSError(.validation, "Description is \(input.description.utf8.count) bytes; at most \(KMSLimits.maxDescriptionBytes) are allowed")
            }
            try Self.validate(tags: input.tags)
            if !input.policy.isEmpty { _ = try KeyPolicy.parse(input.policy, strict: true) }
            let (signed, sequence) = try makeBundle(record, for: target, identity: identity, primaryRegion: region, replicaRegions: [],
                                                    policy: input.policy, description: input.description.isEmpty ? record.description : input.description,
                                                    tags: input.tags.isEmpty ? record.tags : input.tags)
            var primary = record
            primary.replicaRegions = Array(Set((primary.replicaRegions ?? []) + [target.region])).sorted()
            primary.replicatedSequences = (primary.replicatedSequences ?? [:]).merging([target.region: sequence]) { max($0, $1) }
            do { try repository.update(primary) } catch let e as KMSError { throw e } catch {
                throw KMSError(.internalError, "the key's replica regions could not be stored: \(error)")
            }
            return (signed, Change(before: record, after: primary))
        }
    }

    /// ReplicateKey and UpdatePrimaryRegion act on an Enabled or Disabled multi-region primary.
    static func requirePrimary(_ record: KeyRecord, _ what: String) throws(KMSError) {
        guard record.keyID.isMultiRegion, record.multiRegionKeyType == "PRIMARY" else {
            throw KMSError(.unsupportedOperation, record.keyID.isMultiRegion
                ? "key \(record.keyID) is a replica; \(what) on its primary (in region \(record.primaryRegion ?? "?"))"
                : "key \(record.keyID) is not a multi-region key; only keys made with MultiRegion (kmsctl create-key --multi-region) can")
        }
        switch record.state {
        case .enabled, .disabled: return
        case .pendingDeletion, .pendingImport:
            throw KMSError(.invalidState, "key \(record.keyID) is \(record.state.rawValue); cannot \(what)")
        }
    }

    /// A signed bundle of every version of `record` for `target` (PROTOCOL.md §15.4).
    func makeBundle(_ record: KeyRecord, for target: ReplicationPeer, identity: ReplicationIdentity, primaryRegion: String,
                    replicaRegions: [String], policy: String, description: String, tags: [Tag],
                    deletionNotice: Bool = false) throws(KMSError) -> (bundle: [UInt8], sequence: UInt64) {
        let keyID = record.keyID.description
        // A replica deletion notice carries, as its sequence, the sequence of the newest bundle
        // the replica took from its primary (0: none): a value of the primary's clock, which the
        // primary compares with the newest bundle it made for this region (`forgetReplica`).
        // This host's own clock would mean nothing there. A notice wraps nothing, so the wrap
        // key derived from it below is never used.
        let sequence = deletionNotice ? (record.replicationSequence ?? 0) : UInt64(max(0, clock().timeIntervalSince1970 * 1_000_000))
        var bundle = Kmsd_V1_ReplicationBundle()
        do {
            let ephemeral = try X25519.generate()
            let shared = try X25519.sharedSecret(ephemeral.privateKey, peer: target.agreementPublicKey)
            let kek = try Self.bundleKey(shared: shared, ephemeralPublic: ephemeral.publicKey, targetPublic: target.agreementPublicKey,
                                         keyID: keyID, sequence: sequence)
            bundle.format = 1
            bundle.sourceRegion = region
            bundle.sourceSigningPublicKey = Data(identity.peer.signingPublicKey)
            bundle.targetRegion = target.region
            bundle.targetAgreementPublicKey = Data(target.agreementPublicKey)
            bundle.sequence = sequence
            bundle.keyID = keyID
            bundle.creationDate = Int64(record.createdAt.timeIntervalSince1970)
            bundle.description_p = description
            bundle.tags = tags.map { t in .with { $0.tagKey = t.key; $0.tagValue = t.value } }
            bundle.policy = policy
            bundle.primaryRegion = primaryRegion
            bundle.replicaRegions = replicaRegions
            bundle.ephemeralPublicKey = Data(ephemeral.publicKey)
            bundle.replicaDeleted = deletionNotice
            for v in try (deletionNotice ? [] : repository.versions(record.keyID)) {
                guard let material = try repository.material(record.keyID, version: v.version) else { throw KeyRepository.tampered(record.keyID) }
                let nonce = try SecureRandom.bytes(AESGCM.nonceBytes)
                let sealed = try material.withUnsafeBytes {
                    try AESGCM.seal(key: kek, nonce: nonce, plaintext: $0, aad: Self.versionAAD(keyID: keyID, version: v.version))
                }
                bundle.versions.append(.with {
                    $0.version = v.version
                    $0.createdAt = Int64(v.createdAt.timeIntervalSince1970)
                    $0.rotationType = v.rotationType ?? ""
                    $0.nonce = Data(nonce)
                    $0.wrappedMaterial = Data(sealed)
                })
            }
        } catch let error as KMSError { throw error } catch {
            throw KMSError(.internalError, "the replication bundle could not be made: \(error)")
        }
        do {
            let bytes: [UInt8] = try bundle.serializedBytes()
            let signature = try identity.sign(Self.bundleSignatureLabel + bytes)
            return (try Kmsd_V1_SignedReplicationBundle.with { $0.bundle = Data(bytes); $0.signature = Data(signature) }.serializedBytes(), sequence)
        } catch { throw KMSError(.internalError, "the replication bundle could not be signed: \(error)") }
    }

    /// Makes the replica in `newPrimary` the primary: this key becomes its replica at once, and
    /// the returned bundle (every version), imported there, makes that copy the primary.
    /// Read, changed and written under the key's lock from its record as stored now, as
    /// `replicate` is (a change made since the access decision is kept).
    public func updatePrimaryRegion(_ id: KeyID, to newPrimary: String, identity: ReplicationIdentity, caller: Principal) throws(KMSError) -> (bundle: [UInt8], change: Change) {
        try locked(id) { () throws(KMSError) -> (bundle: [UInt8], change: Change) in
            let record = try usableRecord(id, caller: caller, needsEnabled: false)
            try Self.requirePrimary(record, "move its primary region")
            let replicas = record.replicaRegions ?? []
            guard replicas.contains(newPrimary) else {
                throw KMSError(.validation, "PrimaryRegion '\(newPrimary.prefix(64))' is not a replica region of key \(record.keyID) (\(replicas.isEmpty ? "it has none" : replicas.joined(separator: ", "))): replicate it there first")
            }
            guard let target = try repository.replicationPeers().first(where: { $0.region == newPrimary }) else {
                throw KMSError(.validation, "no identity is pinned for region '\(newPrimary)'")
            }
            let others = (replicas.filter { $0 != newPrimary } + [region]).sorted()
            let (signed, sequence) = try makeBundle(record, for: target, identity: identity, primaryRegion: newPrimary, replicaRegions: others,
                                                    policy: record.policy ?? "", description: record.description, tags: record.tags)
            var now = record
            now.multiRegionKeyType = "REPLICA"
            // The newest bundle this copy has seen is the one it just made: an older bundle that
            // once made it primary (an earlier UpdatePrimaryRegion towards here), replayed, is
            // then older than this and refused, instead of making a second primary.
            now.replicationSequence = max(record.replicationSequence ?? 0, sequence)
            now.primaryRegion = newPrimary
            now.replicaRegions = nil
            now.replicatedSequences = nil
            now.rotationPeriodDays = nil  // a replica does not rotate; the new primary decides
            now.nextRotationDate = nil
            do { try repository.update(now) } catch let e as KMSError { throw e } catch {
                throw KMSError(.internalError, "the key could not be stored as a replica: \(error)")
            }
            return (signed, Change(before: record, after: now))
        }
    }

    /// For a replica scheduled for deletion: a signed notice (a bundle without versions) that
    /// lets its primary forget this region, so the primary can be deleted once every replica
    /// is; nil when the primary's identity is not pinned here.
    public func replicaDeletionNotice(_ record: KeyRecord, identity: ReplicationIdentity) throws(KMSError) -> [UInt8]? {
        guard record.multiRegionKeyType == "REPLICA", let primary = record.primaryRegion,
              let target = try repository.replicationPeers().first(where: { $0.region == primary }) else { return nil }
        return try makeBundle(record, for: target, identity: identity, primaryRegion: primary, replicaRegions: [],
                              policy: "", description: "", tags: [], deletionNotice: true).bundle
    }

    /// A bundle's contents and its versions' material, once it is shown to be made for
    /// `identity` (in `region`) by one of `pinned`, unaltered; else why not.
    public static func openBundle(_ signedBytes: [UInt8], identity: ReplicationIdentity, region: String,
                                  pinned: [ReplicationPeer]) throws(KMSError) -> (bundle: Kmsd_V1_ReplicationBundle, keyID: KeyID, materials: [SecureBytes]) {
        func invalid(_ why: String) -> KMSError { KMSError(.validation, "the replication bundle was refused: \(why)") }
        guard let signed = try? Kmsd_V1_SignedReplicationBundle(serializedBytes: signedBytes), !signed.bundle.isEmpty else {
            throw invalid("it is not a replication bundle (truncated or not kmsctl replicate-key output)")
        }
        guard let bundle = try? Kmsd_V1_ReplicationBundle(serializedBytes: Array(signed.bundle)) else {
            throw invalid("its contents do not decode (truncated or altered)")
        }
        guard bundle.format == 1 else { throw invalid("format \(bundle.format) is not one this kmsd reads (1)") }
        guard bundle.targetRegion == region, Array(bundle.targetAgreementPublicKey) == identity.peer.agreementPublicKey else {
            throw invalid("it is addressed to region \(bundle.targetRegion.prefix(64)) with another identity, not to this kmsd (region \(region), fingerprint \(identity.fingerprint))")
        }
        guard let source = pinned.first(where: { $0.region == bundle.sourceRegion }),
              source.signingPublicKey == Array(bundle.sourceSigningPublicKey) else {
            throw KMSError(.accessDenied, "the replication bundle was refused: it comes from region \(bundle.sourceRegion.prefix(64)) with an identity not pinned here (kmsctl pin-replication-identity)")
        }
        guard Ed25519.verify(Array(signed.signature), of: Self.bundleSignatureLabel + Array(signed.bundle), publicKey: source.signingPublicKey) else {
            throw invalid("its signature does not verify under region \(source.region)'s pinned identity: it was altered")
        }
        guard let keyID = KeyID.parse(bundle.keyID), keyID.isMultiRegion, keyID.description == bundle.keyID else {
            throw invalid("it names no multi-region key (\(bundle.keyID.prefix(64)))")
        }
        if bundle.replicaDeleted {
            guard bundle.versions.isEmpty else { throw invalid("a replica deletion notice carries no versions") }
            return (bundle, keyID, [])
        }
        let numbers = bundle.versions.map(\.version)
        guard !numbers.isEmpty, numbers == Array(1...UInt32(numbers.count)) else {
            throw invalid("its versions are not 1 ... n in order")
        }
        var materials: [SecureBytes] = []
        do {
            let shared = try X25519.sharedSecret(identity.agreementKey, peer: Array(bundle.ephemeralPublicKey))
            let kek = try Self.bundleKey(shared: shared, ephemeralPublic: Array(bundle.ephemeralPublicKey),
                                         targetPublic: identity.peer.agreementPublicKey, keyID: bundle.keyID, sequence: bundle.sequence)
            for v in bundle.versions {
                let m = try AESGCM.open(key: kek, nonce: Array(v.nonce), sealed: Array(v.wrappedMaterial),
                                        aad: Self.versionAAD(keyID: bundle.keyID, version: v.version))
                guard m.count == 32 else { throw CryptoError.authenticationFailure }
                materials.append(m)
            }
        } catch { throw invalid("its key material does not unwrap with this kmsd's identity") }
        return (bundle, keyID, materials)
    }

    /// Takes a bundle made for this kmsd by a pinned identity: creates the replica with every
    /// version, or adds to an existing replica the versions it lacks. Returns the replica and how
    /// many versions were added. Every version is unwrapped before anything is stored: a bundle
    /// is taken whole or not at all. For a replica deletion notice, `forgotten` is the change to
    /// the primary (undone with `restore(_:ifCurrentIs:)` when its audit record is refused).
    public func importReplica(_ signedBytes: [UInt8], identity: ReplicationIdentity, caller: Principal) throws(KMSError) -> (record: KeyRecord, added: Int, created: Bool, forgotten: Change?) {
        let (bundle, keyID, materials) = try Self.openBundle(signedBytes, identity: identity, region: region, pinned: try repository.replicationPeers())
        if bundle.replicaDeleted {
            let change = try forgetReplica(keyID, region: bundle.sourceRegion, replicationSequence: bundle.sequence)
            return (change.after, 0, false, change)
        }
        // The region that is primary once this bundle is taken: the sender, or (UpdatePrimaryRegion) this one.
        let primary = bundle.primaryRegion.isEmpty ? bundle.sourceRegion : bundle.primaryRegion
        guard primary == bundle.sourceRegion || primary == region else {
            throw KMSError(.validation, "the replication bundle was refused: it names region \(primary.prefix(64)) as the primary, neither its sender nor this kmsd")
        }
        // Read, checked and written under the key's lock: a change made to the replica at the
        // same moment (TagResource, DisableKey, another bundle) is not overwritten.
        return try locked(keyID) { () throws(KMSError) -> (record: KeyRecord, added: Int, created: Bool, forgotten: Change?) in
            let existing = try repository.record(keyID)
            if let existing {
                guard existing.multiRegionKeyType == "REPLICA", existing.primaryRegion == bundle.sourceRegion || primary == bundle.sourceRegion else {
                    throw KMSError(.alreadyExists, "key \(keyID) already exists here as \(existing.multiRegionKeyType == "PRIMARY" ? "the primary" : "a key not replicated from \(bundle.sourceRegion)"); a bundle cannot replace it")
                }
                // A bundle that makes this copy the primary must be newer than every bundle it
                // has seen; one that only brings versions may be taken again (it adds nothing).
                if let last = existing.replicationSequence, bundle.sequence < last || (primary == region && bundle.sequence == last) {
                    throw KMSError(.validation, "the replication bundle was refused: it is \(bundle.sequence == last ? "the newest bundle already taken" : "older than the newest bundle already taken") for key \(keyID) (a replay)")
                }
            } else if try repository.tombstone(keyID) != nil {
                throw KMSError(.alreadyExists, "key \(keyID) was deleted here; a deleted key id is not used again")
            }
            let tags = bundle.tags.map { Tag(key: $0.tagKey, value: $0.tagValue) }

            do {
                if var record = existing {
                    // The replica's own policy, tags, description, aliases and state stay.
                    let had = Int(record.currentVersion)
                    record.replicationSequence = max(record.replicationSequence ?? 0, bundle.sequence)
                    record.primaryRegion = primary
                    if primary == region {
                        record.multiRegionKeyType = "PRIMARY"
                        record.replicaRegions = bundle.replicaRegions.sorted()
                    }
                    guard materials.count > had else {
                        try repository.update(record)
                        return (record, 0, false, nil)
                    }
                    for (i, material) in materials.enumerated() where i >= had {
                        record.currentVersion = UInt32(i + 1)
                        try repository.rotate(record, material: material, rotationType: bundle.versions[i].rotationType.isEmpty ? nil : bundle.versions[i].rotationType,
                                              at: Date(timeIntervalSince1970: TimeInterval(bundle.versions[i].createdAt)))
                    }
                    return (record, materials.count - had, false, nil)
                }
                try Self.validate(tags: tags)
                var record = KeyRecord(keyID: keyID, createdAt: Date(timeIntervalSince1970: TimeInterval(bundle.creationDate)),
                                       description: bundle.description_p, keyUsage: .encryptDecrypt, keySpec: .symmetricDefault, state: .enabled,
                                       ownerUID: caller.uid, currentVersion: 1, tags: tags, origin: KeyRecord.kmsOrigin)
                record.multiRegionKeyType = primary == region ? "PRIMARY" : "REPLICA"
                record.primaryRegion = primary
                record.replicaRegions = primary == region ? bundle.replicaRegions.sorted() : nil
                record.replicationSequence = bundle.sequence
                if !bundle.policy.isEmpty {
                    _ = try KeyPolicy.parse(bundle.policy, strict: true)
                    record.policy = bundle.policy
                }
                try repository.create(record, material: materials[0])
                for i in 1..<materials.count {
                    record.currentVersion = UInt32(i + 1)
                    try repository.rotate(record, material: materials[i], rotationType: bundle.versions[i].rotationType.isEmpty ? nil : bundle.versions[i].rotationType,
                                          at: Date(timeIntervalSince1970: TimeInterval(bundle.versions[i].createdAt)))
                }
                return (record, materials.count, true, nil)
            } catch let error as KMSError { throw error } catch {
                throw KMSError(.internalError, "the replica could not be stored (\(error))")
            }
        }
    }
}

extension KeyService {
    /// A replica deletion notice taken: the primary no longer lists `replicaRegion`.
    ///
    /// `replicationSequence` is the notice's sequence: the newest bundle the replica had taken
    /// from this primary when it made the notice, so a value of this host's clock, compared with
    /// the newest bundle made here for that region (never with the replica's own clock). Lower
    /// means the notice is stale: the replica was made or synced again since (or has yet to take
    /// the bundle made for it). Read, changed and written under the key's lock; the change is
    /// returned so that it can be undone with `restore(_:ifCurrentIs:)`.
    func forgetReplica(_ keyID: KeyID, region replicaRegion: String, replicationSequence: UInt64) throws(KMSError) -> Change {
        try locked(keyID) { () throws(KMSError) -> Change in
            guard let record = try repository.record(keyID), record.multiRegionKeyType == "PRIMARY" else {
                throw KMSError(.validation, "the replica deletion notice was refused: key \(keyID) is not a primary here")
            }
            guard let replicas = record.replicaRegions, replicas.contains(replicaRegion) else { return Change(before: record, after: record) }
            if let last = record.replicatedSequences?[replicaRegion], replicationSequence < last {
                throw KMSError(.validation, "the replica deletion notice was refused: it was made before the replica in region \(replicaRegion) took the latest bundle made here for it (the replica was made or synced again since, or has yet to import that bundle; a stale notice)")
            }
            var after = record
            after.replicaRegions = replicas.filter { $0 != replicaRegion }
            after.replicatedSequences?[replicaRegion] = nil
            do { try repository.update(after) } catch let e as KMSError { throw e } catch {
                throw KMSError(.internalError, "the key's replica regions could not be stored: \(error)")
            }
            return Change(before: record, after: after)
        }
    }
}

extension ReplicationIdentity {
    func sign(_ message: [UInt8]) throws -> [UInt8] { try Ed25519.sign(message, privateKey: signingKey) }
}
