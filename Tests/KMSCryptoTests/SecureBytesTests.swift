import Foundation
@testable import KMSCrypto
import Testing

/// Secret bytes live in locked, dont-dump memory, are zeroed on release, and never print.
struct SecureBytesTests {
    @Test func slotIsZeroedWhenReleased() throws {
        var address: UnsafeMutableRawPointer?
        do {
            let s = try SecureBytes(zeroedCount: 32)
            s.withUnsafeMutableBytes { b in for i in b.indices { b[i] = 0xA5 } }
            address = s.withUnsafeBytes { UnsafeMutableRawPointer(mutating: $0.baseAddress) }
            #expect(s.withUnsafeBytes { $0.allSatisfy { $0 == 0xA5 } })
        }
        // The slot stays mapped in the arena after release, so it can be inspected.
        let after = UnsafeRawBufferPointer(start: address, count: 32)
        #expect(after.allSatisfy { $0 == 0 })
    }

    @Test func memoryIsLockedAndExcludedFromDumps() throws {
        let s = try SecureBytes.random(count: 32)
        #expect(SecureArena.shared.lockedBytes > 0)
        let addr = UInt(bitPattern: s.withUnsafeBytes { $0.baseAddress })
        let smaps = String(decoding: try #require(FileHandle(forReadingAtPath: "/proc/self/smaps")).readDataToEndOfFile(), as: UTF8.self)
        var flags: String?
        var inRegion = false
        for line in smaps.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if let range = parts.first, range.contains("-"), parts.count >= 5, !line.hasPrefix("VmFlags") {
                let bounds = range.split(separator: "-").compactMap { UInt($0, radix: 16) }
                inRegion = bounds.count == 2 && bounds[0] <= addr && addr < bounds[1]
            } else if inRegion, line.hasPrefix("VmFlags:") {
                flags = String(line)
            }
        }
        let f = try #require(flags, "the secret's mapping must appear in smaps")
        #expect(f.contains(" lo"), "locked (mlock): \(f)")
        #expect(f.contains(" dd"), "MADV_DONTDUMP: \(f)")
        #expect(f.contains(" wf"), "MADV_WIPEONFORK: \(f)")
    }

    @Test func descriptionRevealsNothing() throws {
        let s = try SecureBytes.random(count: 16)
        let hex = s.withUnsafeBytes { $0.map { String(format: "%02x", $0) }.joined() }
        for text in [String(describing: s), String(reflecting: s), "\(s)", String(describing: Mirror(reflecting: s).children.map(\.value))] {
            #expect(!text.contains(hex))
            #expect(!text.lowercased().contains(hex.prefix(8)))
        }
        #expect(String(describing: s).contains("redacted"))
    }

    @Test(arguments: [([1, 2, 3], [1, 2, 3], true), ([1, 2, 3], [1, 2, 4], false), ([1, 2], [1, 2, 3], false), ([], [], true)] as [([UInt8], [UInt8], Bool)])
    func constantTimeEquality(_ a: [UInt8], _ b: [UInt8], _ equal: Bool) throws {
        var ca = a, cb = b
        let sa = try SecureBytes(consuming: &ca), sb = try SecureBytes(consuming: &cb)
        #expect(sa.constantTimeEquals(sb) == equal)
        #expect(ca.isEmpty && cb.isEmpty)
    }

    @Test func randomBytesDiffer() throws {
        let a = try SecureBytes.random(count: 32), b = try SecureBytes.random(count: 32)
        #expect(!a.constantTimeEquals(b))
    }

    @Test func largeAllocationsAreLockedToo() throws {
        let before = SecureArena.shared.lockedBytes
        let big = try SecureBytes(zeroedCount: 10_000)
        #expect(SecureArena.shared.lockedBytes >= before + 10_000)
        #expect(big.count == 10_000)
    }
}
