import Foundation
import KMSCrypto
import KMSProtocol

/// A kmsd's public replication identity (PROTOCOL.md §15.1): its region, an X25519 key that
/// replication bundles are wrapped to, and an Ed25519 key its bundles are signed with.
public struct ReplicationPeer: Codable, Sendable, Equatable {
    public var region: String
    public var agreementPublicKey: [UInt8]
    public var signingPublicKey: [UInt8]

    public init(region: String, agreementPublicKey: [UInt8], signingPublicKey: [UInt8]) {
        self.region = region
        self.agreementPublicKey = agreementPublicKey
        self.signingPublicKey = signingPublicKey
    }

    static let fingerprintKey = Array("kmsd/v1/replication-identity".utf8)

    /// 32 hex digits: the first 16 bytes of HMAC-SHA256(key "kmsd/v1/replication-identity",
    /// lp(region) ‖ agreement public key ‖ signing public key), lp = 4-byte big-endian length.
    public var fingerprint: String {
        var data: [UInt8] = []
        data.appendLengthPrefixed(Array(region.utf8))
        data += agreementPublicKey + signingPublicKey
        let mac = (try? Self.fingerprintKey.withUnsafeBytes { k in try data.withUnsafeBytes { try HMAC.authenticate(key: k, data: $0) } }) ?? []
        return Hex.encode(Array(mac.prefix(16)))
    }
}

/// This kmsd's replication identity with its private keys (locked memory). Created at the
/// keystore's first start with this code, kept in the keystore wrapped under the keystore key.
public final class ReplicationIdentity: Sendable {
    public let peer: ReplicationPeer
    let agreementKey: SecureBytes
    let signingKey: SecureBytes

    init(region: String, agreementKey: SecureBytes, signingKey: SecureBytes) throws {
        self.agreementKey = agreementKey
        self.signingKey = signingKey
        peer = ReplicationPeer(region: region, agreementPublicKey: try X25519.publicKey(of: agreementKey),
                               signingPublicKey: try Ed25519.publicKey(of: signingKey))
    }

    public var region: String { peer.region }
    public var fingerprint: String { peer.fingerprint }
}

extension KeyRepository {
    static let identityAAD = Array("kmsd/v1/replication-identity".utf8)
    static let peersLabel = Array("kmsd/v1/replication-peers".utf8)

    /// This keystore's replication identity for `region`: loaded, or made and stored on first use.
    public func replicationIdentity(region: String) throws -> ReplicationIdentity {
        if let stored = try storage.meta("replication_identity") {
            guard stored.count > AESGCM.nonceBytes + AESGCM.tagBytes else { throw Self.identityTampered }
            let keys: SecureBytes
            do {
                keys = try AESGCM.open(key: root.wrappingKey, nonce: Array(stored[0..<AESGCM.nonceBytes]),
                                       sealed: Array(stored[AESGCM.nonceBytes...]), aad: Self.identityAAD)
            } catch { throw Self.identityTampered }
            guard keys.count == 64 else { throw Self.identityTampered }
            let (agreement, signing) = try keys.withUnsafeBytes { b in
                (try SecureBytes(copying: UnsafeRawBufferPointer(rebasing: b[0..<32])), try SecureBytes(copying: UnsafeRawBufferPointer(rebasing: b[32..<64])))
            }
            return try ReplicationIdentity(region: region, agreementKey: agreement, signingKey: signing)
        }
        let agreement = try X25519.generate().privateKey, signing = try Ed25519.generate().privateKey
        let both = try SecureBytes(zeroedCount: 64)
        both.withUnsafeMutableBytes { out in
            agreement.withUnsafeBytes { out.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: 32) }
            signing.withUnsafeBytes { (out.baseAddress! + 32).copyMemory(from: $0.baseAddress!, byteCount: 32) }
        }
        let nonce = try SecureRandom.bytes(AESGCM.nonceBytes)
        let sealed = try both.withUnsafeBytes { try AESGCM.seal(key: root.wrappingKey, nonce: nonce, plaintext: $0, aad: Self.identityAAD) }
        try storage.setMeta("replication_identity", nonce + sealed)
        return try ReplicationIdentity(region: region, agreementKey: agreement, signingKey: signing)
    }

    static let identityTampered = KMSError(.keyUnavailable, "the keystore's replication identity does not unwrap under its keystore key: it was modified outside kmsd")

    /// The identities pinned here, by region (authenticated under the keystore key).
    public func replicationPeers() throws(KMSError) -> [ReplicationPeer] {
        let stored: [UInt8]?
        do { stored = try storage.meta("replication_peers") } catch { throw KMSError(.internalError, "the keystore could not be read: \(error)") }
        guard let stored else { return [] }
        guard stored.count >= 32, let mac = try? peersMAC(Array(stored[32...])), ConstantTime.equals(mac, Array(stored[0..<32])),
              let peers = try? JSONDecoder().decode([ReplicationPeer].self, from: Data(stored[32...])) else {
            throw KMSError(.keyUnavailable, "the keystore's pinned replication identities fail their integrity check: they were modified outside kmsd; pin them again")
        }
        return peers
    }

    /// Pins `peer` for its region (replacing an earlier pin of that region); durable on return.
    /// Returns the identity it replaced.
    @discardableResult
    public func pin(_ peer: ReplicationPeer) throws -> ReplicationPeer? {
        var peers = try replicationPeers()
        let replaced = peers.first { $0.region == peer.region }
        peers.removeAll { $0.region == peer.region }
        peers.append(peer)
        try store(peers)
        return replaced
    }

    /// Takes back the pin of `region`, putting `restoring` (the pin it replaced) back if any.
    public func unpin(region: String, restoring: ReplicationPeer?) throws {
        var peers = try replicationPeers().filter { $0.region != region }
        if let restoring { peers.append(restoring) }
        try store(peers)
    }

    /// Stores the pinned identities in region order, authenticated under the record MAC key.
    private func store(_ peers: [ReplicationPeer]) throws {
        let json = Array(try JSONEncoder().encode(peers.sorted { $0.region < $1.region }))
        try storage.setMeta("replication_peers", try peersMAC(json) + json)
    }

    private func peersMAC(_ json: [UInt8]) throws -> [UInt8] {
        try HMAC.authenticate(key: root.recordMACKey, data: Self.peersLabel + json)
    }
}
