import Foundation
import KMSCore
import KMSCrypto
import KMSProtocol

/// What a handler tells the audit log about the request, beyond who and what.
struct AuditDetails {
    /// Only ever a parsed key id: a client's raw text never reaches the audit log.
    var keyID = ""
    var keyVersion: UInt32? = nil
    var contextKeys = ""
    /// The key's policy puts context values in its audit records (and, ReEncrypt, the source key's).
    var contextValues = false
    var sourceContextValues = false
    /// ReEncrypt only: where the blob came from.
    var sourceKeyID: String? = nil
    var sourceKeyVersion: UInt32? = nil
    var sourceContextKeys: String? = nil
    var sourceAlias = ""
    /// The alias the request named or acted on (a valid alias name only).
    var alias = ""
    /// What decided access: `key-policy:SID`, `grant:ID`, `configuration:administrators`, `open`, ...
    var decidedBy = ""
    /// The grant a grant operation created, retired or revoked.
    var grantID = ""
    /// The state of the key the request acted on, when access was decided (for alarms).
    var keyState = ""
    /// UpdateAlias, DeleteAlias: the key the alias named when access was decided; the change
    /// happens only if it still names that key.
    var decidedAliasTarget: KeyID? = nil
    /// Keys left out of the answer because their stored record failed its integrity check.
    var integrityFailures: [String] = []
    /// Reverses the request's lasting effect; run when its audit record cannot be written, so
    /// a refused request changes nothing.
    var undo: (@Sendable () throws -> Void)? = nil
}

extension AuditDetails {
    /// The alias a key identifier names, when it is a valid alias name; else "".
    static func alias(requested text: String) -> String {
        guard let name = KeyService.aliasName(text), (try? KeyService.checkAliasName(name)) != nil else { return "" }
        return name
    }

    /// Notes what a request's key identifier names: a key id, or an alias. The authorizer has
    /// already replaced an alias by its key id in the request and noted the alias; that stays.
    mutating func noteKey(requested text: String) {
        keyID = Self.keyID(requested: text)
        let named = Self.alias(requested: text)
        if !named.isEmpty { alias = named }
    }

    /// The key id a request named, as kmsd understood it; "invalid" for text that names no key.
    static func keyID(requested text: String) -> String {
        guard !text.isEmpty, KeyService.aliasName(text) == nil else { return "" }
        return (try? KeyID(parsing: text))?.description ?? "invalid"
    }
}

/// Everything a handler may use: the caller, the key service, the server's settings, and the
/// request's encryption contexts as they were on the wire.
///
/// A class: one per request, made by the dispatcher and passed down to the decision and the
/// handler, used on one thread only; passing it costs one reference, not a copy of every field.
final class HandlerContext: @unchecked Sendable {
    let principal: Principal
    /// The server's parts (key service, audit log, metrics, ...): one reference per request
    /// rather than one per part.
    let dispatcher: Dispatcher
    let contexts: WireContexts?
    /// What the access decision found (the key record, the context as read), for the handler.
    var decided = Authorizer.Decided()
    /// The connection's remembered decisions, for a request handled on its event loop.
    let memo: DecisionMemo?

    var service: KeyService { dispatcher.service }
    var settings: ServerSettings { dispatcher.settings }
    /// The audit log (VerifyAuditRecords checks its chain) and the request metrics (Status).
    var audit: AuditLog { dispatcher.audit }
    var metrics: Metrics { dispatcher.metrics }
    var alarms: Alarms { dispatcher.alarms }
    /// Backup files (CreateBackup, GetBackupChunk); nil where kmsd keeps none.
    var backups: BackupStore? { dispatcher.backups }
    /// This kmsd's replication identity; nil where it has none.
    var identity: ReplicationIdentity? { dispatcher.identity }

    init(principal: Principal, dispatcher: Dispatcher, contexts: WireContexts? = nil, memo: DecisionMemo? = nil) {
        self.principal = principal
        self.dispatcher = dispatcher
        self.contexts = contexts
        self.memo = memo
    }

    /// Refuses (AuditUnavailableException) a change that cannot be undone when its audit record
    /// is refused, while journald is known not to take records (AuditLog.unableToRecord).
    func requireAuditable(_ what: String) throws(KMSError) {
        if let why = audit.unableToRecord() {
            throw KMSError(.auditUnavailable, "cannot \(what) while its audit record cannot be written (\(why)); nothing was changed")
        }
    }

