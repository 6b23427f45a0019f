import Foundation
import KMSClient
import Testing

/// Rules of PROTOCOL.md that a client written from the text alone relies on, checked with
/// frames built by hand (as such a client would build them).
@Suite(.serialized)
final class ProtocolRulesTests {
    let daemon: Daemon

    init() throws { daemon = try Daemon() }
    deinit { daemon.stop() }

    // Minimal protobuf encoding, independent of SwiftProtobuf.
    static func varint(_ v: Int) -> [UInt8] {
        var v = UInt64(v), out: [UInt8] = []
        repeat {
            let b = UInt8(v & 0x7f)
            v >>= 7
            out.append(v == 0 ? b : b | 0x80)
        } while v != 0
        return out
    }
    static func field(_ n: Int, _ bytes: [UInt8]) -> [UInt8] { varint(n << 3 | 2) + varint(bytes.count) + bytes }
    static func field(_ n: Int, _ text: String) -> [UInt8] { field(n, Array(text.utf8)) }
    static func entry(_ key: String, _ value: String) -> [UInt8] { field(1, key) + field(2, value) }
    static func request(id: Int, operation: Int, _ body: [UInt8]) -> [UInt8] {
        RawConnection.frame([0x08] + varint(id) + field(operation, body))
    }

    static let nfc = "caf\u{e9}"         // é as one code point
    static let nfd = "cafe\u{301}"       // e + combining acute: equal as Swift Strings, not as bytes

    @Test func helloAnswersTheHighestVersionBothSpeak() throws {
        let raw = try RawConnection(path: daemon.socket)
        for (asked, answered) in [(0, 1), (1, 1), (7, 1)] {
            // Hello{protocol_version = asked}
            raw.send(Self.request(id: 1 + asked, operation: 10, asked == 0 ? [] : [0x08] + Self.varint(asked)))
            let r = try #require(try raw.receive())
            guard case .hello(let hello)? = r.result else { Issue.record("no Hello answer for \(asked): \(r)"); continue }
            #expect(hello.protocolVersion == UInt32(answered), "asked \(asked)")
            #expect(hello.serverVersion == "0.1.0", "MAJOR.MINOR.PATCH, as §5 shows")
        }
    }

    @Test func createKeyChecksSpecBeforeUsage() async throws {
        let client = daemon.client()
        // An unknown spec or usage is invalid; a known spec not built yet is unsupported; a
        // usage that SYMMETRIC_DEFAULT cannot have is invalid.
        await expectKMSError(.validation) { try await client.createKey(keySpec: "AES_999") }
        await expectKMSError(.validation) { try await client.createKey(keyUsage: "SHRED") }
        await expectKMSError(.unsupportedOperation) { try await client.createKey(keySpec: "HMAC_256", keyUsage: "GENERATE_VERIFY_MAC") }
        for usage in ["SIGN_VERIFY", "GENERATE_VERIFY_MAC", "KEY_AGREEMENT"] {
            await expectKMSError(.validation) { try await client.createKey(keyUsage: usage) }
            await expectKMSError(.validation) { try await client.createKey(keySpec: "SYMMETRIC_DEFAULT", keyUsage: usage) }
        }
    }

    @Test func aContextKeyGivenTwiceIsRefusedWithTheRequestsID() async throws {
        let key = try await daemon.client().createKey()
        let raw = try RawConnection(path: daemon.socket)
        let body = Self.field(1, key.keyID) + Self.field(2, "secret") + Self.field(3, Self.entry("tenant", "a")) + Self.field(3, Self.entry("tenant", "b"))
        raw.send(Self.request(id: 41, operation: 30, body))
        let r = try #require(try raw.receive())
        #expect(r.id == 41 && r.kmsError?.code == .validation, "\(r)")
        #expect(r.kmsError?.message.contains("given twice") == true)
    }

