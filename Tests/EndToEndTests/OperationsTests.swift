import Foundation
import KMSClient
import Testing

/// Every operation of this version against a real kmsd over its real socket.
@Suite(.serialized)
final class OperationsTests {
    let daemon: Daemon
    let client: KMSClient

    init() throws {
        daemon = try Daemon()
        client = daemon.client()
    }

    deinit { daemon.stop() }

    @Test func helloListsTheOperations() async throws {
        let hello = try await client.hello()
        #expect(hello.protocolVersion == 1)
        #expect(hello.operations.contains("Encrypt") && hello.operations.contains("GenerateDataKeyWithoutPlaintext"))
        #expect(hello.maxFrameBytes == 65536)
        // Exactly the operations of kmsd.proto's Request oneof, each once.
        let proto = try String(contentsOfFile: URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../Protocol/kmsd.proto").standardized.path, encoding: .utf8)
        let oneof = try #require(proto.range(of: "oneof operation {").flatMap { start in
            proto[start.upperBound...].range(of: "}").map { proto[start.upperBound..<$0.lowerBound] }
        })
        let names = oneof.split(separator: "\n").compactMap { line -> String? in
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let type = words.first, type.hasSuffix("Request") else { return nil }
            return String(type.dropLast("Request".count))
        }
        #expect(names.count >= 32)
        #expect(hello.operations.sorted() == names.sorted(), "Hello lists \(hello.operations.count), the proto has \(names.count)")
        // No name twice.
        #expect(Set(hello.operations).count == hello.operations.count)
    }

    @Test func createDescribeAndList() async throws {
        let key = try await client.createKey(description: "orders", tags: ["team": "payments"])
        #expect(key.keyState == "Enabled" && key.enabled)
        #expect(key.keySpec == "SYMMETRIC_DEFAULT" && key.keyUsage == "ENCRYPT_DECRYPT")
        #expect(key.arn == "kmsd:key/" + key.keyID)
        let described = try await client.describeKey(keyID: key.keyID)
        #expect(described == key)
        #expect(try await client.describeKey(keyID: key.arn).keyID == key.keyID)
        // PROTOCOL.md §4: the ARN prefix is lower case only; any other spelling names no key.
        for other in ["KMSD:KEY/", "Kmsd:key/", "kmsd:KEY/", " kmsd:key/", "kmsd:key/alias/"] {
            await expectKMSError(.notFound) { try await self.client.describeKey(keyID: other + key.keyID) }
        }
        #expect(try await client.describeKey(keyID: key.keyID.uppercased()).keyID == key.keyID, "hex digits in either case")
        await expectKMSError(.notFound) { try await self.client.describeKey(keyID: UUID().uuidString.lowercased()) }
        await expectKMSError(.unsupportedOperation) { try await self.client.createKey(keySpec: "RSA_2048") }
        await expectKMSError(.validation) { try await self.client.createKey(keySpec: "AES_999") }
    }

    @Test func listKeysPaginates() async throws {
        var created = Set<String>()
        for _ in 0..<5 { created.insert(try await client.createKey().keyID) }
        var seen: [String] = []
        var marker = ""
        var pages = 0
        repeat {
            let page = try await client.listKeys(limit: 2, marker: marker)
            #expect(page.keys.count <= 2)
            seen += page.keys.map(\.keyID)
            marker = page.nextMarker
            #expect(page.truncated == !marker.isEmpty)
            pages += 1
        } while !marker.isEmpty && pages < 100
        #expect(created.isSubset(of: Set(seen)))
        #expect(seen.count == Set(seen).count, "no key listed twice")
        #expect(seen == seen.sorted())
        await expectKMSError(.invalidMarker) { try await self.client.listKeys(marker: "garbage") }
        // A marker is not a key id (that would let anyone probe which keys exist): only
        // markers this server handed out are accepted.
        let someKey = try #require(created.first)
        await expectKMSError(.invalidMarker) { try await self.client.listKeys(marker: someKey) }
        var forged = Array(try await client.listKeys(limit: 1).nextMarker.utf8)
        forged[forged.count - 1] = forged[forged.count - 1] == UInt8(ascii: "0") ? UInt8(ascii: "1") : UInt8(ascii: "0")
        await expectKMSError(.invalidMarker) { try await self.client.listKeys(marker: String(decoding: forged, as: UTF8.self)) }
    }

    @Test func encryptDecryptWithContext() async throws {
        let key = try await client.createKey()
        let plaintext = Array("attack at dawn".utf8)
        let context = ["tenant": "42", "purpose": "test"]
        let enc = try await client.encrypt(keyID: key.keyID, plaintext: plaintext, context: context)
        #expect(enc.keyID == key.keyID)
        #expect(enc.ciphertextBlob.count == plaintext.count + 82)
        #expect(enc.ciphertextBlob.range(of: Data(plaintext)) == nil)
        let dec = try await client.decrypt(ciphertextBlob: Array(enc.ciphertextBlob), context: context)
        #expect(Array(dec.plaintext) == plaintext)
        #expect(dec.keyID == key.keyID && dec.keyVersion == 1)
        // The same plaintext twice gives different blobs (fresh salt and nonce).
        let again = try await client.encrypt(keyID: key.keyID, plaintext: plaintext, context: context)
        #expect(again.ciphertextBlob != enc.ciphertextBlob)
    }

    @Test func wrongMissingOrTamperedGiveInvalidCiphertext() async throws {
        let key = try await client.createKey()
        let blob = Array(try await client.encrypt(keyID: key.keyID, plaintext: [1, 2, 3], context: ["a": "b"]).ciphertextBlob)
        await expectKMSError(.invalidCiphertext) { try await self.client.decrypt(ciphertextBlob: blob) }
        await expectKMSError(.invalidCiphertext) { try await self.client.decrypt(ciphertextBlob: blob, context: ["a": "c"]) }
        await expectKMSError(.invalidCiphertext) { try await self.client.decrypt(ciphertextBlob: blob, context: ["a": "b", "x": "y"]) }
        for index in [0, 1, 30, 60, blob.count - 20, blob.count - 1] {
            var tampered = blob
            tampered[index] ^= 0x01
            await expectKMSError(.invalidCiphertext) { try await self.client.decrypt(ciphertextBlob: tampered, context: ["a": "b"]) }
        }
        await expectKMSError(.invalidCiphertext) { try await self.client.decrypt(ciphertextBlob: Array(blob.prefix(81)), context: ["a": "b"]) }
        await expectKMSError(.validation) { try await self.client.decrypt(ciphertextBlob: [UInt8](repeating: 1, count: 7000)) }
    }

    @Test func aBlobOfAnotherKeyWithKeyIdGivesIncorrectKey() async throws {
        let a = try await client.createKey(), b = try await client.createKey()
        let blob = Array(try await client.encrypt(keyID: a.keyID, plaintext: [9]).ciphertextBlob)
        await expectKMSError(.incorrectKey) { try await self.client.decrypt(ciphertextBlob: blob, keyID: b.keyID) }
        #expect(try await client.decrypt(ciphertextBlob: blob, keyID: a.keyID).plaintext == Data([9]))
    }

    @Test func reEncryptMovesToAnotherKeyAndContext() async throws {
        let a = try await client.createKey(), b = try await client.createKey()
        let blob = Array(try await client.encrypt(keyID: a.keyID, plaintext: Array("payload".utf8), context: ["v": "1"]).ciphertextBlob)
        let re = try await client.reEncrypt(ciphertextBlob: blob, sourceContext: ["v": "1"], destinationKeyID: b.keyID, destinationContext: ["v": "2"])
        #expect(re.sourceKeyID == a.keyID && re.keyID == b.keyID)
        let dec = try await client.decrypt(ciphertextBlob: Array(re.ciphertextBlob), context: ["v": "2"])
        #expect(String(decoding: dec.plaintext, as: UTF8.self) == "payload" && dec.keyID == b.keyID)
        await expectKMSError(.invalidCiphertext) {
            try await self.client.reEncrypt(ciphertextBlob: blob, sourceContext: ["v": "x"], destinationKeyID: b.keyID)
        }
    }

    @Test(arguments: [("AES_256", UInt32(0), 32), ("AES_128", 0, 16), ("", 7, 7), ("", 1024, 1024)])
    func generateDataKey(_ spec: String, _ n: UInt32, _ expected: Int) async throws {
        let key = try await client.createKey()
        let dk = try await client.generateDataKey(keyID: key.keyID, keySpec: spec, numberOfBytes: n, context: ["file": "x"])
        #expect(dk.plaintext.count == expected)
        let dec = try await client.decrypt(ciphertextBlob: Array(dk.ciphertextBlob), context: ["file": "x"])
        #expect(dec.plaintext == dk.plaintext)
        let wp = try await client.generateDataKeyWithoutPlaintext(keyID: key.keyID, keySpec: spec, numberOfBytes: n)
        #expect(try await client.decrypt(ciphertextBlob: Array(wp.ciphertextBlob)).plaintext.count == expected)
    }

    @Test func generateDataKeyValidation() async throws {
        let key = try await client.createKey()
        await expectKMSError(.validation) { try await self.client.generateDataKey(keyID: key.keyID) }
        await expectKMSError(.validation) { try await self.client.generateDataKey(keyID: key.keyID, keySpec: "AES_256", numberOfBytes: 32) }
        await expectKMSError(.validation) { try await self.client.generateDataKey(keyID: key.keyID, numberOfBytes: 1025) }
        await expectKMSError(.validation) { try await self.client.generateDataKey(keyID: key.keyID, keySpec: "AES_512") }
    }

    @Test func generateRandom() async throws {
        let a = try await client.generateRandom(numberOfBytes: 32), b = try await client.generateRandom(numberOfBytes: 32)
        #expect(a.count == 32 && a != b)
        await expectKMSError(.validation) { try await self.client.generateRandom(numberOfBytes: 0) }
        await expectKMSError(.validation) { try await self.client.generateRandom(numberOfBytes: 1025) }
    }

    @Test func encryptLimits() async throws {
        let key = try await client.createKey()
        #expect(try await client.encrypt(keyID: key.keyID, plaintext: [UInt8](repeating: 1, count: 4096)).ciphertextBlob.count == 4096 + 82)
        await expectKMSError(.validation) { try await self.client.encrypt(keyID: key.keyID, plaintext: [UInt8](repeating: 1, count: 4097)) }
        await expectKMSError(.validation) { try await self.client.encrypt(keyID: key.keyID, plaintext: []) }
        await expectKMSError(.validation) { try await self.client.encrypt(keyID: key.keyID, plaintext: [1], context: ["": "x"]) }
    }

    @Test func pipelinesAThousandRequestsOnOneConnection() async throws {
        let key = try await client.createKey()
        let requests = (0..<1000).map { i in
            var r = KMSRequest()
            r.encrypt = .with { $0.keyID = key.keyID; $0.plaintext = Data("message \(i)".utf8) }
            return r
        }
        // All 1,000 frames are written before any response is read.
        let responses = try await client.pipeline(requests)
        #expect(responses.count == 1000)
        #expect(Set(responses.map(\.id)).count == 1000)
        // Decrypt them all, again pipelined, and check each answer matches its own request.
        let decrypts = responses.map { resp in
            var r = KMSRequest()
            guard case .encrypt(let e)? = resp.result else { return r }
            r.decrypt = .with { $0.ciphertextBlob = e.ciphertextBlob }
            return r
        }
        let plaintexts = try await client.pipeline(decrypts)
        for (i, p) in plaintexts.enumerated() {
            guard case .decrypt(let d)? = p.result else { Issue.record("request \(i): \(p)"); continue }
            #expect(String(decoding: d.plaintext, as: UTF8.self) == "message \(i)")
        }
    }
}
