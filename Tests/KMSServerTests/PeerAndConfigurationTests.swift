import CKMSLinux
import Foundation
import KMSCore
@testable import KMSServer
import Testing

/// The parts of the server that turn text into decisions: /proc parsing and configuration.
struct PeerParsingTests {
    @Test(arguments: [
        ("0::/system.slice/billing.service\n", "billing.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/run-u42.scope\n", "run-u42.scope"),
        ("0::/system.slice/kmsd.service/worker\n", "kmsd.service"),
        ("0::/\n", nil),
        ("12:memory:/docker/abc\n", nil),
    ] as [(String, String?)])
    func unitFromCgroup(_ cgroup: String, _ unit: String?) {
        #expect(PeerCredentials.unit(fromCgroup: cgroup) == unit)
    }

    @Test func startTimeFromStat() {
        // The command name may hold spaces and parentheses; the start time is field 22.
        let me = PeerCredentials.startTicks(pid: getpid())
        #expect(me != nil)
        #expect(me! <= PeerCredentials.boottimeTicks(), "a running process started before now")
        #expect(PeerCredentials.startTicks(pid: 0) == nil)
    }

    /// Without SO_PEERPIDFD, kmsd falls back to pidfd_open(pid): a process that started after
    /// the connection was accepted is not the one that connected, and lends no identity.
    @Test func aProcessYoungerThanTheConnectionIsNotTheCaller() throws {
        let before = PeerCredentials.boottimeTicks()
        usleep(30_000)  // more than one clock tick
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/bin/sleep")
        child.arguments = ["1"]
        try child.run()
        defer { child.terminate(); child.waitUntilExit() }
        usleep(30_000)
        let after = PeerCredentials.boottimeTicks()
        func identity(acceptedAt: UInt64, uid: UInt32 = getuid()) -> Result<(String?, String?, Bool), PeerCredentials.Unverified> {
            let fd = kms_pidfd_open(child.processIdentifier)
            let raw = PeerCredentials.Raw(cred: kms_ucred(pid: child.processIdentifier, uid: uid, gid: getgid()), groups: [],
                                          pidfd: fd, pidfdFromSocket: false, acceptedAtTicks: acceptedAt)
            defer { close(fd) }
            return PeerCredentials.processIdentity(raw)
        }
        guard case .failure(let why) = identity(acceptedAt: before) else {
            Issue.record("a process started after the connection was taken for the caller")
            return
        }
        #expect(why.description.contains("started after the connection"))
        // Old enough, but running as another user than the connection's: not the caller either.
        guard case .failure(let other) = identity(acceptedAt: after, uid: getuid() &+ 1) else {
            Issue.record("a process of another user was taken for the caller")
            return
        }
        #expect(other.description.contains("another user"))
        guard case .success(let (exe, _, _)) = identity(acceptedAt: after) else {
            Issue.record("the connecting process itself was not identified")
            return
        }
        #expect(exe?.hasSuffix("sleep") == true, "\(exe ?? "nil")")
    }

    @Test func paddingIsNotAGroup() {
        #expect(PeerCredentials.trimmed([4, 24, 27, 0, 0]) == [4, 24, 27])
        #expect(PeerCredentials.trimmed([0, 0]) == [])
    }

    @Test func administratorsByUIDAndGroup() {
        let admins = Administrators(uids: [0], gids: [4343])
        #expect(admins.contains(Principal(uid: 0, gid: 0, pid: 1, userName: "root")))
        #expect(admins.contains(Principal(uid: 1000, gid: 1000, pid: 1, userName: "a", groups: [27, 4343])))
        #expect(admins.contains(Principal(uid: 1000, gid: 4343, pid: 1, userName: "a")))
        #expect(!admins.contains(Principal(uid: 1000, gid: 1000, pid: 1, userName: "a", groups: [27])))
    }
}

struct ConfigurationTests {
    func load(_ json: String) throws -> ServerConfiguration {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("kmsd-config-\(UUID().uuidString).json").path
        try Data(json.utf8).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        return try ServerConfiguration.load(file: path)
    }

