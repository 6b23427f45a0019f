import ArgumentParser
import Foundation
import KMSClient
import KMSProtocol

/// The JSON form of a replication identity: what get-replication-identity --json prints and
/// pin-replication-identity --identity reads.
func identityJSON(_ i: Kmsd_V1_ReplicationIdentity) -> [String: Any] {
    ["Region": i.region, "AgreementPublicKey": i.agreementPublicKey.base64EncodedString(),
     "SigningPublicKey": i.signingPublicKey.base64EncodedString(), "Fingerprint": i.fingerprint]
}

struct GetReplicationIdentity: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get-replication-identity",
        abstract: "This kmsd's region and replication identity, and the identities pinned here (administrators).",
        discussion: "Other kmsd hosts pin this identity (its --json output) with pin-replication-identity, so that they accept the keys it replicates to them.")

    @OptionGroup var global: GlobalOptions

    func run() async throws {
        let r = try await global.withClient { try await $0.getReplicationIdentity() }
        if global.json {
            var object = identityJSON(r.identity)
            object["Pinned"] = r.pinned.map(identityJSON)
            try printJSON(object)
            return
        }
        printFields([("Region", r.identity.region), ("Fingerprint", r.identity.fingerprint),
                     ("AgreementPublicKey", r.identity.agreementPublicKey.base64EncodedString()),
                     ("SigningPublicKey", r.identity.signingPublicKey.base64EncodedString())])
        if !r.pinned.isEmpty {
            writeStdout("\n")
            printColumns(headers: ["PinnedRegion", "Fingerprint"], rows: r.pinned.map { [$0.region, $0.fingerprint] })
        }
    }
}

struct PinReplicationIdentity: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pin-replication-identity",
        abstract: "Trust another kmsd's replication identity for its region (administrators).",
        discussion: """
        --identity is the other host's `kmsctl get-replication-identity --json` output (file://PATH, \
        - for standard input, or the JSON itself). Its fingerprint is checked against its keys, and \
        --region must be the region it names. A later pin of the same region replaces this one.
        """)

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("region"), help: ArgumentHelp("The region the identity must be for.", valueName: "name"))
    var region: String

    @Option(name: .customLong("identity"), help: ArgumentHelp("The identity: file://PATH, -, or JSON.", valueName: "json"))
    var identity: String

    func run() async throws {
        let text = try readTextArgument(identity, option: "--identity")
        guard let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any],
              let named = object["Region"] as? String,
              let agreement = (object["AgreementPublicKey"] as? String).flatMap({ Data(base64Encoded: $0) }),
              let signing = (object["SigningPublicKey"] as? String).flatMap({ Data(base64Encoded: $0) }) else {
            throw ValidationError("--identity must be the JSON `kmsctl get-replication-identity --json` prints (Region, AgreementPublicKey, SigningPublicKey, Fingerprint)")
        }
        guard named == region else {
            throw ValidationError("--identity is the identity of region \(named), not of --region \(region)")
        }
        let given = Kmsd_V1_ReplicationIdentity.with {
            $0.region = named
            $0.agreementPublicKey = agreement
            $0.signingPublicKey = signing
            $0.fingerprint = object["Fingerprint"] as? String ?? ""
        }
        let r = try await global.withClient { try await $0.pinReplicationIdentity(given) }
        if global.json {
            var out = identityJSON(r.identity)
            out["Replaced"] = r.replaced
            try printJSON(out)
        } else {
            printFields([("Region", r.identity.region), ("Fingerprint", r.identity.fingerprint), ("Replaced", r.replaced ? "yes" : "no")])
        }
    }
}