    /// The key record the access decision was made on; every operation that seals under a key
    /// has one (an internal error otherwise, never a silent second lookup).
    func decidedRecord() throws(KMSError) -> KeyRecord {
        guard let record = decided.remembered?.record ?? decided.record else { throw KMSError(.internalError, "no access decision was made for this request") }
        return record
    }

    /// The encryption context the access decision read, else read now.
    func decidedContext(operation: Int, field: Int, decoded: [String: String]) throws(KMSError) -> [WirePair] {
        // A memo entry's context is byte for byte this request's (that is how it was found).
        if let pairs = decided.remembered?.context ?? decided.context { return pairs }
        return try context(operation: operation, field: field, decoded: decoded)
    }

    /// The context validated, as the decision's memo entry has it, else validated now.
    func decidedEncryptionContext(_ pairs: [WirePair]) throws(KMSError) -> EncryptionContext {
        if let validated = decided.remembered?.encryptionContext { return validated }
        return try EncryptionContext(pairs: pairs)
    }

    /// The context's audit text, as the decision's memo entry has it, else made now.
    func decidedAuditText(_ pairs: [WirePair], values: Bool) -> String {
        decided.remembered?.contextText ?? EncryptionContext.auditText(pairs, values: values)
    }

    /// The pairs of one context field as sent (duplicates and byte-distinct spellings kept);
    /// from the decoded map when the request did not come off the wire.
    ///
    /// Throws ValidationException when the wire scan and the protobuf decoder disagree (a
    /// structure one of them reads differently): a context is never bound half-read.
    func context(operation: Int, field: Int, decoded: [String: String]) throws(KMSError) -> [WirePair] {
        guard let contexts else { return decoded.map { WirePair(key: Array($0.key.utf8), value: Array($0.value.utf8)) } }
        let pairs = contexts.context(operation: operation, field: field)
        if contexts.fromOneReading { return pairs }
        // Every decoded pair must be among the scanned ones, which the decoder can only have
        // collapsed (repeated or canonically equal keys), never added to or changed.
        var last: [String: [UInt8]] = [:]
        for p in pairs { last[String(decoding: p.key, as: UTF8.self)] = p.value }
        let consistent = contexts.complete && last.count == decoded.count
            && decoded.allSatisfy { last[$0.key] == Array($0.value.utf8) }
        guard consistent else {
            throw KMSError(.validation, "the encryption context could not be read unambiguously (malformed or unusual protobuf encoding); send each pair as a map entry {1: key, 2: value}")
        }
        return pairs
    }
}

extension HandlerContext {
    /// A request's encryption context for the access decision: the pairs as sent, byte for
    /// byte, exactly what the ciphertext binds (a context read ambiguously is refused here).
    func contextPairs(operation: Int, field: Int, decoded: [String: String]) throws(KMSError) -> ContextPairs {
        try context(operation: operation, field: field, decoded: decoded).map {
            (key: String(decoding: $0.key, as: UTF8.self), value: String(decoding: $0.value, as: UTF8.self))
        }
    }
}

/// Settings handlers report (Hello) without depending on the whole configuration.
struct ServerSettings: Sendable {
    let maxFrameBytes: Int
    let maxInFlight: Int
}

typealias OperationResult = Kmsd_V1_Response.OneOf_Result

/// A secret a response carries (a plaintext, a data key), kept out of the protobuf message:
/// the frame writer appends it as one more occurrence of the response's operation field
/// holding only this bytes field (protobuf merges repeated occurrences of a message field),
/// copying it straight from locked memory into the outgoing buffer, which is zeroed once
/// written. So no ordinary Data or Array ever holds it.
struct ResponseSecret {
    /// The field number of the operation in `Response` (31 Decrypt, 33 GenerateDataKey).
    let operationField: Int
    /// The bytes field inside the operation's response message.
    let field: Int
    let bytes: SecureBytes
}

/// What goes back to the client: the response, and the secret to splice into its frame.
struct Outgoing {
    var response: KMSResponse
    var secret: ResponseSecret? = nil
}

