import Foundation
import Glibc
@testable import KMSCrypto
import Testing

/// The per-thread pool behind `SecureRandom.fillPublic` (salts and nonces): every byte is
/// handed out once, across refills and threads, and a forked child never repeats its parent.
struct SecureRandomTests {
    static func draw(_ n: Int = 44) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        try out.withUnsafeMutableBytes { try SecureRandom.fillPublic($0) }
        return out
    }

    @Test func drawsNeverRepeatAcrossRefillsAndThreads() throws {
        // 4 threads × 2,000 draws of 44 bytes: each thread's pool refills about 20 times.
        let lock = NSLock()
        nonisolated(unsafe) var all: [[UInt8]] = []
        nonisolated(unsafe) var failures = 0
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            var mine: [[UInt8]] = []
            for _ in 0..<2_000 {
                guard let d = try? Self.draw() else { lock.withLock { failures += 1 }; return }
                mine.append(d)
            }
            lock.withLock { all += mine }
        }
        #expect(failures == 0)
        #expect(all.count == 8_000)
        #expect(Set(all).count == all.count)
        // Not all zero, and bytes spread as random bytes do (each value about 1/256 of them).
        let bytes = all.joined()
        var counts = [Int](repeating: 0, count: 256)
        for b in bytes { counts[Int(b)] += 1 }
        let expected = Double(bytes.count) / 256
        #expect(counts.allSatisfy { Double($0) > expected * 0.7 && Double($0) < expected * 1.3 })
    }

    @Test func largeRequestsAndSizesAcrossTheRefillEdge() throws {
        for n in [1, 12, 32, 44, 255, 256, 257, 4096, 10_000] {
            let a = try Self.draw(n), b = try Self.draw(n)
            #expect(a.count == n && a != b)
        }
    }

    @Test func aForkedChildDoesNotRepeatItsParentsBytes() throws {
        _ = try Self.draw()  // the pool is filled before the fork
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        let pid = fork()
        if pid == 0 {
            // The child: only C calls until _exit.
            var out = [UInt8](repeating: 0, count: 44)
            let ok = out.withUnsafeMutableBytes { (try? SecureRandom.fillPublic($0)) != nil }
            if ok { _ = out.withUnsafeBytes { write(fds[1], $0.baseAddress, 44) } }
            _exit(ok ? 0 : 1)
        }
        #expect(pid > 0)
        close(fds[1])
        let parentNext = try Self.draw()
        var child = [UInt8](repeating: 0, count: 44)
        let n = child.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, 44) }
        close(fds[0])
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        #expect(n == 44)
        #expect(child != parentNext, "the child drew the same bytes from the pool it inherited")
    }
}
