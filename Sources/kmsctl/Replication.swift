import ArgumentParser
import Foundation
import KMSClient
import KMSProtocol

#if canImport(Glibc)
import Glibc
#endif

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

/// The options of replicate-key and sync-replica.
struct ReplicaTarget: ParsableArguments {
    @Option(name: .customLong("key-id"), help: ArgumentHelp("The primary multi-region key: key id, ARN or alias.", valueName: "id"))
    var keyID: String

    @Option(name: .customLong("replica-region"), help: ArgumentHelp("The replica's region (its identity pinned here).", valueName: "name"))
    var replicaRegion: String
}

/// Writes a bundle to standard output: binary (refusing a terminal), or with --json an object
/// with the bundle in base64 (`import-replica --replication-bundle` takes that text) and the
/// key's metadata.
func writeBundle(_ bundle: Data, metadata: Kmsd_V1_KeyMetadata, json: Bool) throws {
    if json {
        try printJSON(["ReplicationBundle": bundle.base64EncodedString(), "KeyMetadata": keyMetadataDictionary(metadata)])
        return
    }
    if isatty(STDOUT_FILENO) == 1 {
        throw ValidationError("the replication bundle is binary: redirect standard output to a file or pipe it (| ssh host kmsctl import-replica), or give --json for base64")
    }
    writeStdout(bundle)
}

struct ReplicateKey: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replicate-key",
        abstract: "Make a replication bundle of a multi-region key for another region's kmsd (bundle on standard output).",
        discussion: """
        Every version of the key, wrapped to the replica region's pinned identity and signed with \
        this kmsd's identity: `kmsctl replicate-key --key-id K --replica-region west | ssh west \
        kmsctl import-replica`. --policy, --description and --tags are the replica's (default: \
        the default policy there, the primary's description and tags). Needs kms:ReplicateKey.
        """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var target: ReplicaTarget

    @Option(name: .customLong("policy"), help: ArgumentHelp("The replica's key policy: file://PATH, -, or the JSON.", valueName: "file://path"))
    var policy: String?

    @Option(name: .customLong("description"), help: ArgumentHelp("The replica's description; file://PATH reads it from a file.", valueName: "text"))
    var replicaDescription = ""

    @Option(name: .customLong("tags"), parsing: .upToNextOption,
            help: ArgumentHelp("The replica's tags: TagKey=KEY,TagValue=VALUE ...", valueName: "TagKey=k,TagValue=v"))
    var tags: [String] = []

    func run() async throws {
        let policyText = try policy.map { try readTextArgument($0, option: "--policy") } ?? ""
        let tagMap = Dictionary(try parseTagShorthand(tags).map { ($0.key, $0.value) }, uniquingKeysWith: { _, b in b })
        let descriptionText = try readTextParameter(replicaDescription, option: "--description")
        let r = try await global.withClient {
            try await $0.replicateKey(keyID: target.keyID, replicaRegion: target.replicaRegion, policy: policyText,
                                      description: descriptionText, tags: tagMap)
        }
        try writeBundle(r.replicationBundle, metadata: r.keyMetadata, json: global.json)
    }
}

struct SyncReplica: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sync-replica",
        abstract: "A bundle that brings a replica up to the primary's versions (bundle on standard output).",
        discussion: "After rotating the primary: `kmsctl sync-replica --key-id K --replica-region west | ssh west kmsctl import-replica`. The replica keeps its own policy, tags, description, aliases and state.")

    @OptionGroup var global: GlobalOptions
    @OptionGroup var target: ReplicaTarget

    func run() async throws {
        let r = try await global.withClient { try await $0.replicateKey(keyID: target.keyID, replicaRegion: target.replicaRegion) }
        try writeBundle(r.replicationBundle, metadata: r.keyMetadata, json: global.json)
    }
}

struct ImportReplica: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import-replica",
        abstract: "Take a replication bundle made for this kmsd by a pinned identity (administrators).",
        discussion: "The bundle comes from standard input, or --replication-bundle fileb://PATH. A new key becomes a replica here; an existing replica gets the versions it lacks.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("replication-bundle"), help: ArgumentHelp("fileb://PATH; default standard input.", valueName: "fileb://path"))
    var bundle: String?

    func run() async throws {
        let bytes = try bundle.map { try readBlobArgument($0, option: "--replication-bundle") } ?? Array(FileHandle.standardInput.readDataToEndOfFile())
        // A replica deletion notice is taken the same way: --replication-bundle with the base64
        // schedule-key-deletion printed (ReplicaDeletionNotice) on the replica's host.
        let r = try await global.withClient { try await $0.importReplica(bundle: bytes) }
        if global.json {
            var object = keyMetadataDictionary(r.keyMetadata)
            object = ["KeyMetadata": object, "ImportedVersions": Int(r.importedVersions)]
            try printJSON(object)
        } else {
            try printKeyMetadata(r.keyMetadata, json: false)
            printFields([("ImportedVersions", String(r.importedVersions))])
        }
    }
}

struct UpdatePrimaryRegion: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "update-primary-region",
        abstract: "Make a replica region the primary of a multi-region key (bundle on standard output).",
        discussion: "Run on the primary: it becomes a replica at once, and the bundle, imported in the new primary region, makes the replica there the primary: `kmsctl update-primary-region --key-id K --primary-region west | ssh west kmsctl import-replica`. Needs kms:UpdatePrimaryRegion.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .customLong("key-id"), help: ArgumentHelp("The primary multi-region key: key id, ARN or alias.", valueName: "id"))
    var keyID: String

    @Option(name: .customLong("primary-region"), help: ArgumentHelp("One of its replica regions.", valueName: "name"))
    var primaryRegion: String

    func run() async throws {
        let r = try await global.withClient { try await $0.updatePrimaryRegion(keyID: keyID, primaryRegion: primaryRegion) }
        try writeBundle(r.replicationBundle, metadata: r.keyMetadata, json: global.json)
    }
}
