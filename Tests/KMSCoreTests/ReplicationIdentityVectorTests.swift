import Foundation
@testable import KMSCore
import KMSProtocol
import Testing

/// The replication identities in Protocol/vectors/frames.json (keys and fingerprints from the
/// independent Python reference) have the fingerprints this implementation computes.
struct ReplicationIdentityVectorTests {
    @Test func fingerprintsMatchTheReference() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Protocol/vectors/frames.json")
        let raw = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any])
        let vectors = try #require(raw["vectors"] as? [[String: Any]])
        let frame = try #require(vectors.first { $0["name"] as? String == "get-replication-identity-response" }?["frame_hex"] as? String)
        let response = try KMSResponse(serializedBytes: Array(frame.hexBytes.dropFirst(4)))
        guard case .getReplicationIdentity(let r) = response.result else { Issue.record("not a GetReplicationIdentity answer"); return }
        let identities = [r.identity] + r.pinned
        #expect(identities.count == 2)
        for i in identities {
            let peer = ReplicationPeer(region: i.region, agreementPublicKey: Array(i.agreementPublicKey), signingPublicKey: Array(i.signingPublicKey))
            #expect(peer.fingerprint == i.fingerprint, "\(i.region)")
        }
        // The fingerprint covers the region and both keys.
        let i = r.identity
        let moved = ReplicationPeer(region: i.region + "x", agreementPublicKey: Array(i.agreementPublicKey), signingPublicKey: Array(i.signingPublicKey))
        #expect(moved.fingerprint != i.fingerprint)
    }
}
