import Foundation
import KMSCore
import KMSProtocol

/// The one access decision of every request, made before its handler runs.
///
/// For each operation: which key it acts on (resolving an alias once), which `kms:` action it
/// needs there, and the facts a policy may test (encryption context, alias, and so on). The key's
/// policy decides (`KeyService.decide`); a refusal is AccessDeniedException naming what decided,
/// or, for a key named through an alias, NotFoundException as if the alias did not exist. The
/// request is then rewritten to name the key by the id that was decided on (Encrypt and
/// GenerateDataKey instead hand their handler the record decided on, `Decided`), so the handler
/// acts on exactly that key even if an alias moves meanwhile. No handler checks access itself.
struct Authorizer {
    let ctx: HandlerContext
    var service: KeyService { ctx.service }

    /// What a decision found that the handler would otherwise look up again: the key record
    /// decided on and the encryption context as read off the wire (Encrypt and
    /// GenerateDataKey(WithoutPlaintext), the hottest paths; ReplicateKey and
    /// UpdatePrimaryRegion the record only).
    struct Decided: @unchecked Sendable {
        var record: KeyRecord? = nil
        var context: [WirePair]? = nil
        /// The connection's memo entry of this decision (made or reused): the record and the
        /// context as above, also validated and as audit text. One reference instead of copies.
        var remembered: DecisionMemo.Entry? = nil
    }

