import Foundation
import KMSProtocol
import KMSServer

/// Seed corpora for `make fuzz`, from Protocol/vectors (the request frames and the ciphertext
/// blobs other implementations are tested against) and a few policies.
enum Seeds {
    static func write(to directory: String, vectors: String) throws {
        let fm = FileManager.default
        for name in FuzzTargets.names { try fm.createDirectory(atPath: directory + "/" + name, withIntermediateDirectories: true) }
        func save(_ target: String, _ name: String, _ bytes: [UInt8]) throws {
            try Data(bytes).write(to: URL(fileURLWithPath: "\(directory)/\(target)/\(name)"))
        }
        let frames = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: vectors + "/frames.json"))) as? [String: Any]
        var n = 0
        for case let v as [String: Any] in frames?["vectors"] as? [Any] ?? [] {
            guard v["direction"] as? String == "request", let hex = v["frame_hex"] as? String, let frame = Hex.decode(hex) else { continue }
            n += 1
            try save("frames", "vector-\(n)", [7] + frame + frame)
            try save("request", "vector-\(n)", [UInt8(n & 1)] + Array(frame.dropFirst(4)))
        }
        let blobs = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: vectors + "/ciphertext.json"))) as? [String: Any]
        var m = 0
        for case let v as [String: Any] in (blobs?["vectors"] as? [Any] ?? []) + (blobs?["invalid"] as? [Any] ?? []) {
            for case let hex as String in v.values where hex.count > 100 {
                guard let blob = Hex.decode(hex) else { continue }
                m += 1
                try save("ciphertext", "vector-\(m)", blob)
            }
        }
        let policies = [
            #"{"Version": "2012-10-17", "Statement": [{"Sid": "Owner", "Effect": "Allow", "Principal": {"Uid": "1000"}, "Action": "kms:*", "Resource": "*"}]}"#,
            #"{"Version": "2012-10-17", "Statement": [{"Sid": "Payroll", "Effect": "Allow", "Principal": {"Unit": "payroll.service"}, "Action": ["kms:Decrypt", "kms:GenerateDataKey*"], "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:dept": "payroll"}, "ForAnyValue:StringLike": {"kms:EncryptionContextKeys": ["d*"]}}}, {"Sid": "NoDelete", "Effect": "Deny", "NotPrincipal": {"Group": "wheel"}, "NotAction": "kms:Describe*", "Resource": "*", "Condition": {"NumericLessThan": {"kms:CallerUid": "1000"}, "Bool": {"kms:ViaService": "false"}, "Null": {"kms:ResourceTag/team": "true"}}}]}"#,
            #"{"Version": "2012-10-17", "Statement": [{"Sid": "Delegate", "Effect": "Allow", "Principal": {"Role": "IdentityPolicies"}, "Action": "kms:*", "Resource": "*"}]}"#,
        ]
        for (i, p) in policies.enumerated() { try save("policy", "policy-\(i + 1)", Array(p.utf8)) }
        print("kmsfuzz: seeds in \(directory): \(n) request frames, \(m) ciphertext blobs, \(policies.count) policies")
    }
}
