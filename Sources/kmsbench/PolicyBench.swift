import Foundation
import KMSCore
import KMSCrypto

/// The cost of the access decision: a key policy of 20 statements (the caller's Allow last, with
/// a condition; Denies whose conditions must be evaluated and fail; Allows for other principals
/// and actions) against the default policy of two statements.
enum PolicyBench {
    /// 20 statements; `uid` may Encrypt (and administer), under the last statements only.
    static func twentyStatements(uid: UInt32) -> String {
        var statements: [String] = []
        for i in 0..<8 {
            statements.append(#"{"Sid": "Other\#(i)", "Effect": "Allow", "Principal": {"Uid": "\#(50_000 + i)"}, "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"}"#)
        }
        for i in 0..<5 {
            statements.append(#"{"Sid": "DenyUnit\#(i)", "Effect": "Deny", "Principal": "*", "Action": "kms:Encrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:CallerUnit": "blocked-\#(i).service"}}}"#)
        }
        for i in 0..<4 {
            statements.append(#"{"Sid": "Readers\#(i)", "Effect": "Allow", "Principal": {"Group": "\#(60_000 + i)"}, "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:dept": "d\#(i)"}}}"#)
        }
        statements.append(#"{"Sid": "DenyFinanceOutsideHours", "Effect": "Deny", "Principal": "*", "Action": "kms:*", "Resource": "*", "Condition": {"StringEquals": {"kms:ResourceTag/category": "finance"}}}"#)
        statements.append(#"{"Sid": "Administer", "Effect": "Allow", "Principal": {"Uid": "\#(uid)"}, "Action": ["kms:PutKeyPolicy", "kms:GetKeyPolicy", "kms:DescribeKey"], "Resource": "*"}"#)
        statements.append(#"{"Sid": "BenchEncrypts", "Effect": "Allow", "Principal": {"Uid": "\#(uid)"}, "Action": "kms:Encrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:KeySpec": "SYMMETRIC_DEFAULT"}}}"#)
        return #"{"Version": "2012-10-17", "Statement": [\#(statements.joined(separator: ", "))]}"#
    }

    struct Result: Codable, Sendable {
        let defaultPolicyNanos: Double
        let twentyStatementNanos: Double
        let statements: Int
    }

    /// Nanoseconds per access decision (KeyService.decide, as every request makes it), in this
    /// process, for the default policy and the 20-statement one.
    static func measure(iterations: Int = 500_000) throws -> Result {
        let uid = getuid()
        let repository = try KeyRepository(storage: SQLiteKeyStorage(path: ":memory:", readConnections: 1),
                                           root: RootKey(material: SecureBytes.random(count: 32)))
        let service = KeyService(repository: repository, administrators: Administrators(uids: [0]))
        let caller = Principal(uid: uid, gid: getgid(), pid: getpid(), userName: "bench", groups: [], executable: "/usr/bin/kmsbench")
        func record(policy: String?) -> KeyRecord {
            var r = KeyRecord(keyID: .random(), createdAt: Date(), description: "", keyUsage: .encryptDecrypt, keySpec: .symmetricDefault,
                              state: .enabled, ownerUID: uid, currentVersion: 1, tags: [Tag(key: "category", value: "orders")], origin: "AWS_KMS")
            r.policy = policy
            return r
        }
        func time(_ key: KeyRecord) throws -> Double {
            var facts = RequestFacts(action: "Encrypt", caller: caller, isAdministrator: false, key: key)!
            facts.encryptionContext = [(key: "tenant", value: "acme")]
            guard service.decide(facts).allowed else { throw BenchError("the benchmark policy does not allow the benchmark's Encrypt") }
            var allowed = 0
            let start = monotonicNanos()
            for _ in 0..<iterations where service.decide(facts).allowed { allowed += 1 }
            let elapsed = monotonicNanos() - start
            guard allowed == iterations else { throw BenchError("a decision changed during the benchmark") }
            return Double(elapsed) / Double(iterations)
        }
        let text = twentyStatements(uid: uid)
        let count = try KeyPolicy.parse(text, strict: false).statements.count
        return Result(defaultPolicyNanos: try time(record(policy: nil)), twentyStatementNanos: try time(record(policy: text)), statements: count)
    }
}
