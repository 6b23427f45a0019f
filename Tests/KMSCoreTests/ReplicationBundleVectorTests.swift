import Foundation
@testable import KMSCore
import KMSCrypto
import KMSProtocol
import Testing

/// Protocol/vectors/replication.json: a bundle the independent Python reference made (east to
/// west) opens here with west's identity and east pinned, to the reference's key material;
/// altered, misaddressed or unpinned, it does not.
struct ReplicationBundleVectorTests {
    struct Vector: Decodable {
        struct Version: Decodable { let version: UInt32; let material_hex: String }
        let key_id, source_region, source_signing_public_key_hex, source_agreement_public_key_hex: String
        let target_region, target_agreement_private_key_hex, signed_bundle_hex: String
        let sequence: UInt64
        let versions: [Version]
    }

    static let vector: Vector = {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Protocol/vectors/replication.json")
        struct File: Decodable { let bundle: Vector }
        return try! JSONDecoder().decode(File.self, from: Data(contentsOf: url)).bundle
    }()

    static func west() throws -> ReplicationIdentity {
        var agreement = vector.target_agreement_private_key_hex.hexBytes
        return try ReplicationIdentity(region: vector.target_region, agreementKey: SecureBytes(consuming: &agreement),
                                       signingKey: Ed25519.generate().privateKey)
    }

    static var east: ReplicationPeer {
        ReplicationPeer(region: vector.source_region, agreementPublicKey: vector.source_agreement_public_key_hex.hexBytes,
                        signingPublicKey: vector.source_signing_public_key_hex.hexBytes)
    }

    @Test func theReferenceBundleOpensToItsMaterial() throws {
        let v = Self.vector
        let (bundle, keyID, materials) = try KeyService.openBundle(v.signed_bundle_hex.hexBytes, identity: Self.west(), region: v.target_region, pinned: [Self.east])
        #expect(keyID.description == v.key_id && keyID.isMultiRegion)
        #expect(bundle.sequence == v.sequence && bundle.sourceRegion == v.source_region)
        #expect(materials.map { $0.unsafeCopyToArray() } == v.versions.map { $0.material_hex.hexBytes })
    }

    @Test func alteredMisaddressedOrUnpinnedItIsRefused() throws {
        let v = Self.vector, good = v.signed_bundle_hex.hexBytes, west = try Self.west()
        for at in [5, good.count / 3, good.count / 2, good.count - 1] {
            var bad = good
            bad[at] ^= 0x01
            #expect(throws: KMSError.self, "a bit flipped at \(at)") { _ = try KeyService.openBundle(bad, identity: west, region: v.target_region, pinned: [Self.east]) }
        }
        #expect(throws: KMSError.self) { _ = try KeyService.openBundle(Array(good.dropLast(3)), identity: west, region: v.target_region, pinned: [Self.east]) }
        do {
            _ = try KeyService.openBundle(good, identity: west, region: "north", pinned: [Self.east])
            Issue.record("opened in another region")
        } catch { #expect(error.code == .validation && error.message.contains("addressed")) }
        do {
            _ = try KeyService.openBundle(good, identity: west, region: v.target_region, pinned: [])
            Issue.record("opened without a pin")
        } catch { #expect(error.code == .accessDenied) }
        var otherPin = Self.east
        otherPin.signingPublicKey = try Ed25519.generate().publicKey
        #expect(throws: KMSError.self) { _ = try KeyService.openBundle(good, identity: west, region: v.target_region, pinned: [otherPin]) }
    }
}