    @Test func contextKeysDifferingOnlyInNormalisationAreTwoKeys() async throws {
        let key = try await daemon.client().createKey()
        let raw = try RawConnection(path: daemon.socket)
        let both = Self.field(3, Self.entry(Self.nfc, "1")) + Self.field(3, Self.entry(Self.nfd, "2"))
        raw.send(Self.request(id: 1, operation: 30, Self.field(1, key.keyID) + Self.field(2, "secret") + both))
        let encrypted = try #require(try raw.receive())
        guard case .encrypt(let e)? = encrypted.result else { Issue.record("\(encrypted)"); return }
        let blob = [UInt8](e.ciphertextBlob)
        // Decrypt: context field 2. Both pairs open it; either one alone does not.
        let decryptBoth = Self.field(1, blob) + Self.field(2, Self.entry(Self.nfc, "1")) + Self.field(2, Self.entry(Self.nfd, "2"))
        raw.send(Self.request(id: 2, operation: 31, decryptBoth))
        let opened = try #require(try raw.receive())
        guard case .decrypt(let d)? = opened.result else { Issue.record("\(opened)"); return }
        #expect(Array(d.plaintext) == Array("secret".utf8))
        for (id, only) in [(3, Self.entry(Self.nfc, "1")), (4, Self.entry(Self.nfd, "2"))] {
            raw.send(Self.request(id: id, operation: 31, Self.field(1, blob) + Self.field(2, only)))
            #expect(try raw.receive()?.kmsError?.code == .invalidCiphertext)
        }
    }

    @Test func repeatedOperationFieldsMergeAndTheLastOperationWins() async throws {
        let key = try await daemon.client().createKey()
        let raw = try RawConnection(path: daemon.socket)
        // Encrypt sent in two pieces (merged: key id and plaintext from one, a context pair from
        // each), after a Hello that the later operation replaces.
        let frame = RawConnection.frame([0x08, 0x05] + Self.field(10, []) +
                                         Self.field(30, Self.field(1, key.keyID) + Self.field(3, Self.entry("a", "1"))) +
                                         Self.field(30, Self.field(2, "secret") + Self.field(3, Self.entry("b", "2"))))
        raw.send(frame)
        let r = try #require(try raw.receive())
        guard case .encrypt(let e)? = r.result else { Issue.record("\(r)"); return }
        let back = try await daemon.client().decrypt(ciphertextBlob: Array(e.ciphertextBlob), context: ["a": "1", "b": "2"])
        #expect(Array(back.plaintext) == Array("secret".utf8))
    }

    /// An unknown group field (wire types 3/4, which protobuf parsers skip) must not make the
    /// context scan give up: the context is bound, not silently dropped.
    @Test func anUnknownGroupDoesNotLoseTheContext() async throws {
        let key = try await daemon.client().createKey()
        let raw = try RawConnection(path: daemon.socket)
        let group = Self.varint(99 << 3 | 3) + [0x08, 0x01] + Self.varint(99 << 3 | 4)
        let body = Self.field(1, key.keyID) + Self.field(2, "secret") + Self.field(3, Self.entry("tenant", "a"))
        raw.send(RawConnection.frame([0x08, 0x07] + group + Self.field(30, body)))
        let r = try #require(try raw.receive())
        guard case .encrypt(let e)? = r.result else { Issue.record("\(r)"); return }
        let client = daemon.client()
        await expectKMSError(.invalidCiphertext) { try await client.decrypt(ciphertextBlob: Array(e.ciphertextBlob)) }
        let back = try await client.decrypt(ciphertextBlob: Array(e.ciphertextBlob), context: ["tenant": "a"])
        #expect(Array(back.plaintext) == Array("secret".utf8))
    }

    /// A map entry whose key is not length-delimited is read differently by parsers: refused.
    @Test func aContextEntryParsersCouldReadDifferentlyIsRefused() async throws {
        let key = try await daemon.client().createKey()
        let raw = try RawConnection(path: daemon.socket)
        let oddEntry: [UInt8] = [0x08, 0x05] + Self.field(2, "v")  // key as a varint
        raw.send(Self.request(id: 8, operation: 30, Self.field(1, key.keyID) + Self.field(2, "secret") + Self.field(3, oddEntry)))
        let r = try #require(try raw.receive())
        #expect(r.kmsError?.code == .validation, "\(r)")
    }
}
