import Foundation
import Glibc
import KMSClient
import Testing

/// kmsd out of file descriptors (issue 10, item 6): a connection it cannot accept is answered
/// with a connection-level LimitExceededException and audited, not left hanging in the listen
/// backlog; connections already open keep working; once descriptors are free again, new
/// connections are served. The shortage is made by lowering the running kmsd's RLIMIT_NOFILE
/// (prlimit on our own child: no root needed).
@Suite(.serialized)
struct DescriptorExhaustionTests {
    @Test func runningOutOfFileDescriptorsRefusesCleanlyAndRecovers() async throws {
        try Journal.ensureRunning()
        let daemon = try Daemon()
        defer { daemon.stop() }
        let client = daemon.client()
        let key = try await client.createKey(description: "fd exhaustion").keyID
        _ = try await client.encrypt(keyID: key, plaintext: [1])

        // The soft limit a few above the highest descriptor kmsd has open now: room for a few
        // more connections, then none.
        let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(daemon.pid)/fd").compactMap(Int.init)
        let soft = try #require(fds.max()) + 4
        let set = try run("/usr/bin/prlimit", ["--pid", "\(daemon.pid)", "--nofile=\(soft):"])
        try #require(set.status == 0, "prlimit: \(set.stderr)")

        var held: [RawConnection] = []
        var refusals: [String] = []
        var unanswered = 0
        for id in 1...64 where refusals.count < 3 {
            let c = try RawConnection(path: daemon.socket, receiveTimeoutSeconds: 5)
            try c.send(.with(id: UInt64(id), .hello(.init())))
            guard let answer = try c.receive() else { unanswered += 1; break }
            if answer.id == UInt64(id), answer.kmsError == nil {
                held.append(c)  // there was still a free descriptor
            } else {
                #expect(answer.id == 0 && answer.kmsError?.code == .limitExceeded, "\(answer)")
                refusals.append(answer.kmsError?.message ?? "")
                #expect(c.isClosedByPeer(), "a refused connection is closed")
            }
        }
        #expect(unanswered == 0, "a connection kmsd could not accept was left without an answer")
        #expect(!held.isEmpty && refusals.count == 3, "served \(held.count) new connections and refused \(refusals.count) of \(held.count + refusals.count)")
        #expect(refusals.allSatisfy { $0.contains("file descriptors") }, "\(refusals)")

        // Meanwhile the connection opened before keeps being served.
        let during = try await client.encrypt(keyID: key, plaintext: Array("while out of descriptors".utf8))
        #expect(Array(try await client.decrypt(ciphertextBlob: Array(during.ciphertextBlob)).plaintext) == Array("while out of descriptors".utf8))

        // Closing connections frees descriptors: new connections are served again.
        held.removeAll()
        var recovered = false
        let deadline = Date().addingTimeInterval(10)
        while !recovered, Date() < deadline {
            let c = try RawConnection(path: daemon.socket, receiveTimeoutSeconds: 5)
            try c.send(.with(id: 9, .hello(.init())))
            if let r = try c.receive(), r.id == 9, r.kmsError == nil { recovered = true } else { usleep(100_000) }
        }
        #expect(recovered, "no new connection was served within 10 s of descriptors being freed")
        #expect(daemon.process.isRunning)

        // Each refusal is audited as a refused connection.
        let records = try Journal.records(pid: daemon.pid, since: daemon.startedAt, atLeast: 1).filter {
            $0["KMS_ACTION"] as? String == "Connect" && $0["KMS_ERROR"] as? String == "LimitExceededException"
        }
        #expect(records.count >= refusals.count, "\(records.count) Connect records for \(refusals.count) refusals")
        #expect(records.allSatisfy { $0["KMS_PEER_UID"] as? String == "\(getuid())" })
        // Nothing but the kernel's credentials was resolved, and the record says so.
        #expect(records.allSatisfy { ($0["KMS_PEER_UNRESOLVED"] as? String ?? "").contains("executable and unit not resolved") })
    }
}
