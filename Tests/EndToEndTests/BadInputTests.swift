import Foundation
import KMSClient
import Testing

/// Hostile and broken input: each gets a clear error with a stable code, and a second client
/// keeps being served throughout.
@Suite(.serialized)
final class BadInputTests {
    let daemon: Daemon
    let bystander: KMSClient
    let keyID: String

    init() async throws {
        daemon = try Daemon(arguments: ["--max-frame-bytes", "65536"])
        bystander = daemon.client()
        keyID = try await bystander.createKey(description: "bystander").keyID
    }

    deinit { daemon.stop() }

    /// The well-behaved client still gets correct answers.
    func bystanderStillServed() async throws {
        let blob = try await bystander.encrypt(keyID: keyID, plaintext: [7, 7, 7]).ciphertextBlob
        #expect(try await bystander.decrypt(ciphertextBlob: Array(blob)).plaintext == Data([7, 7, 7]))
    }

    @Test func hugeLengthPrefixGetsAnErrorAndTheConnectionIsClosed() async throws {
        let raw = try RawConnection(path: daemon.socket)
        raw.send([0xFF, 0xFF, 0xFF, 0xFF])
        let response = try #require(try raw.receive())
        #expect(response.id == 0)
        #expect(response.kmsError?.code == .validation)
        #expect(response.kmsError?.message.contains("4294967295") == true)
        #expect(raw.isClosedByPeer())
        try await bystanderStillServed()
        // Nothing was buffered for it: the daemon's resident memory did not grow by gigabytes.
        let status = try String(contentsOfFile: "/proc/\(daemon.pid)/status", encoding: .utf8)
        let rss = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }.flatMap { $0.split(separator: " ").dropFirst().first }.flatMap { Int($0) } ?? 0
        #expect(rss > 0 && rss < 200_000, "VmRSS \(rss) kB")
    }

    @Test func oversizedAndEmptyFramesAreRefused() async throws {
        for length: UInt32 in [65537, 0] {
            let raw = try RawConnection(path: daemon.socket)
            raw.send([UInt8(length >> 24), UInt8((length >> 16) & 0xff), UInt8((length >> 8) & 0xff), UInt8(length & 0xff)])
            #expect(try raw.receive()?.kmsError?.code == .validation)
            #expect(raw.isClosedByPeer())
        }
        try await bystanderStillServed()
    }

    @Test func truncatedFrameIsDroppedQuietly() async throws {
        do {
            let raw = try RawConnection(path: daemon.socket)
            raw.send([0, 0, 0, 100] + [UInt8](repeating: 1, count: 10))
        }  // closed mid-frame
        try await bystanderStillServed()
    }

    @Test func randomBytesGetAnErrorNotACrash() async throws {
        for seed in 0..<20 {
            let raw = try RawConnection(path: daemon.socket)
            var g = SystemRandomNumberGenerator()
            let junk = (0..<(64 + seed * 13)).map { _ in UInt8.random(in: 0...255, using: &g) }
            raw.send(junk)
            // Whatever the junk announced, the daemon answers with an error or waits for more.
            if let r = try? raw.receive() { #expect(r.kmsError != nil) }
        }
        try await bystanderStillServed()
        #expect(daemon.process.isRunning)
    }

    @Test func undecodableMessageInAValidFrameKeepsTheConnection() async throws {
        let raw = try RawConnection(path: daemon.socket)
        raw.send(RawConnection.frame([0xFF, 0xFF, 0xFF, 0xFF, 0x0F]))
        let response = try #require(try raw.receive())
        #expect(response.id == 0 && response.kmsError?.code == .validation)
        // Same connection, next request works.
        try raw.send(.with(id: 5, .generateRandom(.with { $0.numberOfBytes = 8 })))
        let next = try #require(try raw.receive())
        #expect(next.id == 5)
        guard case .generateRandom(let g)? = next.result else { Issue.record("no result: \(next)"); return }
        #expect(g.plaintext.count == 8)
        try await bystanderStillServed()
    }

    @Test func unknownOperationGetsUnsupportedOperationAndTheConnectionStaysOpen() async throws {
        let raw = try RawConnection(path: daemon.socket)
        // Request{id: 9, field 999 (an operation from a future version): empty message}
        raw.send(RawConnection.frame([0x08, 0x09, 0xBA, 0x3E, 0x00]))
        let response = try #require(try raw.receive())
        #expect(response.id == 9)
        #expect(response.kmsError?.code == .unsupportedOperation)
        try raw.send(.with(id: 10, .hello(.init())))
        #expect(try raw.receive()?.id == 10)
        try await bystanderStillServed()
    }

    @Test func requestWithNoOperationIsUnsupported() async throws {
        let raw = try RawConnection(path: daemon.socket)
        try raw.send(.with(id: 3, .hello(.init())))
        #expect(try raw.receive()?.id == 3)
        var empty = KMSRequest()
        empty.id = 4
        try raw.send(empty)
        #expect(try raw.receive()?.kmsError?.code == .unsupportedOperation)
    }

    @Test func halfClosedClientStillGetsItsAnswers() async throws {
        let raw = try RawConnection(path: daemon.socket)
        for id in 1...20 { try raw.send(.with(id: UInt64(id), .generateRandom(.with { $0.numberOfBytes = 16 }))) }
        shutdown(raw.fd, Int32(SHUT_WR))
        var ids = Set<UInt64>()
        while let r = try raw.receive() { ids.insert(r.id) }
        #expect(ids == Set(1...20))
    }

    @Test func perUIDConnectionLimitRefusesTheExtraConnection() async throws {
        let limited = try Daemon(arguments: ["--max-connections-per-uid", "2"])
        defer { limited.stop() }
        let a = try RawConnection(path: limited.socket), b = try RawConnection(path: limited.socket)
        try a.send(.with(id: 1, .hello(.init())))
        try b.send(.with(id: 1, .hello(.init())))
        #expect(try a.receive()?.id == 1)
        #expect(try b.receive()?.id == 1)
        let c = try RawConnection(path: limited.socket)
        let refused = try #require(try c.receive())
        #expect(refused.kmsError?.code == .limitExceeded)
        #expect(c.isClosedByPeer())
        // The first two are still served.
        try a.send(.with(id: 2, .hello(.init())))
        #expect(try a.receive()?.id == 2)
    }

    @Test func idleConnectionsAreClosed() async throws {
        let quick = try Daemon(arguments: ["--idle-timeout", "1"])
        defer { quick.stop() }
        let raw = try RawConnection(path: quick.socket)
        try raw.send(.with(id: 1, .hello(.init())))
        #expect(try raw.receive()?.id == 1)
        let start = Date()
        #expect(raw.isClosedByPeer())
        #expect(Date().timeIntervalSince(start) < 5)
    }
}