    /// Decides `op`; on return the key identifiers in it are key ids, and `d` names the key(s)
    /// and the deciding statement(s).
    @discardableResult
    static func authorize(_ op: inout KMSRequest.OneOf_Operation, _ ctx: HandlerContext, _ d: inout AuditDetails) throws(KMSError) -> Decided {
        let a = Authorizer(ctx: ctx)
        switch op {
        case .hello, .whoAmI, .generateRandom, .listKeys:
            d.decidedBy = "open"  // no key; ListKeys shows each caller only keys they may see
        case .createKey:
            let decision = a.service.mayCreateKeys(ctx.principal)
            d.decidedBy = decision.decidedBy
            guard decision.allowed else {
                throw KMSError(.accessDenied, "uid \(ctx.principal.uid) (\(ctx.principal.userName)) may not create keys: only administrators may (configure administrators in kmsd's configuration)")
            }
        case .listAliases(var r):
            guard !r.keyID.isEmpty else { d.decidedBy = "open"; return Decided() }
            r.keyID = try a.key(r.keyID, "ListAliases", &d, aliases: false)
            op = .listAliases(r)
        case .describeKey(var r): r.keyID = try a.key(r.keyID, "DescribeKey", &d, aliases: true); op = .describeKey(r)
        case .enableKey(var r): r.keyID = try a.key(r.keyID, "EnableKey", &d); op = .enableKey(r)
        case .disableKey(var r): r.keyID = try a.key(r.keyID, "DisableKey", &d); op = .disableKey(r)
        case .scheduleKeyDeletion(var r):
            let window = r.pendingWindowInDays == 0 ? KMSLimits.defaultPendingWindowDays : r.pendingWindowInDays
            r.keyID = try a.key(r.keyID, "ScheduleKeyDeletion", &d) { $0.pendingWindowInDays = window }
            op = .scheduleKeyDeletion(r)
        case .cancelKeyDeletion(var r): r.keyID = try a.key(r.keyID, "CancelKeyDeletion", &d); op = .cancelKeyDeletion(r)
        case .updateKeyDescription(var r): r.keyID = try a.key(r.keyID, "UpdateKeyDescription", &d); op = .updateKeyDescription(r)
        // The handlers of these use the decided record and context; the request keeps the
        // identifier as sent (it is not read again).
        case .encrypt(let r):
            return try a.sealing(r.keyID, "Encrypt", &d, context: ctx.context(operation: 30, field: 3, decoded: r.encryptionContext))
        case .generateDataKey(let r):
            return try a.sealing(r.keyID, "GenerateDataKey", &d, context: ctx.context(operation: 33, field: 4, decoded: r.encryptionContext))
        case .generateDataKeyWithoutPlaintext(let r):
            return try a.sealing(r.keyID, "GenerateDataKeyWithoutPlaintext", &d,
                                 context: ctx.context(operation: 34, field: 4, decoded: r.encryptionContext))
        case .decrypt(var r):
            let sent = r.keyID
            let wire = try ctx.context(operation: 31, field: 2, decoded: r.encryptionContext)
            let alias = KeyService.aliasName(r.keyID)
            let memo = alias == nil ? ctx.memo : nil
            let changeCount = a.service.repository.changeCount
            let reference = memo == nil ? nil : SymmetricCiphertext.keyReference(of: r.ciphertextBlob)
            let blobKey = reference?.keyID
            if let memo, let blobKey, let hit = memo.lookup(action: "Decrypt", keyText: sent, blobKey: blobKey, context: wire, changeCount: changeCount) {
                if let named = try a.named(r.keyID) { r.keyID = named.description; op = .decrypt(r) }
                return a.reuse(hit, &d)
            }
            let context = Self.strings(wire)
            if alias != nil {
                // An alias of a key the caller may not decrypt with looks missing, as everywhere.
                r.keyID = try a.key(r.keyID, "Decrypt", &d, aliases: true, context: context)
            } else if let named = try a.named(r.keyID) {
                r.keyID = named.description
            }
            if let alias { d.alias = alias }
            let record = try a.blobKey(r.ciphertextBlob, "Decrypt", &d, context: context, alias: alias)
            op = .decrypt(r)
            if let memo, let blobKey, let record, record.keyID == blobKey {
                return a.remember(in: memo, action: "Decrypt", keyText: sent, blobKey: blobKey, context: wire,
                                  record: record, version: reference?.keyVersion ?? record.currentVersion, changeCount: changeCount, &d)
            }
        case .reEncrypt(var r):
            // Both contexts are read first: an ambiguous one is refused before any decision.
            let source = try ctx.contextPairs(operation: 32, field: 2, decoded: r.sourceEncryptionContext)
            let destination = try ctx.contextPairs(operation: 32, field: 5, decoded: r.destinationEncryptionContext)
            let alias = KeyService.aliasName(r.sourceKeyID)
            if alias != nil {
                var scratch = AuditDetails()
                do {
                    r.sourceKeyID = try a.key(r.sourceKeyID, "ReEncryptFrom", &scratch, aliases: true, context: source)
                } catch {
                    d.decidedBy = scratch.decidedBy
                    d.sourceAlias = scratch.alias
                    throw error
                }
            } else if let named = try a.named(r.sourceKeyID) {
                r.sourceKeyID = named.description
            }
            if let alias { d.sourceAlias = alias }
            try a.blobKey(r.ciphertextBlob, "ReEncryptFrom", &d, context: source, alias: alias)
            d.sourceContextValues = d.contextValues
            let from = d.decidedBy
            r.destinationKeyID = try a.key(r.destinationKeyID, "ReEncryptTo", &d, aliases: true, context: destination)
            d.decidedBy = from.isEmpty ? d.decidedBy : "from \(from); to \(d.decidedBy)"
            op = .reEncrypt(r)
        case .createAlias(let r):
            try KeyService.checkTargetIsKey(r.targetKeyID)
            _ = try a.key(r.targetKeyID, "CreateAlias", &d)
        case .updateAlias(let r):
            try KeyService.checkTargetIsKey(r.targetKeyID)
            let current = try a.aliasTarget(r.aliasName)
            d.decidedAliasTarget = current
            _ = try a.key(current.description, "UpdateAlias", &d)
            let first = d.decidedBy
            _ = try a.key(r.targetKeyID, "UpdateAlias", &d)
            d.decidedBy = "from \(first); to \(d.decidedBy)"
        case .deleteAlias(let r):
            let current = try a.aliasTarget(r.aliasName)
            d.decidedAliasTarget = current
            _ = try a.key(current.description, "DeleteAlias", &d)
        case .tagResource(var r): r.keyID = try a.key(r.keyID, "TagResource", &d); op = .tagResource(r)
        case .untagResource(var r): r.keyID = try a.key(r.keyID, "UntagResource", &d); op = .untagResource(r)
        case .listResourceTags(var r): r.keyID = try a.key(r.keyID, "ListResourceTags", &d); op = .listResourceTags(r)
        case .enableKeyRotation(var r): r.keyID = try a.key(r.keyID, "EnableKeyRotation", &d); op = .enableKeyRotation(r)
        case .disableKeyRotation(var r): r.keyID = try a.key(r.keyID, "DisableKeyRotation", &d); op = .disableKeyRotation(r)
        case .getKeyRotationStatus(var r): r.keyID = try a.key(r.keyID, "GetKeyRotationStatus", &d); op = .getKeyRotationStatus(r)
        case .rotateKeyOnDemand(var r): r.keyID = try a.key(r.keyID, "RotateKeyOnDemand", &d); op = .rotateKeyOnDemand(r)
        case .listKeyRotations(var r): r.keyID = try a.key(r.keyID, "ListKeyRotations", &d); op = .listKeyRotations(r)
        case .setMinimumDecryptionVersion(var r):
            r.keyID = try a.key(r.keyID, "SetMinimumDecryptionVersion", &d)
            op = .setMinimumDecryptionVersion(r)
        case .getParametersForImport(var r): r.keyID = try a.key(r.keyID, "GetParametersForImport", &d); op = .getParametersForImport(r)
        case .importKeyMaterial(var r): r.keyID = try a.key(r.keyID, "ImportKeyMaterial", &d); op = .importKeyMaterial(r)
        case .deleteImportedKeyMaterial(var r):
            r.keyID = try a.key(r.keyID, "DeleteImportedKeyMaterial", &d)
            op = .deleteImportedKeyMaterial(r)
        case .getKeyPolicy(var r): r.keyID = try a.key(r.keyID, "GetKeyPolicy", &d); op = .getKeyPolicy(r)
        case .putKeyPolicy(var r):
            let bypass = r.bypassPolicyLockoutSafetyCheck
            r.keyID = try a.key(r.keyID, "PutKeyPolicy", &d) { $0.bypassPolicyLockoutSafetyCheck = bypass }
            op = .putKeyPolicy(r)
        case .listKeyPolicies(var r): r.keyID = try a.key(r.keyID, "ListKeyPolicies", &d); op = .listKeyPolicies(r)
        case .simulatePolicy(var r): r.keyID = try a.key(r.keyID, "SimulatePolicy", &d); op = .simulatePolicy(r)
        case .createGrant(var r):
            let id = try KeyID(parsing: r.keyID)
            try KeyService.validateGrant(Handlers.grantInput(r, keyID: id))
            r.keyID = try a.key(r.keyID, "CreateGrant", &d) {
                $0.grantOperations = r.operations
                $0.granteePrincipal = r.granteePrincipal
                $0.retiringPrincipal = r.retiringPrincipal.isEmpty ? nil : r.retiringPrincipal
            }
            try a.checkGrantDelegation(r, &d)
            op = .createGrant(r)
        case .listGrants(var r): r.keyID = try a.key(r.keyID, "ListGrants", &d); op = .listGrants(r)
        case .listRetirableGrants(let r):
            let decision = try a.service.mayListRetirableGrants(r.retiringPrincipal, caller: ctx.principal)
            d.decidedBy = decision.decidedBy
            guard decision.allowed else {
                throw KMSError(.accessDenied, "uid \(ctx.principal.uid) (\(ctx.principal.userName)) may list only the grants it may retire itself (a RetiringPrincipal naming it); administrators may list anyone's")
            }
        case .retireGrant(var r):
            let (keyID, grantID) = r.grantToken.isEmpty ? (try KeyID(parsing: r.keyID), r.grantID) : try KeyService.parseGrantToken(r.grantToken)
            d.keyID = keyID.description
            d.grantID = grantID
            let record = try a.existing(keyID)
            guard let grant = try a.service.repository.grant(grantID), grant.keyID == keyID else {
                throw KMSError(.notFound, "key \(keyID) has no grant \(grantID.prefix(16))…")
            }
            let decision = a.service.mayRetire(grant, key: record, caller: ctx.principal)
            d.decidedBy = decision.decidedBy
            guard decision.allowed else {
                throw KMSError(.accessDenied, "uid \(ctx.principal.uid) (\(ctx.principal.userName)) may not retire grant \(grantID.prefix(16))…: only its retiring principal, its grantee when it grants RetireGrant, or whom the key policy allows kms:RetireGrant may")
            }
            r.keyID = keyID.description
            r.grantID = grantID
            r.grantToken = ""
            op = .retireGrant(r)
        case .revokeGrant(var r): r.keyID = try a.key(r.keyID, "RevokeGrant", &d); op = .revokeGrant(r)
        // Their handlers act on the record decided on (as Encrypt's do).
        case .replicateKey(let r): return Decided(record: try a.keyRecord(r.keyID, "ReplicateKey", &d, aliases: true))
        case .updatePrimaryRegion(let r): return Decided(record: try a.keyRecord(r.keyID, "UpdatePrimaryRegion", &d, aliases: true))
        case .verifyAuditRecords, .status, .createBackup, .getBackupChunk, .getReplicationIdentity, .pinReplicationIdentity, .importReplica:
            let decision = a.service.mayCreateKeys(ctx.principal)
            d.decidedBy = decision.decidedBy
            guard decision.allowed else {
                let what = switch op {
                case .status: "see kmsd's status"
                case .createBackup, .getBackupChunk: "back up the keystore"
                case .getReplicationIdentity, .pinReplicationIdentity: "see or pin replication identities"
                case .importReplica: "import replica keys"
                default: "verify the audit trail"
                }
                throw KMSError(.accessDenied, "uid \(ctx.principal.uid) (\(ctx.principal.userName)) may not \(what): only administrators may")
            }
        case .reviewAccess(var r):
            if r.keyID.isEmpty {
                // Every key's permissions: an administrator's review.
                let decision = a.service.mayCreateKeys(ctx.principal)
                d.decidedBy = decision.decidedBy
                guard decision.allowed else {
                    throw KMSError(.accessDenied, "uid \(ctx.principal.uid) (\(ctx.principal.userName)) may review one key at a time (--key-id, needing kms:GetKeyPolicy); only administrators may review every key")
                }
            } else {
                r.keyID = try a.key(r.keyID, "GetKeyPolicy", &d)
                op = .reviewAccess(r)
            }
        }
        return Decided()
    }

