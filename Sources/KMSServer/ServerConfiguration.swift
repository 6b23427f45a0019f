import Foundation
import Glibc
import KMSCore
import KMSProtocol
import NIOCore

/// Everything kmsd needs to start, from a JSON configuration file and/or command-line flags.
public struct ServerConfiguration: Sendable, Equatable {
    public var stateDirectory: String = "/var/lib/kmsd"
    public var socketPath: String? = nil
    /// Mode of the socket file. 0666: every local user may connect; access is decided per request.
    public var socketMode: UInt32 = 0o666
    public var socketGroup: String? = nil
    public var rootKeyFile: String? = nil
    public var administrators = Administrators()
    public var maxFrameBytes = KMSProtocolConstants.defaultMaxFrameBytes
    public var maxConnections = 1024
    public var maxConnectionsPerUID = 128
    public var maxInFlightPerConnection = 64
    public var idleTimeoutSeconds = 300
    public var auditFailClosed = true
    public var development = false
    public var allowUnlockedMemory = false
    public var workerThreads = 4
    /// Event-loop threads serving connections; 0 = half the cores, at least two where there are
    /// two (`effectiveEventLoops`).
    public var eventLoops = 0

    /// The event-loop threads kmsd runs: `eventLoops`, or when 0 half the cores, but two on a
    /// machine of two or three (one on one). kmsd's clients are local processes and every
    /// request needs a core on their side too, hence not every core. On two cores one loop
    /// serving every connection became the limit once a request cost kmsd about 5 µs: with 8
    /// connections two loops gave 65% of the echo server's round trips at 9.4 µs of kmsd's CPU
    /// per Encrypt, one loop 42% at 11.3 µs (2-core AMD EPYC, README "Benchmark"). (With the
    /// request path of an earlier round, at 20 µs per Encrypt, two loops had cost more CPU on
    /// a 2-core Intel machine for the same throughput.)
    public var effectiveEventLoops: Int {
        if eventLoops > 0 { return eventLoops }
        let cores = System.coreCount
        return max(min(2, cores), cores / 2)
    }
    /// Development only: seconds in a "day" of a key deletion window, so tests can watch a
    /// deletion happen. nil = 86400.
    public var developmentDaySeconds: Int? = nil
    /// Development only: a file holding a number of seconds kmsd adds to the time it goes by
    /// (for rotations and deletions), so tests can move time forward.
    public var developmentClockFile: String? = nil
    /// Development only: audit records go to this datagram socket instead of journald (the
    /// benchmark points it at a sink, to measure kmsd without journald's share).
    public var developmentAuditSocket: String? = nil
    /// Development only: no audit records at all (the benchmark's "audit off", which measures
    /// the request path alone). Never a production setting.
    public var developmentAuditOff = false
    public var keyCacheCapacity = 4096
    public var drainTimeoutSeconds = 10
    /// Requests per second each uid may make (token bucket); 0 = unlimited.
    public var maxRequestsPerSecondPerUID = 10_000
    /// How many requests a uid may make at once above its rate; 0 = one second's worth.
    public var requestBurstPerUID = 20_000
    /// Connections only administrators may take, so a flood of other users cannot lock them
    /// out. Default: a quarter of maxConnections, at most 16.
    public var adminReservedConnections: Int? = nil
    public var effectiveAdminReservedConnections: Int { adminReservedConnections ?? min(16, maxConnections / 4) }
    /// Seconds a connection may take to complete a frame once its first byte arrived.
    public var frameTimeoutSeconds = 10
    /// Milliseconds a request waits for journald to take its audit record before it fails.
    public var auditTimeoutMilliseconds = 250
    /// A directory of identity policies (`*.json`), reloaded on SIGHUP; nil: none.
    public var identityPolicyDirectory: String? = nil
    /// This kmsd's region (multi-region keys, PROTOCOL.md §15): lowercase letters, digits and
    /// hyphens, 1 to 63 characters, beginning with a letter or digit.
    public var region = "local"
    /// The credential provider's socket (systemd's LoadCredential=ID:PATH); nil: the default,
    /// "": none.
    public var credentialSocketPath: String? = nil
    /// Where `kmsctl put-credential` keeps encrypted credentials (UNIT/ID); nil: the default.
    public var credentialDirectory: String? = nil
    /// Alarm rules (on by default: AccessDenied rate, use of keys pending deletion, integrity failures).
    var alarms = AlarmRules()
    public var alarmNewDecryptCaller: Bool {
        get { alarms.newDecryptCaller }
        set { alarms.newDecryptCaller = newValue }
    }
    public var alarmAccessDeniedPerMinute: Int {
        get { alarms.accessDeniedPerMinute }
        set { alarms.accessDeniedPerMinute = newValue }
    }

