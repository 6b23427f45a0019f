import Foundation
import Glibc
import KMSClient
import KMSProtocol
import Testing

/// The per-connection memo of access decisions (DecisionMemo): a connection's repeated
/// Encrypt and Decrypt reuse the decision made for the same key, action and context, audited
/// exactly as a fresh one; a different context is decided afresh; and any change (a new key
/// policy, a disabled key, a revoked grant) made on another connection ends the remembered
/// decision before that change is acknowledged, so the very next request sees it.
/// Status's `access_decisions_reused` shows the memo was in use, so no test here passes just
/// because nothing was remembered.
@Suite(.serialized, .enabled(if: isRoot, "needs root to start a private journald and to read kmsd's audit records back"))
final class DecisionMemoTests {
    let daemon: Daemon
    /// The connection whose decisions are remembered, and the one that changes things.
    let user: KMSClient
    let admin: KMSClient
    let uid = getuid()

    init() throws {
        try Journal.ensureRunning()
        daemon = try Daemon()
        user = daemon.client()
        admin = daemon.client()
    }

    deinit { daemon.stop() }

    /// A policy without the administrators' statement: the caller may manage the key, and
    /// encrypt and decrypt only with app=orders (unless `encrypt` is false).
    func policy(encrypt: Bool = true) -> String {
        let manage = #"{"Sid": "Manage", "Effect": "Allow", "Principal": {"Uid": "\#(uid)"}, "Action": ["kms:PutKeyPolicy", "kms:GetKeyPolicy", "kms:DescribeKey", "kms:CreateGrant", "kms:RevokeGrant", "kms:ListGrants", "kms:DisableKey", "kms:EnableKey"], "Resource": "*"}"#
        let orders = #"{"Sid": "Orders", "Effect": "Allow", "Principal": {"Uid": "\#(uid)"}, "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:app": "orders"}}}"#
        return #"{"Version": "2012-10-17", "Statement": [\#(manage)\#(encrypt ? ", " + orders : "")]}"#
    }

    func reused() async throws -> UInt64 { try await admin.status().accessDecisionsReused }

    static let orders = ["app": "orders"]

    @Test func aRepeatedRequestReusesItsDecisionAndIsAuditedTheSame() async throws {
        let key = try await admin.createKey().keyID
        try await admin.putKeyPolicy(keyID: key, policy: policy())
        let before = try await reused()
        var blobs: [[UInt8]] = []
        for i in 0..<5 {
            let r = try await user.encrypt(keyID: key, plaintext: Array("message \(i)".utf8), context: Self.orders)
            blobs.append(Array(r.ciphertextBlob))
        }
        for (i, blob) in blobs.enumerated() {
            let r = try await user.decrypt(ciphertextBlob: blob, context: Self.orders)
            #expect(Array(r.plaintext) == Array("message \(i)".utf8))
        }
        let afterUse = try await reused()
        // The first of each kind is decided and remembered; most of the rest reuse it.
        #expect(afterUse - before >= 6, "only \(afterUse - before) of 10 requests reused a decision")
        // Another context is decided afresh: this one is not allowed.
        await expectKMSError(.accessDenied) { try await user.encrypt(keyID: key, plaintext: [1, 2, 3], context: ["app": "billing"]) }
        await expectKMSError(.accessDenied) { try await user.decrypt(ciphertextBlob: blobs[0], context: ["app": "billing"]) }
        await expectKMSError(.accessDenied) { try await user.encrypt(keyID: key, plaintext: [1, 2, 3]) }
        // Every allowed request's record is the same, reused or not.
        for action in ["Encrypt", "Decrypt"] {
            let records = try Journal.query(["_PID=\(daemon.pid)", "KMS_ACTION=\(action)", "KMS_KEY_ID=\(key)", "KMS_RESULT=Allowed"],
                                            since: daemon.startedAt, atLeast: 5)
            #expect(records.count == 5, "\(action): \(records.count) allowed records")
            for r in records {
                #expect(r["KMS_DECIDED_BY"] as? String == "key-policy:Orders", "\(action): \(r["KMS_DECIDED_BY"] ?? "none")")
                #expect(r["KMS_ENCRYPTION_CONTEXT"] as? String == "app", "\(action): \(r["KMS_ENCRYPTION_CONTEXT"] ?? "none")")
                #expect(r["KMS_KEY_VERSION"] as? String == "1")
            }
        }
        let denied = try Journal.query(["_PID=\(daemon.pid)", "KMS_ACTION=Encrypt", "KMS_KEY_ID=\(key)", "KMS_RESULT=Denied"],
                                       since: daemon.startedAt, atLeast: 2)
        #expect(denied.count == 2 && denied.allSatisfy { $0["KMS_DECIDED_BY"] as? String == "implicit-deny" })
    }

    enum Change: String, CaseIterable, CustomTestStringConvertible {
        case newPolicy, disabledKey, revokedGrant
        var testDescription: String { rawValue }
    }

    @Test(arguments: Change.allCases)
    func aChangeOnAnotherConnectionEndsTheRememberedDecision(_ change: Change) async throws {
        let key = try await admin.createKey().keyID
        // With revokedGrant, only a grant lets the caller encrypt and decrypt.
        try await admin.putKeyPolicy(keyID: key, policy: policy(encrypt: change != .revokedGrant))
        var grantID = ""
        if change == .revokedGrant {
            grantID = try await admin.createGrant(keyID: key, granteePrincipal: "uid:\(uid)", operations: ["Encrypt", "Decrypt"]).grantID
        }
        let before = try await reused()
        var blob: [UInt8] = []
        for _ in 0..<4 {
            blob = Array(try await user.encrypt(keyID: key, plaintext: [7, 7, 7], context: Self.orders).ciphertextBlob)
            _ = try await user.decrypt(ciphertextBlob: blob, context: Self.orders)
        }
        #expect(try await reused() - before >= 4, "the decisions were not remembered, so this test would show nothing")
        switch change {
        case .newPolicy:
            try await admin.putKeyPolicy(keyID: key, policy: policy(encrypt: false))
        case .disabledKey:
            try await admin.disableKey(keyID: key)
        case .revokedGrant:
            try await admin.revokeGrant(keyID: key, grantID: grantID)
        }
        // The very next request on the remembering connection sees the change.
        let expected: KMSErrorCode = change == .disabledKey ? .disabled : .accessDenied
        await expectKMSError(expected) { try await user.encrypt(keyID: key, plaintext: [7, 7, 7], context: Self.orders) }
        await expectKMSError(expected) { try await user.decrypt(ciphertextBlob: blob, context: Self.orders) }
        let refusals = try Journal.query(["_PID=\(daemon.pid)", "KMS_KEY_ID=\(key)", "KMS_ERROR=\(expected.rawValue)"],
                                         since: daemon.startedAt, atLeast: 2)
        #expect(Set(refusals.compactMap { $0["KMS_ACTION"] as? String }) == ["Encrypt", "Decrypt"])
        if change == .disabledKey {
            // Enabled again: allowed again, on the same connection.
            try await admin.enableKey(keyID: key)
            _ = try await user.encrypt(keyID: key, plaintext: [7, 7, 7], context: Self.orders)
        }
    }
}
