import Foundation
import KMSClient
import KMSCrypto
import Testing

/// KMSClient's data-key cache against a real kmsd: the number of GenerateDataKey and Decrypt
/// requests kmsd counts (its Status answer) shows each limit (messages, bytes, age, capacity,
/// context partition) holding; every message still decrypts, with or without the cache.
@Suite(.serialized)
final class DataKeyCacheTests {
    let daemon: Daemon
    init() throws { daemon = try Daemon() }
    deinit { daemon.stop() }

    /// Allowed requests of `action` kmsd has counted so far.
    func served(_ action: String) async throws -> UInt64 {
        try await daemon.client().status().requests.filter { $0.action == action && $0.result == "Allowed" }.reduce(0) { $0 + $1.count }
    }

    func message(_ i: Int, size: Int = 100) -> [UInt8] { (0..<size).map { UInt8(truncatingIfNeeded: $0 &+ i &* 17) } }

    @Test func aDataKeyServesAtMostMaxMessagesPerContext() async throws {
        let client = daemon.client()
        let key = try await client.createKey().keyID
        let cache = try DataKeyCache(limits: .init(maxMessages: 5, maxBytes: 1 << 20, maxAge: .seconds(600), capacity: 10))
        let before = try await served("GenerateDataKey")
        var sealed: [[UInt8]] = []
        for i in 0..<10 { sealed.append(try await client.encryptMessage(keyID: key, plaintext: message(i), context: ["tenant": "a"], cache: cache)) }
        // 10 messages, 5 per data key: exactly 2 data keys (4 per key would make 3, 6 would make 2 only with 12).
        #expect(try await served("GenerateDataKey") - before == 2)
        for i in 10..<12 { sealed.append(try await client.encryptMessage(keyID: key, plaintext: message(i), context: ["tenant": "a"], cache: cache)) }
        #expect(try await served("GenerateDataKey") - before == 3)
        // Another context is another partition: its own data key.
        for i in 0..<2 { sealed.append(try await client.encryptMessage(keyID: key, plaintext: message(100 + i), context: ["tenant": "b"], cache: cache)) }
        #expect(try await served("GenerateDataKey") - before == 4)
        #expect(cache.statistics.encryptHits == 14 - 4 && cache.statistics.encryptMisses == 4)
        // Same data key, different message ids: no two messages share bytes beyond the header's key.
        #expect(Set(sealed).count == sealed.count)

        // Decrypting: one Decrypt per distinct data key with the cache, one per message without.
        let decryptsBefore = try await served("Decrypt")
        let decryptCache = try DataKeyCache(limits: .init(maxAge: .seconds(600)))
        for (i, m) in sealed.enumerated() {
            let expected = i < 12 ? message(i) : message(100 + i - 12)
            #expect(try await client.decryptMessage(m, cache: decryptCache) == expected)
        }
        #expect(try await served("Decrypt") - decryptsBefore == 4)
        for m in sealed.prefix(3) { _ = try await client.decryptMessage(m) }
        #expect(try await served("Decrypt") - decryptsBefore == 7)
        // A cached data key is not reused under another expected context or key restriction.
        await #expect(throws: EnvelopeError.self) { try await client.decryptMessage(sealed[0], expectedContext: ["tenant": "b"], cache: decryptCache) }
        let other = try await client.createKey().keyID
        await expectKMSError(.incorrectKey) { try await client.decryptMessage(sealed[0], keyID: other, cache: decryptCache) }
    }

