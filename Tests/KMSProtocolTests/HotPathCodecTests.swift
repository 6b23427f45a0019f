import Foundation
@testable import KMSProtocol
import NIOCore
import SwiftProtobuf
import Testing

/// The request path's shortcuts (`HotRequestDecoder`, `HotResponseEncoder`) against
/// SwiftProtobuf: whatever the shortcut accepts it must read exactly as SwiftProtobuf does
/// (the request and the context pairs as `WireContexts(scanning:)` finds them), and whatever it
/// writes must be SwiftProtobuf's bytes. Inputs: the independent vectors, random requests of
/// the four kinds, and random mutations of them (most of which the shortcut must hand back).
struct HotPathCodecTests {
    /// A small deterministic generator, so a failure can be replayed from its seed.
    struct SplitMix: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    static let texts = ["", "k", "dept", "payroll", "1234abcd-12ab-34cd-56ef-1234567890ab", "alias/app", "é", "e\u{301}", "日本語", "😀", String(repeating: "x", count: 200)]

    static func text(_ g: inout SplitMix) -> String { texts.randomElement(using: &g)! }
    static func bytes(_ g: inout SplitMix, max: Int = 300) -> Data { Data((0..<Int.random(in: 0...max, using: &g)).map { _ in UInt8.random(in: 0...255, using: &g) }) }
    static func context(_ g: inout SplitMix) -> [String: String] {
        var c: [String: String] = [:]
        for _ in 0..<Int.random(in: 0...4, using: &g) { c[text(&g)] = text(&g) }
        return c
    }

    /// A random Encrypt, Decrypt, GenerateDataKey or GenerateDataKeyWithoutPlaintext request.
    static func request(_ g: inout SplitMix) -> KMSRequest {
        var r = KMSRequest()
        r.id = [0, 1, 127, 128, 300, UInt64.max].randomElement(using: &g)!
        switch Int.random(in: 0..<4, using: &g) {
        case 0:
            var e = Kmsd_V1_EncryptRequest()
            e.keyID = text(&g); e.plaintext = bytes(&g); e.encryptionContext = context(&g)
            if Bool.random(using: &g) { e.encryptionAlgorithm = "SYMMETRIC_DEFAULT" }
            r.operation = .encrypt(e)
        case 1:
            var d = Kmsd_V1_DecryptRequest()
            d.ciphertextBlob = bytes(&g); d.encryptionContext = context(&g); d.keyID = text(&g)
            if Bool.random(using: &g) { d.encryptionAlgorithm = "SYMMETRIC_DEFAULT" }
            r.operation = .decrypt(d)
        case 2:
            var k = Kmsd_V1_GenerateDataKeyRequest()
            k.keyID = text(&g); k.keySpec = ["", "AES_256", "AES_128"].randomElement(using: &g)!
            k.numberOfBytes = [0, 1, 64, 1024, UInt32.max].randomElement(using: &g)!; k.encryptionContext = context(&g)
            r.operation = .generateDataKey(k)
        default:
            var k = Kmsd_V1_GenerateDataKeyWithoutPlaintextRequest()
            k.keyID = text(&g); k.keySpec = ["", "AES_256"].randomElement(using: &g)!
            k.numberOfBytes = [0, 32].randomElement(using: &g)!; k.encryptionContext = context(&g)
            r.operation = .generateDataKeyWithoutPlaintext(k)
        }
        return r
    }

    /// Checks one input; returns whether the shortcut took it.
    @discardableResult
    static func check(_ body: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
        let hot = body.withUnsafeBytes { HotRequestDecoder.decode($0) }
        guard let (message, contexts) = hot else { return false }
        let reference = try? KMSRequest(serializedBytes: body)
        #expect(reference == message, "shortcut and SwiftProtobuf differ on \(body.map { String(format: "%02x", $0) }.joined())", sourceLocation: sourceLocation)
        let scanned = body.withUnsafeBytes { WireContexts(scanning: $0) }
        #expect(scanned.complete && contexts.fromOneReading, sourceLocation: sourceLocation)
        for (operation, field) in [(30, 3), (31, 2), (33, 4), (34, 4)] {
            #expect(contexts.context(operation: operation, field: field) == scanned.context(operation: operation, field: field), sourceLocation: sourceLocation)
        }
        return true
    }

