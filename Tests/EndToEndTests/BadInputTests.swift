import Foundation
import Synchronization
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

    /// Runs `body` while a second client keeps encrypting and decrypting on its own connection,
    /// and checks every one of its requests succeeded: it was served before, during and after.
    func whileBystanderRuns(_ body: () async throws -> Void) async throws {
        let client = bystander, key = keyID
        let counts = Counts()
        let worker = Task {
            while !Task.isCancelled {
                do {
                    let n = counts.ok.load(ordering: .relaxed)
                    let blob = try await client.encrypt(keyID: key, plaintext: [UInt8]("\(n)".utf8)).ciphertextBlob
                    let back = try await client.decrypt(ciphertextBlob: Array(blob)).plaintext
                    if back == Data("\(n)".utf8) { counts.ok.add(1, ordering: .relaxed) } else { counts.failed.add(1, ordering: .relaxed) }
                } catch {
                    counts.failed.add(1, ordering: .relaxed)
                }
            }
        }
        func waitFor(_ target: Int) async throws {
            let deadline = Date().addingTimeInterval(10)
            while counts.ok.load(ordering: .relaxed) < target, Date() < deadline { try await Task.sleep(for: .milliseconds(5)) }
        }
        try await waitFor(1)
        try await body()
        try await waitFor(counts.ok.load(ordering: .relaxed) + 5)
        worker.cancel()
        _ = await worker.value
        #expect(counts.failed.load(ordering: .relaxed) == 0, "the bystander saw failures")
        #expect(counts.ok.load(ordering: .relaxed) >= 6, "the bystander kept being served")
    }

    @Test func hugeLengthPrefixGetsAnErrorAndTheConnectionIsClosed() async throws {
        try await whileBystanderRuns {
            let raw = try RawConnection(path: daemon.socket)
            raw.send([0xFF, 0xFF, 0xFF, 0xFF])
            let response = try #require(try raw.receive())
            #expect(response.id == 0)
            #expect(response.kmsError?.code == .validation)
            #expect(response.kmsError?.message.contains("4294967295") == true)
            #expect(raw.isClosedByPeer())
            // Nothing was buffered for it: the daemon's resident memory did not grow by gigabytes.
            let status = try String(contentsOfFile: "/proc/\(daemon.pid)/status", encoding: .utf8)
            let rss = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }.flatMap { $0.split(separator: " ").dropFirst().first }.flatMap { Int($0) } ?? 0
            #expect(rss > 0 && rss < 200_000, "VmRSS \(rss) kB")
        }
    }

    @Test func oversizedAndEmptyFramesAreRefused() async throws {
        try await whileBystanderRuns {
            for length: UInt32 in [65537, 0] {
                let raw = try RawConnection(path: daemon.socket)
                raw.send([UInt8(length >> 24), UInt8((length >> 16) & 0xff), UInt8((length >> 8) & 0xff), UInt8(length & 0xff)])
                #expect(try raw.receive()?.kmsError?.code == .validation)
                #expect(raw.isClosedByPeer())
            }
        }
    }

    @Test func truncatedFrameIsDroppedQuietly() async throws {
        try await whileBystanderRuns {
            do {
                let raw = try RawConnection(path: daemon.socket)
                raw.send([0, 0, 0, 100] + [UInt8](repeating: 1, count: 10))
            }  // closed mid-frame
            #expect(daemon.process.isRunning)
        }
    }

    @Test func randomBytesGetAnErrorNotACrash() async throws {
        try await whileBystanderRuns {
            var refused = 0
            for seed in 0..<20 {
                let raw = try RawConnection(path: daemon.socket, receiveTimeoutSeconds: 1)
                var g = SystemRandomNumberGenerator()
                let junk = (0..<(64 + seed * 13)).map { _ in UInt8.random(in: 0...255, using: &g) }
                raw.send(junk)
                let announced = UInt32(junk[0]) << 24 | UInt32(junk[1]) << 16 | UInt32(junk[2]) << 8 | UInt32(junk[3])
                if announced == 0 || announced > 65536 {
                    // An impossible length: one error, then the connection is closed.
                    #expect(try raw.receive()?.kmsError?.code == .validation)
                    #expect(raw.isClosedByPeer())
                    refused += 1
                }
                // Otherwise the daemon waits for the rest of the announced frame (or answers a
                // frame that happened to be complete); either way it keeps running.
            }
            #expect(daemon.process.isRunning)
            #expect(refused > 0, "random lengths are almost always over the maximum")
        }
    }

    @Test func undecodableMessageInAValidFrameKeepsTheConnection() async throws {
        try await whileBystanderRuns {
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
        }
    }

    @Test func unknownOperationGetsUnsupportedOperationAndTheConnectionStaysOpen() async throws {
        try await whileBystanderRuns {
            let raw = try RawConnection(path: daemon.socket)
            // Request{id: 9, field 999 (an operation from a future version): empty message}
            raw.send(RawConnection.frame([0x08, 0x09, 0xBA, 0x3E, 0x00]))
            let response = try #require(try raw.receive())
            #expect(response.id == 9)
            #expect(response.kmsError?.code == .unsupportedOperation)
            try raw.send(.with(id: 10, .hello(.init())))
            #expect(try raw.receive()?.id == 10)
        }
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

    @Test func aClientThatNeverReadsIsThrottledThenDisconnected() async throws {
        let quick = try Daemon(arguments: ["--idle-timeout", "2"])
        defer { quick.stop() }
        let bystander = quick.client()
        let key = try await bystander.createKey().keyID
        let rssBefore = try MemoryTests.statusValue(quick.pid, "VmRSS")
        let raw = try RawConnection(path: quick.socket)
        let frame = RawConnection.frame(try KMSRequest.with(id: 1, .generateRandom(.with { $0.numberOfBytes = 1024 })).serializedBytes())
        var sent = 0
        while sent < 300_000, raw.trySend(frame) { sent += 1 }
        // Each request asks for a 1 KiB answer; had the daemon kept reading, it would hold
        // hundreds of MiB of answers for a client that reads none.
        #expect(sent < 300_000, "the daemon must stop reading from a client that does not read")
        let rssAfter = try MemoryTests.statusValue(quick.pid, "VmRSS")
        #expect(rssAfter - rssBefore < 40_000, "VmRSS grew from \(rssBefore) to \(rssAfter) kB after \(sent) requests")
        let blob = try await bystander.encrypt(keyID: key, plaintext: [1]).ciphertextBlob
        #expect(try await bystander.decrypt(ciphertextBlob: Array(blob)).plaintext == Data([1]))
        // The stalled connection is closed after the idle timeout: reading drains the answers
        // already written, then meets EOF (not the 10 s receive timeout).
        try await Task.sleep(for: .seconds(3))
        let start = Date()
        var answers = 0
        while try raw.receive() != nil { answers += 1 }
        #expect(Date().timeIntervalSince(start) < 8)
        #expect(answers < sent)
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

/// What the bystander saw, shared with its task.
final class Counts: Sendable {
    let ok = Atomic<Int>(0)
    let failed = Atomic<Int>(0)
}