    public init() {}

    /// The socket path in effect: configured, else STATE_DIR/kmsd.sock in development mode,
    /// else /run/kmsd/kmsd.sock.
    public var effectiveSocketPath: String {
        socketPath ?? (development ? stateDirectory + "/kmsd.sock" : KMSProtocolConstants.defaultSocketPath)
    }

    /// The credential socket in effect: configured ("" = none), else STATE_DIR/credentials.sock
    /// in development mode, else /run/kmsd/credentials.sock.
    public var effectiveCredentialSocketPath: String? {
        if let p = credentialSocketPath { return p.isEmpty ? nil : p }
        return development ? stateDirectory + "/credentials.sock" : CredentialNames.defaultSocketPath
    }

    /// The credential directory in effect: configured, else STATE_DIR/credentials in
    /// development mode, else /etc/kmsd/credentials.
    public var effectiveCredentialDirectory: String {
        credentialDirectory ?? (development ? stateDirectory + "/credentials" : CredentialNames.defaultDirectory)
    }

    public var keystorePath: String { stateDirectory + "/keystore.sqlite3" }
    public var devRootKeyPath: String { stateDirectory + "/root-key" }

    /// Checks the values make sense together; the message names the offending setting.
    public func validate() throws {
        func fail(_ m: String) -> ConfigurationError { ConfigurationError(m) }
        guard (32768...KMSProtocolConstants.maxConfigurableFrameBytes).contains(maxFrameBytes) else {
            throw fail("maxFrameBytes must be 32768...\(KMSProtocolConstants.maxConfigurableFrameBytes)")
        }
        for (name, value, range) in [("maxConnections", maxConnections, 1...1_000_000),
                                     ("maxConnectionsPerUid", maxConnectionsPerUID, 1...1_000_000),
                                     ("maxInFlightPerConnection", maxInFlightPerConnection, 1...65_536),
                                     ("idleTimeoutSeconds", idleTimeoutSeconds, 1...604_800),
                                     ("workerThreads", workerThreads, 1...256),
                                     ("eventLoops", eventLoops, 0...256),
                                     ("keyCacheCapacity", keyCacheCapacity, 1...10_000_000),
                                     ("drainTimeoutSeconds", drainTimeoutSeconds, 0...3600),
                                     ("maxRequestsPerSecondPerUid", maxRequestsPerSecondPerUID, 0...10_000_000),
                                     ("requestBurstPerUid", requestBurstPerUID, 0...10_000_000),
                                     ("adminReservedConnections", effectiveAdminReservedConnections, 0...max(0, maxConnections - 1)),
                                     ("frameTimeoutSeconds", frameTimeoutSeconds, 1...3600),
                                     ("auditTimeoutMilliseconds", auditTimeoutMilliseconds, 1...60_000)] {
            guard range.contains(value) else { throw fail("\(name) must be \(range.lowerBound)...\(range.upperBound), not \(value)") }
        }
        guard socketMode <= 0o777 else { throw fail("socketMode must be an octal mode like \"0660\"") }
        if let day = developmentDaySeconds {
            guard development else { throw fail("developmentDaySeconds is allowed only in development mode") }
            guard (1...86_400).contains(day) else { throw fail("developmentDaySeconds must be 1...86400, not \(day)") }
        }
        guard developmentClockFile == nil || development else { throw fail("developmentClockFile is allowed only in development mode") }
        guard developmentAuditSocket == nil || development else { throw fail("developmentAuditSocket is allowed only in development mode") }
        guard !developmentAuditOff || development else { throw fail("developmentAuditOff is allowed only in development mode") }
        guard Self.isValidRegion(region) else {
            throw fail("region '\(region.prefix(64))' is not a region name: 1 to 63 lowercase letters, digits and hyphens, beginning with a letter or digit")
        }
        guard !allowUnlockedMemory || development else {
            throw fail("allowUnlockedMemory is allowed only in development mode")
        }
    }