    @Test func randomRequestsOfTheFourKindsTakeTheShortcut() throws {
        var g = SplitMix(state: 1)
        for _ in 0..<3000 {
            let body: [UInt8] = try Self.request(&g).serializedBytes()
            #expect(Self.check(body))
        }
    }

    /// Context entries written one by one, as a client may: the same key twice (protobuf keeps
    /// the last value), keys Swift considers equal but whose bytes differ (NFC and NFD), empty
    /// keys and values. The shortcut takes them all and reads them as SwiftProtobuf does.
    @Test func repeatedAndCanonicallyEqualContextKeys() throws {
        func field(_ n: UInt8, _ bytes: [UInt8]) -> [UInt8] { [n << 3 | 2] + varint(bytes.count) + bytes }
        func varint(_ v: Int) -> [UInt8] { var v = v, out: [UInt8] = []; while v >= 0x80 { out.append(UInt8(v & 0x7f) | 0x80); v >>= 7 }; return out + [UInt8(v)] }
        var g = SplitMix(state: 7)
        for _ in 0..<2000 {
            let pairs = (0..<Int.random(in: 1...6, using: &g)).map { _ in
                (["a", "é", "e\u{301}", ""].randomElement(using: &g)!, Self.text(&g))
            }
            let entries = pairs.flatMap { field(3, field(1, Array($0.0.utf8)) + field(2, Array($0.1.utf8))) }
            let inner = field(1, Array("k".utf8)) + entries + field(2, [1, 2, 3])
            let body: [UInt8] = [0x08, 0x07] + [0xf2, 0x01] + varint(inner.count) + inner
            #expect(Self.check(body))
            let (message, _) = try #require(body.withUnsafeBytes { HotRequestDecoder.decode($0) })
            guard case .encrypt(let r)? = message.operation else { Issue.record("not an Encrypt"); continue }
            // The last value sent under each (canonically equal) key.
            var expected: [String: String] = [:]
            for (k, v) in pairs { expected[k] = v }
            #expect(r.encryptionContext == expected)
        }
    }

    /// Random damage to valid requests: byte flips, cuts, insertions, a field appended again.
    /// The shortcut must refuse (hand to SwiftProtobuf) or agree with SwiftProtobuf exactly.
    @Test(arguments: [UInt64(2), 3, 4, 5])
    func mutatedRequestsAgreeOrFallBack(_ seed: UInt64) throws {
        var g = SplitMix(state: seed)
        var taken = 0, refused = 0
        for _ in 0..<4000 {
            var body: [UInt8] = try Self.request(&g).serializedBytes()
            for _ in 0..<Int.random(in: 1...3, using: &g) {
                switch Int.random(in: 0..<5, using: &g) {
                case 0 where !body.isEmpty: body[Int.random(in: 0..<body.count, using: &g)] ^= UInt8(1) << UInt8.random(in: 0...7, using: &g)
                case 1 where !body.isEmpty: body.removeLast(Int.random(in: 1...min(body.count, 8), using: &g))
                case 2: body.insert(UInt8.random(in: 0...255, using: &g), at: Int.random(in: 0...body.count, using: &g))
                case 3 where body.count > 2:
                    // Repeat a stretch: duplicated fields, map entries, operations.
                    let a = Int.random(in: 0..<body.count, using: &g), n = Int.random(in: 1...min(40, body.count - a), using: &g)
                    body += body[a..<a + n]
                default: body += try Self.request(&g).serializedBytes()
                }
            }
            if Self.check(body) { taken += 1 } else { refused += 1 }
        }
        // Both branches exercised.
        #expect(taken > 100)
        #expect(refused > 100)
    }

