import Foundation
import KMSCrypto
import KMSEnvelope
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
        // File envelopes: the vectors (other data keys: they stop at the commitment) and files
        // under the fuzz target's data key, which mutations can take into the chunk reader.
        let envelopes = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: vectors + "/envelope.json"))) as? [String: Any]
        var e = 0
        for case let v as [String: Any] in (envelopes?["vectors"] as? [Any] ?? []) + (envelopes?["invalid"] as? [Any] ?? []) {
            guard let hex = v["file_hex"] as? String, let file = Hex.decode(hex) else { continue }
            e += 1
            try save("envelope", "vector-\(e)", file)
        }
        for (size, chunk, context) in [(0, 16, [:]), (5, 1, ["k": "v"]), (40, 16, ["k": "v", "a": "b"]), (300, 64, ["k": "w"])] as [(Int, Int, [String: String])] {
            var input = BytesInput((0..<size).map { UInt8(truncatingIfNeeded: $0) })
            var output = BytesOutput()
            _ = try FileEnvelope.encrypt(dataKey: FuzzTargets.envelopeDataKey, encryptedDataKey: Array(repeating: 0xed, count: 20 + size % 7),
                                         context: context, chunkSize: chunk, from: &input, to: &output)
            e += 1
            try save("envelope", "keyed-\(size)-\(chunk)", output.bytes)
        }
        print("kmsfuzz: seeds in \(directory): \(n) request frames, \(m) ciphertext blobs, \(policies.count) policies, \(e) file envelopes")
    }
}