    /// Decides `action` on the key an Encrypt or GenerateDataKey names, for the handler to
    /// seal under.
    func sealing(_ text: String, _ action: String, _ d: inout AuditDetails, context: [WirePair]) throws(KMSError) -> Decided {
        let changeCount = service.repository.changeCount
        if let memo = ctx.memo, let hit = memo.lookup(action: action, keyText: text, blobKey: nil, context: context, changeCount: changeCount) {
            return reuse(hit, &d)
        }
        let record = try keyRecord(text, action, &d, aliases: true, context: Self.strings(context))
        guard let memo = ctx.memo, KeyService.aliasName(text) == nil else { return Decided(record: record, context: context) }
        return remember(in: memo, action: action, keyText: text, blobKey: nil, context: context, record: record,
                        version: record.currentVersion, changeCount: changeCount, &d)
    }

    static func strings(_ context: [WirePair]) -> ContextPairs {
        context.map { (key: String(decoding: $0.key, as: UTF8.self), value: String(decoding: $0.value, as: UTF8.self)) }
    }

    /// An allowed decision made just now, kept in the connection's memo (with the context's
    /// canonical form and audit text, when the context is valid) and handed to the handler.
    /// `version`: the key version the request uses; whether it, the record and the grants are
    /// cached is noted now, after `changeCount` was read (see `DecisionMemo.Entry`).
    func remember(in memo: DecisionMemo, action: String, keyText: String, blobKey: KeyID?, context: [WirePair],
                  record: KeyRecord, version: UInt32, changeCount: UInt64, _ d: inout AuditDetails) -> Decided {
        // An invalid context is the handler's to refuse, as always.
        guard let validated = try? EncryptionContext(pairs: context) else { return Decided(record: record, context: context) }
        let text = EncryptionContext.auditText(context, values: d.contextValues)
        let cached = service.repository.isCached(record.keyID, version: version) && service.grantsCached(record.keyID)
        let entry = DecisionMemo.Entry(changeCount: changeCount, action: action, keyText: keyText, blobKey: blobKey, context: context,
                                       record: record, keyIDText: d.keyID, keyState: d.keyState, decidedBy: d.decidedBy,
                                       contextValues: d.contextValues, encryptionContext: validated, contextText: text,
                                       storageFreeVersion: cached ? version : nil)
        memo.store(entry)
        return Decided(remembered: entry)
    }

