import Foundation
@testable import KMSCore
import KMSCrypto
import Testing

/// The access review's flags (issue 7): a key-policy statement for everyone is flagged
/// `wildcard-principal`; an identity-policy statement, which applies to the identities its
/// policy is attached to, is not (it has no Principal of its own), whatever its actions.
struct AccessReviewTests {
    @Test func identityPolicyStatementsAreNotWildcardPrincipals() throws {
        let host = try ReplicationServiceTests.host("review")
        let service = host.service
        let admin = Principal(uid: 0, gid: 0, pid: 1, userName: "root")
        let key = try service.createKey(KeyService.CreateKeyInput(), caller: admin)
        let identity = try IdentityPolicy.parse(#"""
            {"Version": "2012-10-17", "AttachTo": {"Uid": "64300"},
             "Statement": [{"Sid": "AllKeys", "Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}
            """#, name: "ops")
        service.setIdentityPolicies(IdentityPolicySet([identity]))
        _ = try service.putKeyPolicy(key.keyID.description, name: "default", policy: #"""
            {"Version": "2012-10-17", "Statement": [
              {"Sid": "Root", "Effect": "Allow", "Principal": {"Uid": "0"}, "Action": "kms:*", "Resource": "*"},
              {"Sid": "Delegate", "Effect": "Allow", "Principal": {"Role": "IdentityPolicies"}, "Action": "kms:*", "Resource": "*"},
              {"Sid": "Everyone", "Effect": "Allow", "Principal": "*", "Action": "kms:DescribeKey", "Resource": "*"}]}
            """#, bypass: false, caller: admin)
        let entries = try service.reviewAccess(try #require(try service.repository.record(key.keyID)))
        let everyone = try #require(entries.first { $0.source == "key-policy:Everyone" })
        #expect(everyone.flags.contains("wildcard-principal"))
        let ops = try #require(entries.first { $0.source == "identity-policy:ops:AllKeys" }, "\(entries.map(\.source))")
        #expect(!ops.flags.contains("wildcard-principal") && ops.flags.contains("wildcard-action"), "\(ops.flags)")
        #expect(ops.principals == ["Uid:64300"])
    }
}