    /// Shapes SwiftProtobuf reads in its own way: the shortcut hands every one of them back,
    /// and the frame still decodes (or is refused) as SwiftProtobuf says.
    @Test(arguments: [
        ("key_id twice (last wins)", "f201060a01610a0162"),
        ("an unknown field", "f201060a0161a00601"),
        ("key_id not UTF-8", "f201030a01ff"),
        ("two operations", "f20100fa0100"),
        ("operation repeated (merged)", "f201030a0161f201031201ff"),
        ("number_of_bytes over 32 bits", "8a0206188080808010"),
        ("a map entry with a third field", "f201071a050a01611801"),
        ("id as length-delimited", "0a00f20100"),
        ("an operation the shortcut leaves alone", "aa0100"),
        ("id twice", "0801f201000802"),
    ])
    func unusualShapesFallBack(_ name: String, _ hex: String) throws {
        let body = try #require(Self.hexBytes(hex))
        #expect(body.withUnsafeBytes { HotRequestDecoder.decode($0) } == nil, "\(name)")
        var buffer = ByteBuffer()
        buffer.writeBytes(body)
        let reference = try? KMSRequest(serializedBytes: body)
        let decoded = try? IncomingRequest(frameBody: buffer)
        #expect(decoded?.message == reference, "\(name)")
        #expect(decoded?.contexts.fromOneReading != true)
    }

    @Test func theIndependentVectorsAgree() throws {
        let data = try Data(contentsOf: FrameVectorTests.root.appendingPathComponent("Protocol/vectors/frames.json"))
        let vectors = try JSONDecoder().decode([String: [FrameVectorTests.Vector]].self, from: data)["vectors"] ?? []
        var taken = 0
        for v in vectors where v.direction == "request" {
            let frame = try #require(Self.hexBytes(v.frame_hex))
            if Self.check(Array(frame.dropFirst(4))) { taken += 1 }
        }
        #expect(taken >= 3)
    }

    // MARK: responses

    static func response(_ g: inout SplitMix) -> KMSResponse {
        var r = KMSResponse()
        r.id = [0, 5, 128, UInt64.max].randomElement(using: &g)!
        switch Int.random(in: 0..<4, using: &g) {
        case 0:
            var e = Kmsd_V1_EncryptResponse()
            e.ciphertextBlob = bytes(&g); e.keyID = text(&g); e.encryptionAlgorithm = ["", "SYMMETRIC_DEFAULT"].randomElement(using: &g)!
            r.result = .encrypt(e)
        case 1:
            var d = Kmsd_V1_DecryptResponse()
            d.keyID = text(&g); d.plaintext = bytes(&g, max: 20); d.encryptionAlgorithm = text(&g)
            d.keyVersion = [0, 1, 200, UInt32.max].randomElement(using: &g)!
            r.result = .decrypt(d)
        case 2:
            var k = Kmsd_V1_GenerateDataKeyResponse()
            k.ciphertextBlob = bytes(&g); k.plaintext = bytes(&g, max: 40); k.keyID = text(&g)
            r.result = .generateDataKey(k)
        default:
            var k = Kmsd_V1_GenerateDataKeyWithoutPlaintextResponse()
            k.ciphertextBlob = bytes(&g); k.keyID = text(&g)
            r.result = .generateDataKeyWithoutPlaintext(k)
        }
        return r
    }

    @Test func responsesAreSwiftProtobufsBytes() throws {
        var g = SplitMix(state: 9)
        for _ in 0..<3000 {
            let r = Self.response(&g)
            let plan = try #require(HotResponseEncoder.plan(r))
            var buffer = ByteBuffer()
            HotResponseEncoder.write(plan, into: &buffer)
            let ours = Array(buffer.readableBytesView)
            #expect(ours.count == plan.size)
            #expect(ours == (try r.serializedBytes() as [UInt8]))
        }
    }

    @Test func otherResponsesAreLeftToSwiftProtobuf() throws {
        var error = KMSResponse()
        error.id = 3
        error.result = .error(Kmsd_V1_Error())
        #expect(HotResponseEncoder.plan(error) == nil)
        var unknown = KMSResponse()
        unknown.result = .encrypt(Kmsd_V1_EncryptResponse())
        try unknown.merge(serializedBytes: [0xa0, 0x06, 0x01] as [UInt8])  // field 100, varint 1
        #expect(!unknown.unknownFields.data.isEmpty)
        #expect(HotResponseEncoder.plan(unknown) == nil)
    }

    static func hexBytes(_ hex: String) -> [UInt8]? {
        var out: [UInt8] = []
        var chars = Array(hex.utf8)
        guard chars.count % 2 == 0 else { return nil }
        while !chars.isEmpty {
            guard let b = UInt8(String(decoding: chars.prefix(2), as: UTF8.self), radix: 16) else { return nil }
            out.append(b)
            chars.removeFirst(2)
        }
        return out
    }
}