    /// A remembered decision: the audit details it noted, and what it hands the handler.
    func reuse(_ hit: DecisionMemo.Entry, _ d: inout AuditDetails) -> Decided {
        d.keyID = hit.keyIDText
        d.keyState = hit.keyState
        d.decidedBy = hit.decidedBy
        d.contextValues = hit.contextValues
        ctx.metrics.decisionsReused.add(1, ordering: .relaxed)
        return Decided(remembered: hit)
    }

    /// Decides `action` on the key `text` names and returns its key id. `aliases`: whether the
    /// operation accepts `alias/NAME` (else the text must be a key id or ARN).
    func key(_ text: String, _ action: String, _ d: inout AuditDetails, aliases: Bool = false, context: ContextPairs? = nil,
             facts adjust: (inout RequestFacts) -> Void = { _ in }) throws(KMSError) -> String {
        try keyRecord(text, action, &d, aliases: aliases, context: context, facts: adjust).keyID.description
    }

    /// As `key`, returning the record decided on.
    func keyRecord(_ text: String, _ action: String, _ d: inout AuditDetails, aliases: Bool = false, context: ContextPairs? = nil,
                   facts adjust: (inout RequestFacts) -> Void = { _ in }) throws(KMSError) -> KeyRecord {
        var alias: String? = nil
        let id: KeyID
        d.keyID = ""
        if aliases, let name = KeyService.aliasName(text) {
            try KeyService.checkAliasName(name)
            d.alias = name
            guard let target = try service.repository.alias(name) else {
                throw KMSError(.notFound, "alias \(name) does not exist; list aliases with kmsctl list-aliases")
            }
            id = target.keyID
            alias = name
        } else {
            do throws(KMSError) { id = try KeyID(parsing: text) } catch {
                d.keyID = AuditDetails.keyID(requested: text)  // "invalid" for text that names no key
                throw error
            }
        }
        d.keyID = id.description
        let record = try existing(id)
        try decide(action, record, &d, context: context, alias: alias, adjust)
        return record
    }