    /// What SIGHUP does with `new` (the configuration file read again, flags applied again):
    /// the settings it can apply in place are taken over (administrators, identity policies,
    /// rate limits, alarms; timeouts for connections from then on), the rest are named as
    /// needing a restart and keep their running values.
    public func reloaded(from new: ServerConfiguration) -> (applied: ServerConfiguration, changed: [String], needsRestart: [String]) {
        var applied = self, changed: [String] = [], restart: [String] = []
        func live<T: Equatable>(_ name: String, _ path: WritableKeyPath<ServerConfiguration, T>) {
            if self[keyPath: path] != new[keyPath: path] { changed.append(name); applied[keyPath: path] = new[keyPath: path] }
        }
        func fixed<T: Equatable>(_ name: String, _ path: KeyPath<ServerConfiguration, T>) {
            if self[keyPath: path] != new[keyPath: path] { restart.append(name) }
        }
        live("administrators", \.administrators)
        live("identityPolicyDirectory", \.identityPolicyDirectory)
        live("maxRequestsPerSecondPerUid", \.maxRequestsPerSecondPerUID)
        live("requestBurstPerUid", \.requestBurstPerUID)
        live("alarms", \.alarms)
        live("idleTimeoutSeconds", \.idleTimeoutSeconds)
        live("frameTimeoutSeconds", \.frameTimeoutSeconds)
        live("drainTimeoutSeconds", \.drainTimeoutSeconds)
        live("credentialDirectory", \.credentialDirectory)
        fixed("credentialSocketPath", \.credentialSocketPath)
        fixed("stateDirectory", \.stateDirectory)
        fixed("socketPath", \.socketPath)
        fixed("socketMode", \.socketMode)
        fixed("socketGroup", \.socketGroup)
        fixed("rootKeyFile", \.rootKeyFile)
        fixed("maxFrameBytes", \.maxFrameBytes)
        fixed("maxConnections", \.maxConnections)
        fixed("maxConnectionsPerUid", \.maxConnectionsPerUID)
        fixed("maxInFlightPerConnection", \.maxInFlightPerConnection)
        fixed("adminReservedConnections", \.adminReservedConnections)
        fixed("auditFailClosed", \.auditFailClosed)
        fixed("auditTimeoutMilliseconds", \.auditTimeoutMilliseconds)
        fixed("development", \.development)
        fixed("allowUnlockedMemory", \.allowUnlockedMemory)
        fixed("workerThreads", \.workerThreads)
        fixed("eventLoops", \.eventLoops)
        fixed("keyCacheCapacity", \.keyCacheCapacity)
        fixed("developmentDaySeconds", \.developmentDaySeconds)
        fixed("developmentClockFile", \.developmentClockFile)
        fixed("developmentAuditSocket", \.developmentAuditSocket)
        fixed("developmentAuditOff", \.developmentAuditOff)
        fixed("region", \.region)
        return (applied, changed, restart)
    }