    @Test func readsEverySetting() throws {
        let c = try load("""
        {"stateDirectory": "/s", "socketPath": "/r/k.sock", "socketMode": "0660", "rootKeyFile": "/k",
         "administrators": {"uids": [0, 1000], "gids": [50]}, "maxFrameBytes": 131072, "maxConnections": 10,
         "maxConnectionsPerUid": 2, "maxInFlightPerConnection": 8, "idleTimeoutSeconds": 60, "auditFailClosed": false,
         "workerThreads": 2, "keyCacheCapacity": 100, "drainTimeoutSeconds": 5, "maxRequestsPerSecondPerUid": 50,
         "requestBurstPerUid": 70, "adminReservedConnections": 3, "frameTimeoutSeconds": 4, "auditTimeoutMilliseconds": 250,
         "eventLoops": 1, "alarms": {"accessDeniedPerMinute": 5, "pendingDeletionUse": false, "disabledKeyUse": true,
         "integrityFailure": false, "newDecryptCaller": true}, "region": "eu-west-2"}
        """)
        #expect(c.region == "eu-west-2")
        #expect(c.alarms == AlarmRules(accessDeniedPerMinute: 5, pendingDeletionUse: false, disabledKeyUse: true,
                                       integrityFailure: false, newDecryptCaller: true))
        #expect(c.maxRequestsPerSecondPerUID == 50 && c.requestBurstPerUID == 70 && c.effectiveAdminReservedConnections == 3)
        #expect(c.frameTimeoutSeconds == 4 && c.auditTimeoutMilliseconds == 250 && c.eventLoops == 1)
        #expect(c.stateDirectory == "/s" && c.effectiveSocketPath == "/r/k.sock" && c.socketMode == 0o660)
        #expect(c.administrators == Administrators(uids: [0, 1000], gids: [50]))
        #expect(c.maxFrameBytes == 131072 && c.maxConnections == 10 && c.maxConnectionsPerUID == 2)
        #expect(c.maxInFlightPerConnection == 8 && c.idleTimeoutSeconds == 60 && !c.auditFailClosed)
        #expect(c.workerThreads == 2 && c.keyCacheCapacity == 100 && c.drainTimeoutSeconds == 5 && c.rootKeyFile == "/k")
    }

    @Test func defaultsAreSafe() throws {
        let c = try load("{}")
        #expect(c.auditFailClosed && !c.development && !c.allowUnlockedMemory)
        #expect(c.administrators == Administrators(uids: [0], gids: []))
        #expect(c.effectiveSocketPath == "/run/kmsd/kmsd.sock")
        #expect(c.socketMode == 0o666 && c.region == "local")
        #expect(c.maxRequestsPerSecondPerUID == 10_000 && c.requestBurstPerUID == 20_000)
        #expect(c.effectiveAdminReservedConnections == 16 && c.frameTimeoutSeconds == 10 && c.auditTimeoutMilliseconds == 250)
        #expect(c.alarms == AlarmRules(accessDeniedPerMinute: 20, pendingDeletionUse: true, disabledKeyUse: false,
                                       integrityFailure: true, newDecryptCaller: false))
    }

    @Test(arguments: [
        (#"{"adminstrators": {}}"#, "unknown setting 'adminstrators'"),
        (#"{"maxInFlightPerConnection": 5000000000}"#, "maxInFlightPerConnection must be"),
        (#"{"maxFrameBytes": 100}"#, "maxFrameBytes must be"),
        (#"{"idleTimeoutSeconds": 0}"#, "idleTimeoutSeconds must be"),
        (#"{"socketMode": "rw-rw-rw-"}"#, "octal"),
        (#"{"administrators": {"uids": [-1]}}"#, "administrators.uids"),
        (#"{"administrators": {"users": ["no-such-user-kmsd"]}}"#, "does not exist"),
        (#"{"allowUnlockedMemory": true}"#, "only in development mode"),
        (#"{"auditFailClosed": "yes"}"#, "true or false"),
        (#"[1, 2]"#, "not a JSON object"),
        (#"{"maxConnections": 8, "adminReservedConnections": 8}"#, "adminReservedConnections must be 0...7"),
        (#"{"maxRequestsPerSecondPerUid": -1}"#, "maxRequestsPerSecondPerUid must be"),
        (#"{"frameTimeoutSeconds": 0}"#, "frameTimeoutSeconds must be"),
        (#"{"region": "EU_West"}"#, "is not a region name"),
        (#"{"region": "-east"}"#, "is not a region name"),
        (#"{"region": ""}"#, "is not a region name"),
        (#"{"auditTimeoutMilliseconds": 0}"#, "auditTimeoutMilliseconds must be"),
        (#"{"auditFailClosed": 1}"#, "true or false"),
        (#"{"developmentDaySeconds": 1}"#, "only in development mode"),
        (#"{"developmentClockFile": "/tmp/clock"}"#, "only in development mode"),
        (#"{"developmentAuditSocket": "/tmp/sink.sock"}"#, "only in development mode"),
        (#"{"developmentAuditOff": true}"#, "only in development mode"),
        (#"{"alarms": {"accessDeniedPerMinute": -1}}"#, "alarms.accessDeniedPerMinute"),
        (#"{"alarms": {"colour": true}}"#, "unknown setting alarms.colour"),
        (#"{"alarms": {"newDecryptCaller": 1}}"#, "alarms.newDecryptCaller must be true or false"),
        (#"{"development": true, "developmentDaySeconds": 0}"#, "developmentDaySeconds must be 1...86400"),
        (#"{"workerThreads": true}"#, "whole number"),
    ])
    func refusesBadConfiguration(_ json: String, _ message: String) {
        do {
            _ = try load(json)
            Issue.record("accepted \(json)")
        } catch {
            #expect("\(error)".contains(message), "\(error)")
        }
    }
}