    /// Decides `action` on the key a ciphertext blob names. A blob that does not parse, or that
    /// names a key that never existed here, protects nothing: the handler answers it
    /// (InvalidCiphertextException) without a decision.
    @discardableResult
    func blobKey(_ blob: Data, _ action: String, _ d: inout AuditDetails, context: ContextPairs, alias: String?) throws(KMSError) -> KeyRecord? {
        // No key decides these: no context values in their records either.
        guard let named = SymmetricCiphertext.keyReference(of: blob) else { d.decidedBy = "none: not a ciphertext"; d.contextValues = false; return nil }
        guard let record = try service.repository.record(named.keyID) else {
            d.decidedBy = "none: no such key"
            d.contextValues = false
            return nil
        }
        if action == "Decrypt" { d.keyID = record.keyID.description } else { d.sourceKeyID = record.keyID.description }
        try decide(action, record, &d, context: context, alias: alias)
        return record
    }

    /// The key id a request's optional key identifier names (resolving an alias), or nil.
    func named(_ text: String) throws(KMSError) -> KeyID? {
        guard !text.isEmpty else { return nil }
        guard let name = KeyService.aliasName(text) else { return try KeyID(parsing: text) }
        try KeyService.checkAliasName(name)
        guard let alias = try service.repository.alias(name) else {
            throw KMSError(.notFound, "alias \(name) does not exist; list aliases with kmsctl list-aliases")
        }
        return alias.keyID
    }

