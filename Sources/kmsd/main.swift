import ArgumentParser
import Foundation
import KMSServer

/// kmsd: the key management daemon. Wiring only: flags -> configuration -> Server.
struct KMSD: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kmsd",
        abstract: "Key management daemon: holds keys in locked memory and serves kmsctl and KMSClient over a Unix socket.",
        discussion: """
        Production: kmsd --config /etc/kmsd/kmsd.json, normally started by systemd/kmsd.service; \
        the root key comes from the systemd credential 'root-key' ($CREDENTIALS_DIRECTORY/root-key), \
        else from --root-key-file.

        Development: kmsd --dev --state-dir DIR generates a root key in DIR and listens on DIR/kmsd.sock.

        Flags override the configuration file. Clients find the socket through KMSD_SOCKET.

        Root-key rotation (kmsd stopped): kmsd rewrap --help.
        Restoring a backup (kmsd stopped): kmsd restore --help.
        """
    )

    @Option(name: .long, help: ArgumentHelp("JSON configuration file (settings listed in README.md).", valueName: "file"))
    var config: String?

    @Flag(name: .long, help: "Development mode: generate a root key in the state directory if none exists, socket defaults to STATE_DIR/kmsd.sock, audit failures do not refuse requests.")
    var dev = false

    @Option(name: .customLong("state-dir"), help: ArgumentHelp("State directory (keystore; in --dev also the root key and socket). Default /var/lib/kmsd.", valueName: "dir"))
    var stateDir: String?

    @Option(name: .long, help: ArgumentHelp("Unix socket path. Default /run/kmsd/kmsd.sock, or STATE_DIR/kmsd.sock with --dev. Ignored when socket-activated.", valueName: "path"))
    var socket: String?

    @Option(name: .customLong("socket-mode"), help: ArgumentHelp("Octal mode of the socket file. Default 0666 (access is decided per request from peer credentials).", valueName: "mode"))
    var socketMode: String?

    @Option(name: .customLong("socket-group"), help: ArgumentHelp("Group owning the socket file.", valueName: "group"))
    var socketGroup: String?

    @Option(name: .customLong("root-key-file"), help: ArgumentHelp("File holding the 32-byte root key, used when $CREDENTIALS_DIRECTORY/root-key is absent.", valueName: "file"))
    var rootKeyFile: String?

    @Option(name: .customLong("admin-uid"), help: ArgumentHelp("A uid that administers kmsd (may create keys). Repeatable; replaces the default (0).", valueName: "uid"))
    var adminUIDs: [UInt32] = []

    @Option(name: .customLong("admin-gid"), help: ArgumentHelp("A group whose members (primary or supplementary) administer kmsd. Repeatable.", valueName: "gid"))
    var adminGIDs: [UInt32] = []

    @Option(name: .customLong("max-frame-bytes"), help: ArgumentHelp("Largest request frame accepted. Default 65536.", valueName: "n"))
    var maxFrameBytes: Int?

    @Option(name: .customLong("max-connections"), help: ArgumentHelp("Most open connections. Default 1024.", valueName: "n"))
    var maxConnections: Int?

    @Option(name: .customLong("max-connections-per-uid"), help: ArgumentHelp("Most open connections per uid. Default 128.", valueName: "n"))
    var maxConnectionsPerUID: Int?

    @Option(name: .customLong("max-in-flight"), help: ArgumentHelp("Most requests handled at once per connection. Default 64.", valueName: "n"))
    var maxInFlight: Int?

    @Option(name: .customLong("idle-timeout"), help: ArgumentHelp("Seconds before an idle connection is closed. Default 300.", valueName: "s"))
    var idleTimeout: Int?

    @Option(name: .customLong("worker-threads"), help: ArgumentHelp("Threads handling requests. Default 4.", valueName: "n"))
    var workerThreads: Int?

    @Option(name: .customLong("max-requests-per-second-per-uid"), help: ArgumentHelp("Requests per second each uid may make; over it, ThrottlingException. 0 = unlimited. Default 10000.", valueName: "n"))
    var maxRequestsPerSecondPerUID: Int?

    @Option(name: .customLong("request-burst-per-uid"), help: ArgumentHelp("Requests a uid may make at once above its rate. 0 = one second's worth. Default 20000.", valueName: "n"))
    var requestBurstPerUID: Int?

    @Option(name: .customLong("admin-reserved-connections"), help: ArgumentHelp("Connections only administrators may take. Default 16.", valueName: "n"))
    var adminReservedConnections: Int?

    @Option(name: .long, help: ArgumentHelp("This kmsd's region, for multi-region keys (lowercase letters, digits, hyphens). Default local.", valueName: "name"))
    var region: String?

    @Option(name: .customLong("key-cache-capacity"), help: ArgumentHelp("Keys whose unwrapped material (locked memory) and record are kept in memory. Default 4096.", valueName: "n"))
    var keyCacheCapacity: Int?

    @Option(name: .customLong("frame-timeout"), help: ArgumentHelp("Seconds a client may take to send a whole frame once it started one. Default 10.", valueName: "s"))
    var frameTimeout: Int?

    @Option(name: .customLong("audit-timeout-ms"), help: ArgumentHelp("Milliseconds to wait for journald to take an audit record before the request fails. Default 250.", valueName: "ms"))
    var auditTimeoutMilliseconds: Int?

    @Option(name: .customLong("dev-day-seconds"), help: ArgumentHelp("Development only: seconds in a day of a key deletion window (so a 7-day window can pass in 7 s). Default 86400.", valueName: "s"))
    var devDaySeconds: Int?

    @Option(name: .customLong("dev-audit-socket"), help: ArgumentHelp("Development only: send audit records to this datagram socket instead of journald (benchmarks).", valueName: "path"))
    var devAuditSocket: String?

    @Flag(name: .customLong("dev-audit-off"), help: "Development only: write no audit records at all (benchmarks of the request path alone).")
    var devAuditOff = false

    @Option(name: .customLong("dev-clock-file"), help: ArgumentHelp("Development only: a file holding seconds to add to kmsd's clock (rotations and deletions), read as it changes.", valueName: "file"))
    var devClockFile: String?

    @Option(name: .customLong("event-loops"), help: ArgumentHelp("Event-loop threads serving connections. Default: half the cores; two on two or three cores, one on one.", valueName: "n"))
    var eventLoops: Int?

    @Option(name: .customLong("alarm-access-denied-per-minute"), help: ArgumentHelp("Alarm when one uid is denied more than this many times in a minute (0: off). Default 20.", valueName: "n"))
    var alarmAccessDeniedPerMinute: Int?

    @Flag(name: .customLong("alarm-new-decrypt-caller"), help: "Alarm when an executable or systemd unit decrypts with a key for the first time (remembered in the state directory). Default off.")
    var alarmNewDecryptCaller = false

    @Option(name: .customLong("identity-policy-dir"), help: ArgumentHelp("A directory of identity policies (*.json), reloaded on SIGHUP.", valueName: "dir"))
    var identityPolicyDir: String?

    @Option(name: .customLong("credential-socket"), help: ArgumentHelp("The credential provider's socket, for systemd's LoadCredential=ID:PATH (\"\" for none). Default /run/kmsd/credentials.sock, or STATE_DIR/credentials.sock with --dev. Ignored when socket-activated with a socket named credentials.", valueName: "path"))
    var credentialSocket: String?

    @Option(name: .customLong("credential-dir"), help: ArgumentHelp("Where kmsctl put-credential keeps encrypted credentials. Default /etc/kmsd/credentials, or STATE_DIR/credentials with --dev.", valueName: "dir"))
    var credentialDir: String?

    @Flag(name: .customLong("allow-unlocked-memory"), help: "Development only: run even when key memory cannot be locked (RLIMIT_MEMLOCK too small).")
    var allowUnlockedMemory = false

    @Option(name: .customLong("audit-fail-closed"), help: ArgumentHelp("Refuse requests whose audit record journald does not take: true or false. Default true (false with --dev).", valueName: "bool"))
    var auditFailClosed: Bool?

    func run() throws {
        let c = try makeConfiguration()
        let command = self
        do {
            // SIGHUP reads the file again and applies the same flags over it.
            let server = try Server(configuration: c, reread: config == nil ? nil : { try command.makeConfiguration() })
            try server.run()
        } catch {
            FileHandle.standardError.write(Data("kmsd: error: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }

    /// The configuration file (if any), then the flags over it.
    func makeConfiguration() throws -> ServerConfiguration {
        var c = ServerConfiguration()
        if let config { c = try ServerConfiguration.load(file: config) }
        if dev { c.development = true; c.auditFailClosed = false }
        if let stateDir { c.stateDirectory = stateDir }
        if let socket { c.socketPath = socket }
        if let socketMode {
            guard let m = UInt32(socketMode, radix: 8) else { throw ValidationError("--socket-mode takes an octal mode such as 0660") }
            c.socketMode = m
        }
        if let socketGroup { c.socketGroup = socketGroup }
        if let rootKeyFile { c.rootKeyFile = rootKeyFile }
        if !adminUIDs.isEmpty { c.administrators.uids = Set(adminUIDs) }
        if !adminGIDs.isEmpty { c.administrators.gids = Set(adminGIDs) }
        if let maxFrameBytes { c.maxFrameBytes = maxFrameBytes }
        if let maxConnections { c.maxConnections = maxConnections }
        if let maxConnectionsPerUID { c.maxConnectionsPerUID = maxConnectionsPerUID }
        if let maxInFlight { c.maxInFlightPerConnection = maxInFlight }
        if let idleTimeout { c.idleTimeoutSeconds = idleTimeout }
        if let workerThreads { c.workerThreads = workerThreads }
        if let eventLoops { c.eventLoops = eventLoops }
        if let devDaySeconds { c.developmentDaySeconds = devDaySeconds }
        if let devClockFile { c.developmentClockFile = devClockFile }
        if let devAuditSocket { c.developmentAuditSocket = devAuditSocket }
        if devAuditOff { c.developmentAuditOff = true }
        if let maxRequestsPerSecondPerUID { c.maxRequestsPerSecondPerUID = maxRequestsPerSecondPerUID }
        if let requestBurstPerUID { c.requestBurstPerUID = requestBurstPerUID }
        if let adminReservedConnections { c.adminReservedConnections = adminReservedConnections }
        if let frameTimeout { c.frameTimeoutSeconds = frameTimeout }
        if let keyCacheCapacity { c.keyCacheCapacity = keyCacheCapacity }
        if let region { c.region = region }
        if let auditTimeoutMilliseconds { c.auditTimeoutMilliseconds = auditTimeoutMilliseconds }
        if allowUnlockedMemory { c.allowUnlockedMemory = true }
        if let identityPolicyDir { c.identityPolicyDirectory = identityPolicyDir }
        if let alarmAccessDeniedPerMinute {
            guard alarmAccessDeniedPerMinute >= 0 else { throw ValidationError("--alarm-access-denied-per-minute takes 0 (off) or more") }
            c.alarmAccessDeniedPerMinute = alarmAccessDeniedPerMinute
        }
        if alarmNewDecryptCaller { c.alarmNewDecryptCaller = true }
        if let auditFailClosed { c.auditFailClosed = auditFailClosed }
        if let credentialSocket { c.credentialSocketPath = credentialSocket }
        if let credentialDir { c.credentialDirectory = credentialDir }
        return c
    }
}

// `kmsd rewrap …` and `kmsd restore …` are commands of their own; anything else runs the
// daemon. (Not ArgumentParser subcommands: the daemon's options would shadow theirs of the
// same names.)
if CommandLine.arguments.count > 1, CommandLine.arguments[1] == "rewrap" {
    Rewrap.main(Array(CommandLine.arguments.dropFirst(2)))
} else if CommandLine.arguments.count > 1, CommandLine.arguments[1] == "restore" {
    Restore.main(Array(CommandLine.arguments.dropFirst(2)))
} else {
    KMSD.main()
}