    @Test func byteAndAgeLimitsRetireADataKey() async throws {
        let client = daemon.client()
        let key = try await client.createKey().keyID
        let bytes = try DataKeyCache(limits: .init(maxMessages: 100, maxBytes: 1000, maxAge: .seconds(600), capacity: 10))
        let before = try await served("GenerateDataKey")
        // 400-byte messages under a 1000-byte limit: two per data key.
        for i in 0..<6 { _ = try await client.encryptMessage(keyID: key, plaintext: message(i, size: 400), cache: bytes) }
        #expect(try await served("GenerateDataKey") - before == 3)
        // The limit is inclusive: two 500-byte messages fill one data key exactly.
        for i in 0..<4 { _ = try await client.encryptMessage(keyID: key, plaintext: message(i, size: 500), cache: bytes) }
        #expect(try await served("GenerateDataKey") - before == 5)
        // A message as large as the limit is never cached: each gets its own data key.
        for i in 0..<2 { _ = try await client.encryptMessage(keyID: key, plaintext: message(i, size: 1000), cache: bytes) }
        #expect(try await served("GenerateDataKey") - before == 7)

        let aged = try DataKeyCache(limits: .init(maxMessages: 100, maxBytes: 1 << 20, maxAge: .milliseconds(300), capacity: 10))
        let beforeAge = try await served("GenerateDataKey")
        _ = try await client.encryptMessage(keyID: key, plaintext: message(1), cache: aged)
        _ = try await client.encryptMessage(keyID: key, plaintext: message(2), cache: aged)
        #expect(try await served("GenerateDataKey") - beforeAge == 1)
        _ = try await client.encryptMessage(keyID: key, plaintext: message(2), context: ["other": "slot"], cache: aged)
        #expect(aged.statistics.entries == 2)
        try await Task.sleep(for: .milliseconds(400))
        _ = try await client.encryptMessage(keyID: key, plaintext: message(3), cache: aged)
        #expect(try await served("GenerateDataKey") - beforeAge == 3, "an expired data key was reused")
        // Expired entries of other slots were swept out by that call: only the fresh one is left.
        #expect(aged.statistics.entries == 1)
    }

    @Test func theCacheIsBoundedAndItsKeysAreLocked() async throws {
        let client = daemon.client()
        let key = try await client.createKey().keyID
        let cache = try DataKeyCache(limits: .init(maxMessages: 100, maxBytes: 1 << 20, maxAge: .seconds(600), capacity: 3))
        let base = SecureArena.shared.inUseBytes
        _ = try await client.encryptMessage(keyID: key, plaintext: message(0), context: ["tenant": "0"], cache: cache)
        let perEntry = SecureArena.shared.inUseBytes - base
        #expect(perEntry >= 32, "one entry's data key is in the arena: \(perEntry)")
        for tenant in 1..<10 { _ = try await client.encryptMessage(keyID: key, plaintext: message(tenant), context: ["tenant": "\(tenant)"], cache: cache) }
        #expect(cache.statistics.entries == 3)
        // The least recently used went: tenant 9 is cached, tenant 0 is not.
        let before = try await served("GenerateDataKey")
        _ = try await client.encryptMessage(keyID: key, plaintext: message(9), context: ["tenant": "9"], cache: cache)
        #expect(try await served("GenerateDataKey") == before)
        _ = try await client.encryptMessage(keyID: key, plaintext: message(0), context: ["tenant": "0"], cache: cache)
        #expect(try await served("GenerateDataKey") == before + 1)
        // The cached data keys live in the locked arena (SecureBytes): the three entries hold at
        // least their 32-byte keys there (and the seven evicted ones were given back), none fell
        // back to unlocked memory, and emptying the cache gives the rest back (the arena zeroes
        // a slot when it is released).
        let held = SecureArena.shared.inUseBytes - base
        // (Bounds, not equalities: a buffer of an earlier request may still be released by
        // another thread in between.)
        #expect(held >= 3 * 32 && held <= 3 * perEntry, "arena bytes held by the cache: \(held), \(perEntry) per entry")
        #expect(SecureArena.shared.lockedBytes > 0 && SecureArena.shared.unlockedBytes == 0)
        cache.removeAll()
        #expect(cache.statistics.entries == 0)
        #expect(SecureArena.shared.inUseBytes <= base, "the cache's locked memory was released")
        // Limits are checked.
        #expect(throws: KMSError.self) { try DataKeyCache(limits: .init(maxMessages: 0)) }
        #expect(throws: KMSError.self) { try DataKeyCache(limits: .init(capacity: 0)) }
    }
}