/// Routes each request to its operation's handler, audits it, and builds the response.
///
/// The `route` switch is the one dispatch table: one line per operation.
final class Dispatcher: Sendable {
    let service: KeyService
    let audit: AuditLog
    let settings: ServerSettings
    let rateLimiter: RequestRateLimiter
    let throttleLog = ThrottleLog()
    let metrics = Metrics()
    let alarms: Alarms
    let backups: BackupStore?
    let identity: ReplicationIdentity?

    init(service: KeyService, audit: AuditLog, settings: ServerSettings,
         rateLimiter: RequestRateLimiter = RequestRateLimiter(rate: 0, burst: 0), alarms: AlarmRules = AlarmRules(),
         backups: BackupStore? = nil, identity: ReplicationIdentity? = nil, decryptCallersFile: String? = nil) {
        self.alarms = Alarms(rules: alarms, decryptCallersFile: decryptCallersFile)
        self.backups = backups
        self.identity = identity
        self.service = service
        self.audit = audit
        self.settings = settings
        self.rateLimiter = rateLimiter
    }

    /// Operation names this server answers, for Hello.
    static let operations = ["Hello", "WhoAmI", "CreateKey", "DescribeKey", "ListKeys", "EnableKey", "DisableKey",
                             "ScheduleKeyDeletion", "CancelKeyDeletion", "UpdateKeyDescription",
                             "CreateAlias", "UpdateAlias", "DeleteAlias", "ListAliases",
                             "TagResource", "UntagResource", "ListResourceTags",
                             "EnableKeyRotation", "DisableKeyRotation", "GetKeyRotationStatus", "RotateKeyOnDemand",
                             "ListKeyRotations", "SetMinimumDecryptionVersion",
                             "GetParametersForImport", "ImportKeyMaterial", "DeleteImportedKeyMaterial",
                             "GetKeyPolicy", "PutKeyPolicy", "ListKeyPolicies", "SimulatePolicy",
                             "CreateGrant", "ListGrants", "ListRetirableGrants", "RetireGrant", "RevokeGrant", "ReviewAccess", "VerifyAuditRecords", "Status",
                             "CreateBackup", "GetBackupChunk", "GetReplicationIdentity", "PinReplicationIdentity",
                             "ReplicateKey", "ImportReplica", "UpdatePrimaryRegion",
                             "Encrypt", "Decrypt",
                             "ReEncrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "GenerateRandom"]

    static func route(_ op: KMSRequest.OneOf_Operation, _ ctx: HandlerContext, _ details: inout AuditDetails,
                      _ secret: inout ResponseSecret?) throws(KMSError) -> OperationResult {
        switch op {
        case .hello(let r): .hello(DaemonHandlers.hello(r, ctx))
        case .whoAmI(let r): .whoAmI(DaemonHandlers.whoAmI(r, ctx))
        case .createKey(let r): .createKey(try KeyHandlers.createKey(r, ctx, &details))
        case .describeKey(let r): .describeKey(try KeyHandlers.describeKey(r, ctx, &details))
        case .listKeys(let r): .listKeys(try KeyHandlers.listKeys(r, ctx, &details))
        case .enableKey(let r): .enableKey(try KeyHandlers.enableKey(r, ctx, &details))
        case .disableKey(let r): .disableKey(try KeyHandlers.disableKey(r, ctx, &details))
        case .scheduleKeyDeletion(let r): .scheduleKeyDeletion(try KeyHandlers.scheduleKeyDeletion(r, ctx, &details))
        case .cancelKeyDeletion(let r): .cancelKeyDeletion(try KeyHandlers.cancelKeyDeletion(r, ctx, &details))
        case .updateKeyDescription(let r): .updateKeyDescription(try KeyHandlers.updateKeyDescription(r, ctx, &details))
        case .encrypt(let r): .encrypt(try CryptoHandlers.encrypt(r, ctx, &details))
        case .decrypt(let r): .decrypt(try CryptoHandlers.decrypt(r, ctx, &details, &secret))
        case .reEncrypt(let r): .reEncrypt(try CryptoHandlers.reEncrypt(r, ctx, &details))
        case .generateDataKey(let r): .generateDataKey(try CryptoHandlers.generateDataKey(r, ctx, &details, &secret))
        case .generateDataKeyWithoutPlaintext(let r):
            .generateDataKeyWithoutPlaintext(try CryptoHandlers.generateDataKeyWithoutPlaintext(r, ctx, &details))
        case .generateRandom(let r): .generateRandom(try CryptoHandlers.generateRandom(r, ctx))
        case .createAlias(let r): .createAlias(try AliasHandlers.createAlias(r, ctx, &details))
        case .updateAlias(let r): .updateAlias(try AliasHandlers.updateAlias(r, ctx, &details))
        case .deleteAlias(let r): .deleteAlias(try AliasHandlers.deleteAlias(r, ctx, &details))
        case .listAliases(let r): .listAliases(try AliasHandlers.listAliases(r, ctx, &details))
        case .tagResource(let r): .tagResource(try AliasHandlers.tagResource(r, ctx, &details))
        case .untagResource(let r): .untagResource(try AliasHandlers.untagResource(r, ctx, &details))
        case .listResourceTags(let r): .listResourceTags(try AliasHandlers.listResourceTags(r, ctx, &details))
        case .enableKeyRotation(let r): .enableKeyRotation(try RotationHandlers.enableKeyRotation(r, ctx, &details))
        case .disableKeyRotation(let r): .disableKeyRotation(try RotationHandlers.disableKeyRotation(r, ctx, &details))
        case .getKeyRotationStatus(let r): .getKeyRotationStatus(try RotationHandlers.getKeyRotationStatus(r, ctx, &details))
        case .rotateKeyOnDemand(let r): .rotateKeyOnDemand(try RotationHandlers.rotateKeyOnDemand(r, ctx, &details))
        case .listKeyRotations(let r): .listKeyRotations(try RotationHandlers.listKeyRotations(r, ctx, &details))
        case .setMinimumDecryptionVersion(let r):
            .setMinimumDecryptionVersion(try RotationHandlers.setMinimumDecryptionVersion(r, ctx, &details))
        case .getParametersForImport(let r): .getParametersForImport(try ImportHandlers.getParametersForImport(r, ctx, &details))
        case .importKeyMaterial(let r): .importKeyMaterial(try ImportHandlers.importKeyMaterial(r, ctx, &details))
        case .deleteImportedKeyMaterial(let r):
            .deleteImportedKeyMaterial(try ImportHandlers.deleteImportedKeyMaterial(r, ctx, &details))
        case .getKeyPolicy(let r): .getKeyPolicy(try PolicyHandlers.getKeyPolicy(r, ctx, &details))
        case .putKeyPolicy(let r): .putKeyPolicy(try PolicyHandlers.putKeyPolicy(r, ctx, &details))
        case .listKeyPolicies(let r): .listKeyPolicies(try PolicyHandlers.listKeyPolicies(r, ctx, &details))
        case .simulatePolicy(let r): .simulatePolicy(try PolicyHandlers.simulatePolicy(r, ctx, &details))
        case .createGrant(let r): .createGrant(try GrantHandlers.createGrant(r, ctx, &details))
        case .listGrants(let r): .listGrants(try GrantHandlers.listGrants(r, ctx, &details))
        case .listRetirableGrants(let r): .listRetirableGrants(try GrantHandlers.listRetirableGrants(r, ctx, &details))
        case .retireGrant(let r): .retireGrant(try GrantHandlers.retireGrant(r, ctx, &details))
        case .revokeGrant(let r): .revokeGrant(try GrantHandlers.revokeGrant(r, ctx, &details))
        case .reviewAccess(let r): .reviewAccess(try ReviewHandlers.reviewAccess(r, ctx, &details))
        case .verifyAuditRecords(let r): .verifyAuditRecords(try AuditHandlers.verifyAuditRecords(r, ctx))
        case .status: .status(try AuditHandlers.status(ctx))
        case .createBackup: .createBackup(try BackupHandlers.createBackup(ctx))
        case .getBackupChunk(let r): .getBackupChunk(try BackupHandlers.getBackupChunk(r, ctx))
        case .getReplicationIdentity: .getReplicationIdentity(try ReplicationHandlers.getReplicationIdentity(ctx))
        case .pinReplicationIdentity(let r): .pinReplicationIdentity(try ReplicationHandlers.pinReplicationIdentity(r, ctx, &details))
        case .replicateKey(let r): .replicateKey(try ReplicationHandlers.replicateKey(r, ctx, &details))
        case .importReplica(let r): .importReplica(try ReplicationHandlers.importReplica(r, ctx, &details))
        case .updatePrimaryRegion(let r): .updatePrimaryRegion(try ReplicationHandlers.updatePrimaryRegion(r, ctx, &details))
        }
    }

    /// True when handling `request` needs no storage access (every key it names is cached), so
    /// it may run on the event loop instead of hopping to a worker thread and back. Its audit
    /// record is still handed to journald before the response is sent.
    /// `memo`: the connection's; a valid entry for the key saves looking into the caches.
    func runsWithoutStorage(_ request: KMSRequest, memo: DecisionMemo? = nil) -> Bool {
        let repository = service.repository, service = self.service
        // The key's record and material, and its grants (the decision may consult them).
        // A remembered decision shows it without a look at the caches (DecisionMemo.Entry).
        let changeCount = memo == nil ? 0 : repository.changeCount
        func cached(_ keyID: String) -> Bool {
            if let memo, memo.storageFree(keyText: keyID, changeCount: changeCount) { return true }
            if KeyService.aliasName(keyID) != nil { return false }  // resolving an alias reads storage
            guard let id = try? KeyID(parsing: keyID) else { return true }  // fails without I/O
            return repository.isCached(id) && service.grantsCached(id)
        }
        func cached(blob: Data) -> Bool {
            guard let named = SymmetricCiphertext.keyReference(of: blob) else { return true }
            if let memo, memo.storageFree(blobKey: named.keyID, version: named.keyVersion, changeCount: changeCount) { return true }
            return repository.isCached(named.keyID, version: named.keyVersion) && service.grantsCached(named.keyID)
        }
        switch request.operation {
        case nil, .hello, .whoAmI, .generateRandom: return true
        case .encrypt(let r): return cached(r.keyID)
        case .generateDataKey(let r): return cached(r.keyID)
        case .generateDataKeyWithoutPlaintext(let r): return cached(r.keyID)
        case .decrypt(let r): return cached(blob: r.ciphertextBlob)
        case .reEncrypt(let r): return cached(blob: r.ciphertextBlob) && cached(r.destinationKeyID)
        case .createKey, .describeKey, .listKeys, .enableKey, .disableKey, .scheduleKeyDeletion, .cancelKeyDeletion,
             .updateKeyDescription, .createAlias, .updateAlias, .deleteAlias, .listAliases, .tagResource, .untagResource,
             .listResourceTags, .enableKeyRotation, .disableKeyRotation, .getKeyRotationStatus, .rotateKeyOnDemand,
             .listKeyRotations, .setMinimumDecryptionVersion, .getParametersForImport, .importKeyMaterial,
             .deleteImportedKeyMaterial, .getKeyPolicy, .putKeyPolicy, .listKeyPolicies, .simulatePolicy, .createGrant, .listGrants,
             .listRetirableGrants, .retireGrant, .revokeGrant, .reviewAccess, .verifyAuditRecords, .status,
             .createBackup, .getBackupChunk, .getReplicationIdentity, .pinReplicationIdentity,
             .replicateKey, .importReplica, .updatePrimaryRegion: return false
        }
    }

    /// Handles one decoded frame; an undecodable one is audited and answered with id 0 (the
    /// framing is intact, so the connection stays).
    func handle(_ decoded: Result<IncomingRequest, KMSError>, principal: Principal, memo: DecisionMemo? = nil) -> Outgoing {
        switch decoded {
        case .success(let request): return handle(request.message, contexts: request.contexts, principal: principal, memo: memo)
        case .failure(let error):
            guard rateLimiter.allow(uid: principal.uid) else {
                return throttled(id: KMSProtocolConstants.connectionErrorRequestID, action: "Unknown", principal: principal)
            }
            auditRejected(action: "Unknown", principal: principal, error: error)
            return Outgoing(response: .failure(id: KMSProtocolConstants.connectionErrorRequestID, error))
        }
    }

    /// Answers a request over its uid's rate. The first such request of a uid in each second is
    /// audited on its own; the rest of that second are counted into one summary record (so a
    /// flood cannot turn into a flood of audit records), written when the uid's next throttled
    /// request comes in a later second or by `flushThrottleSummaries` once a second.
    func throttled(id: UInt64, action: String, principal: Principal, extraFields: [String] = []) -> Outgoing {
        let failure = KMSError(.throttling, "uid \(principal.uid) is over its request rate (maxRequestsPerSecondPerUid \(Int(rateLimiter.rate))); retry with exponential backoff")
        let (recordThis, summaries) = throttleLog.note(uid: principal.uid, principal: principal)
        for summary in summaries { writeThrottleSummary(summary) }
        if recordThis {
            var record = AuditRecord(action: action, requestID: id, principal: principal, result: .failed)
            record.error = .throttling
            record.extraFields = extraFields
            if !write(record), audit.failClosed {
                return Outgoing(response: .failure(id: id, KMSError(.auditUnavailable, "the audit record could not be handed to journald, so the request was refused; check that systemd-journald is running and keeping up")))
            }
        }
        return Outgoing(response: .failure(id: id, failure))
    }

    /// Writes the summaries of seconds that have ended; called once a second.
    func flushThrottleSummaries() {
        for summary in throttleLog.flush() { writeThrottleSummary(summary) }
    }

    private func writeThrottleSummary(_ s: ThrottleLog.Summary) {
        var record = AuditRecord(action: "ThrottledRequests", requestID: KMSProtocolConstants.connectionErrorRequestID,
                                 principal: s.principal, result: .failed)
        record.error = .throttling
        record.throttledCount = s.count
        if !audit.write(record) {
            StandardError.write("kmsd: WARNING: the summary of \(s.count) throttled requests of uid \(s.principal.uid) could not be audited\n")
        }
    }

    /// Zeroes the secret a request carried (an Encrypt plaintext) where SwiftProtobuf put it,
    /// whatever became of the request. Through a read-only view on purpose: a mutating one
    /// would copy the shared storage and zero only the copy. (Swift keeps payloads of 14 bytes
    /// or less inside the Data value itself; those copies are beyond reach here.)
    static func zeroSecrets(of operation: KMSRequest.OneOf_Operation?) {
        if case .encrypt(let r)? = operation {
            r.plaintext.withUnsafeBytes { zeroizeInPlace($0) }
        }
    }

    /// Audits something refused before it became a request: an undecodable frame ("Unknown")
    /// or a connection over the limits ("Connect").
    func auditRejected(action: String, principal: Principal, error: KMSError,
                       requestID: UInt64 = KMSProtocolConstants.connectionErrorRequestID, extraFields: [String] = []) {
        var record = AuditRecord(action: action, requestID: requestID, principal: principal,
                                 result: error.code == .accessDenied ? .denied : .failed)
        record.error = error.code
        record.extraFields = extraFields
        _ = write(record)
    }

    /// Writes a request's audit record, then a record for each alarm it sets off. False when
    /// journald did not take the request's record. Every request record goes through here, so
    /// alarms see refused connections, undecodable frames and throttled requests too.
    func write(_ record: AuditRecord) -> Bool {
        let audited = audit.write(record)
        for alarm in alarms.check(record) {
            var a = AuditRecord(action: "Alarm", requestID: record.requestID, principal: record.principal, result: record.result, details: record.details)
            a.error = record.error
            a.alarm = alarm.rule
            a.eventMessage = "ALARM \(alarm.rule): \(alarm.message)"
            _ = audit.write(a)
            StandardError.write("kmsd: ALARM \(alarm.rule): \(alarm.message)\n")
        }
        return audited
    }

    /// Successful requests that change something an auditor follows, and the event each also
    /// records (MESSAGE_ID of events, PRIORITY notice).
    static func managementEvent(_ operation: KMSRequest.OneOf_Operation?) -> String? {
        switch operation {
        case .createKey?: "KeyCreated"
        case .enableKey?: "KeyEnabled"
        case .disableKey?: "KeyDisabled"
        case .scheduleKeyDeletion?: "KeyDeletionScheduled"
        case .cancelKeyDeletion?: "KeyDeletionCancelled"
        case .rotateKeyOnDemand?: "KeyRotated"
        case .enableKeyRotation?: "KeyRotationEnabled"
        case .disableKeyRotation?: "KeyRotationDisabled"
        case .setMinimumDecryptionVersion?: "KeyMinimumDecryptionVersionSet"
        case .putKeyPolicy?: "KeyPolicyChanged"
        case .createGrant?: "GrantCreated"
        case .retireGrant?: "GrantRetired"
        case .revokeGrant?: "GrantRevoked"
        case .importKeyMaterial?: "KeyMaterialImported"
        case .deleteImportedKeyMaterial?: "KeyMaterialDeleted"
        case .createAlias?: "AliasCreated"
        case .updateAlias?: "AliasUpdated"
        case .deleteAlias?: "AliasDeleted"
        case .createBackup?: "BackupCreated"
        case .pinReplicationIdentity?: "ReplicationIdentityPinned"
        case .replicateKey?: "KeyReplicated"
        case .importReplica?: "ReplicaImported"
        case .updatePrimaryRegion?: "PrimaryRegionUpdated"
        default: nil
        }
    }

    /// Handles one request end to end; the audit record is written before this returns.
    /// `memo`: the connection's remembered decisions, only where the request is handled on the
    /// connection's event loop (never shared between threads).
    func handle(_ request: KMSRequest, contexts: WireContexts? = nil, principal: Principal, extraAuditFields: [String] = [],
                memo: DecisionMemo? = nil) -> Outgoing {
        // The operation read out of the request once (each read copies it, payload and all).
        let operation = request.operation
        defer { Self.zeroSecrets(of: operation) }
        let start = DispatchTime.now().uptimeNanoseconds
        var details = AuditDetails()
        var secret: ResponseSecret? = nil
        let outcome: Result<OperationResult, KMSError>
        let action = operation?.name ?? "Unknown"
        // Every request takes a token, whatever it asks; a throttled one does nothing else.
        guard rateLimiter.allow(uid: principal.uid) else {
            return throttled(id: request.id, action: action, principal: principal, extraFields: extraAuditFields)
        }
        if var op = operation {
            do {
                let ctx = HandlerContext(principal: principal, dispatcher: self, contexts: contexts, memo: memo)
                // One access decision, then the handler, which checks no access itself.
                do throws(KMSError) {
                    ctx.decided = try Authorizer.authorize(&op, ctx, &details)
                    outcome = .success(try Self.route(op, ctx, &details, &secret))
                } catch { outcome = .failure(error) }
            }
        } else {
            outcome = .failure(KMSError(.unsupportedOperation,
                "this server does not support the requested operation (protocol version \(KMSProtocolConstants.protocolVersion)); send Hello to list the operations it supports"))
        }
        var record = AuditRecord(action: action, requestID: request.id, principal: principal, result: .allowed,
                                 details: details)
        record.extraFields = extraAuditFields
        if case .failure(let e) = outcome {
            record.result = e.code == .accessDenied ? .denied : .failed
            record.error = e.code
        }
        record.durationMicros = (DispatchTime.now().uptimeNanoseconds - start) / 1000
        metrics.record(action: action, result: record.result, micros: record.durationMicros)
        let audited = write(record)
        var response = KMSResponse()
        response.id = request.id
        switch outcome {
        case _ where !audited && audit.failClosed:
            var message = "the audit record could not be handed to journald, so the request was refused"
            if case .success = outcome, let undo = record.details.undo {
                do { try undo(); message += " and nothing was changed" } catch {
                    message += "; undoing its effect failed too (\(error)), so it may have taken effect"
                    StandardError.write("kmsd: ERROR: \(action) could not be audited nor undone: \(error)\n")
                }
            }
            return Outgoing(response: .failure(id: request.id, KMSError(.auditUnavailable, message + "; check that systemd-journald is running and keeping up")))
        case .success(let r): response.result = r
        case .failure(let e): return Outgoing(response: .failure(id: request.id, e))
        }
        if let event = Self.managementEvent(operation) {
            // A change to a key, its policy, grants or aliases: also a NOTICE event of its own.
            // (`record.details`, not `details`: the record took the details over, uncopied.)
            let details = record.details
            var change = AuditRecord(action: event, requestID: request.id, principal: principal, result: .allowed, details: details)
            change.eventMessage = "\(event): \(action) by uid \(principal.uid) (\(principal.userName))"
                + (details.keyID.isEmpty ? "" : " on key \(details.keyID)") + (details.alias.isEmpty ? "" : " (\(details.alias))")
            _ = audit.write(change)
        }
        return Outgoing(response: response, secret: secret)
    }
}