    /// A grant allowed CreateGrant: the new grant may pass on only what that grant has (its
    /// operations, none more) and only from a grant without constraints.
    func checkGrantDelegation(_ r: Kmsd_V1_CreateGrantRequest, _ d: inout AuditDetails) throws(KMSError) {
        guard d.decidedBy.hasPrefix("grant:") else { return }
        let parentID = String(d.decidedBy.dropFirst("grant:".count))
        guard let parent = try service.repository.grant(parentID) else {
            throw KMSError(.accessDenied, "the grant that allowed this CreateGrant was retired meanwhile; nothing was created")
        }
        let narrower = Set(r.operations).isSubset(of: Set(parent.operations))
        guard narrower, parent.encryptionContextSubset == nil, parent.encryptionContextEquals == nil else {
            throw KMSError(.accessDenied, "grant \(parentID.prefix(16))… lets uid \(ctx.principal.uid) create grants only for its own operations (\(parent.operations.joined(separator: ", "))) and only when it has no constraints")
        }
    }

    func aliasTarget(_ name: String) throws(KMSError) -> KeyID {
        try KeyService.checkAliasName(name)
        guard let alias = try service.repository.alias(name) else { throw KMSError(.notFound, "alias \(name) does not exist") }
        return alias.keyID
    }

    func existing(_ id: KeyID) throws(KMSError) -> KeyRecord {
        guard let record = try service.repository.record(id) else {
            if let gone = try service.repository.tombstone(id) { throw KeyService.deleted(gone) }
            throw KMSError(.notFound, "key \(id) does not exist; list keys with kmsctl list-keys")
        }
        return record
    }

    func decide(_ action: String, _ record: KeyRecord, _ d: inout AuditDetails, context: ContextPairs?, alias: String?,
                _ adjust: (inout RequestFacts) -> Void = { _ in }) throws(KMSError) {
        let p = ctx.principal
        d.keyState = record.state.rawValue

        var facts = service.requestFacts(PolicyActions.index(ofOperation: action), caller: p, record: record, context: context, alias: alias)
        adjust(&facts)
        let (decision, auditValues) = service.decideWithGrants(facts)
        d.contextValues = auditValues
        d.decidedBy = decision.decidedBy
        guard decision.allowed else {
            if let alias {
                // An alias reveals neither its key nor that it exists to whoever may not use it.
                throw KMSError(.notFound, "alias \(alias) does not exist; list aliases with kmsctl list-aliases")
            }
            let why = decision.effect == .explicitDeny ? "statement \(decision.decidedBy) denies it" : "no statement in its key policy and no grant allows it"
            throw KMSError(.accessDenied, "uid \(p.uid) (\(p.userName)) is not allowed kms:\(action) on key \(record.keyID): \(why)")
        }
    }
}