    /// Reads a JSON configuration file; unknown keys are refused (a typo must not silently
    /// weaken anything).
    public static func load(file: String) throws -> ServerConfiguration {
        // It names the administrators: only root or kmsd's user may be able to change it.
        try StateDirectory.checkTrusted(file, what: "configuration file")
        guard let data = FileManager.default.contents(atPath: file) else {
            throw ConfigurationError("cannot read configuration file \(file)")
        }
        guard let obj = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw ConfigurationError("\(file) is not a JSON object")
        }
        var c = ServerConfiguration()
        for (key, value) in obj {
            func str() throws -> String {
                guard let s = value as? String else { throw ConfigurationError("\(file): \(key) must be a string") }
                return s
            }
            // Foundation on Linux bridges the numbers 0 and 1 to Bool, so tell JSON booleans
            // from numbers by their storage type ("c" is how a JSON true/false is stored).
            let isBoolean = (value as? NSNumber).map { String(cString: $0.objCType) == "c" } ?? false
            func int() throws -> Int {
                guard !isBoolean, let n = value as? Int else { throw ConfigurationError("\(file): \(key) must be a whole number") }
                return n
            }
            func bool() throws -> Bool {
                guard isBoolean, let b = value as? Bool else { throw ConfigurationError("\(file): \(key) must be true or false") }
                return b
            }
            switch key {
            case "stateDirectory": c.stateDirectory = try str()
            case "socketPath": c.socketPath = try str()
            case "socketMode":
                guard let m = UInt32(try str(), radix: 8) else { throw ConfigurationError("\(file): socketMode must be an octal string like \"0660\"") }
                c.socketMode = m
            case "socketGroup": c.socketGroup = try str()
            case "rootKeyFile": c.rootKeyFile = try str()
            case "administrators":
                guard let a = value as? [String: Any] else { throw ConfigurationError("\(file): administrators must be an object with uids, gids, users, groups") }
                c.administrators = try parseAdministrators(a, file: file)
            case "maxFrameBytes": c.maxFrameBytes = try int()
            case "maxConnections": c.maxConnections = try int()
            case "maxConnectionsPerUid": c.maxConnectionsPerUID = try int()
            case "maxInFlightPerConnection": c.maxInFlightPerConnection = try int()
            case "idleTimeoutSeconds": c.idleTimeoutSeconds = try int()
            case "auditFailClosed": c.auditFailClosed = try bool()
            case "development": c.development = try bool()
            case "allowUnlockedMemory": c.allowUnlockedMemory = try bool()
            case "workerThreads": c.workerThreads = try int()
            case "eventLoops": c.eventLoops = try int()
            case "developmentDaySeconds": c.developmentDaySeconds = try int()
            case "developmentClockFile": c.developmentClockFile = try str()
            case "developmentAuditSocket": c.developmentAuditSocket = try str()
            case "developmentAuditOff": c.developmentAuditOff = try bool()
            case "region": c.region = try str()
            case "keyCacheCapacity": c.keyCacheCapacity = try int()
            case "drainTimeoutSeconds": c.drainTimeoutSeconds = try int()
            case "maxRequestsPerSecondPerUid": c.maxRequestsPerSecondPerUID = try int()
            case "requestBurstPerUid": c.requestBurstPerUID = try int()
            case "adminReservedConnections": c.adminReservedConnections = try int()
            case "frameTimeoutSeconds": c.frameTimeoutSeconds = try int()
            case "auditTimeoutMilliseconds": c.auditTimeoutMilliseconds = try int()
            case "identityPolicyDirectory": c.identityPolicyDirectory = try str()
            case "credentialSocketPath": c.credentialSocketPath = try str()
            case "credentialDirectory": c.credentialDirectory = try str()
            case "alarms":
                guard let a = value as? [String: Any] else { throw ConfigurationError("\(file): alarms must be an object") }
                for (k, v) in a {
                    let isBool = (v as? NSNumber).map { String(cString: $0.objCType) == "c" } ?? false
                    switch k {
                    case "accessDeniedPerMinute":
                        guard !isBool, let n = v as? Int, n >= 0 else { throw ConfigurationError("\(file): alarms.accessDeniedPerMinute must be a whole number (0: off)") }
                        c.alarms.accessDeniedPerMinute = n
                    case "pendingDeletionUse", "disabledKeyUse", "integrityFailure", "newDecryptCaller":
                        guard isBool, let b = v as? Bool else { throw ConfigurationError("\(file): alarms.\(k) must be true or false") }
                        switch k {
                        case "pendingDeletionUse": c.alarms.pendingDeletionUse = b
                        case "disabledKeyUse": c.alarms.disabledKeyUse = b
                        case "newDecryptCaller": c.alarms.newDecryptCaller = b
                        default: c.alarms.integrityFailure = b
                        }
                    default: throw ConfigurationError("\(file): unknown setting alarms.\(k)")
                    }
                }
            default: throw ConfigurationError("\(file): unknown setting '\(key)'")
            }
        }
        try c.validate()
        return c
    }

    static func parseAdministrators(_ a: [String: Any], file: String) throws -> Administrators {
        var admins = Administrators(uids: [], gids: [])
        for (k, v) in a {
            switch k {
            case "uids":
                guard let list = v as? [Int], let uids = Optional(list.compactMap { UInt32(exactly: $0) }), uids.count == list.count else {
                    throw ConfigurationError("\(file): administrators.uids must be a list of uids (0...4294967295)")
                }
                admins.uids.formUnion(uids)
            case "gids":
                guard let list = v as? [Int], let gids = Optional(list.compactMap { UInt32(exactly: $0) }), gids.count == list.count else {
                    throw ConfigurationError("\(file): administrators.gids must be a list of gids (0...4294967295)")
                }
                admins.gids.formUnion(gids)
            case "users":
                guard let list = v as? [String] else { throw ConfigurationError("\(file): administrators.users must be a list of names") }
                for name in list {
                    guard let pw = getpwnam(name) else { throw ConfigurationError("\(file): administrator user '\(name)' does not exist") }
                    admins.uids.insert(pw.pointee.pw_uid)
                }
            case "groups":
                guard let list = v as? [String] else { throw ConfigurationError("\(file): administrators.groups must be a list of names") }
                for name in list {
                    guard let gr = getgrnam(name) else { throw ConfigurationError("\(file): administrator group '\(name)' does not exist") }
                    admins.gids.insert(gr.pointee.gr_gid)
                }
            default: throw ConfigurationError("\(file): unknown setting administrators.\(k)")
            }
        }
        return admins
    }
}

public struct ConfigurationError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

extension ServerConfiguration {
    /// A region name: 1 to 63 of a-z, 0-9 and '-', not beginning with '-'.
    public static func isValidRegion(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...63).contains(bytes.count), bytes[0] != UInt8(ascii: "-") else { return false }
        return bytes.allSatisfy { ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == UInt8(ascii: "-") }
    }
}

