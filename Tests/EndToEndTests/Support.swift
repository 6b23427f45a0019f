import Foundation
import Glibc
import KMSClient
import Testing

/// Where the built executables are: next to this test binary (`swift build --build-tests`
/// builds them all into the same folder).
enum Paths {
    static let buildDir: URL = {
        if let dir = ProcessInfo.processInfo.environment["KMSD_BIN_DIR"] { return URL(fileURLWithPath: dir) }
        return URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    }()

    /// A world-readable copy of the executables: tests run them as other uids (setpriv), and
    /// the checkout may sit where those uids cannot enter (`/root/...`, a `mktemp -d`).
    static let binDir: URL = {
        let dir = "/tmp/kmsd-bin-\(UUID().uuidString.prefix(8))"
        let old = umask(0o022)
        defer { umask(old) }
        mkdir(dir, 0o755)
        chmod(dir, 0o755)
        for name in ["kmsd", "kmsctl"] {
            let from = buildDir.appendingPathComponent(name).path, to = dir + "/" + name
            guard (try? FileManager.default.copyItem(atPath: from, toPath: to)) != nil else {
                fatalError("cannot copy \(from) to \(to); build first with swift build --build-tests")
            }
            chmod(to, 0o755)
        }
        return URL(fileURLWithPath: dir)
    }()
    static var kmsd: String { binDir.appendingPathComponent("kmsd").path }
    static var kmsctl: String { binDir.appendingPathComponent("kmsctl").path }

    static func tempDir(_ tag: String) throws -> String {
        let dir = "/tmp/kmsd-e2e-\(tag)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        chmod(dir, 0o755)
        return dir
    }
}

struct ProcessResult {
    let status: Int32
    let stdout: Data
    let stderr: String
    var text: String { String(decoding: stdout, as: UTF8.self) }
}

/// Runs a command to completion, feeding `stdin`; output goes through temporary files so no
/// pipe can fill up and block.
@discardableResult
func run(_ executable: String, _ args: [String], stdin: Data = Data(), env: [String: String] = [:]) throws -> ProcessResult {
    let base = "/tmp/kmsd-run-\(UUID().uuidString)"
    FileManager.default.createFile(atPath: base + ".in", contents: stdin)
    for suffix in [".in"] { chmod(base + suffix, 0o644) }
    defer { for suffix in [".in", ".out", ".err"] { unlink(base + suffix) } }
    let child = try ChildProcess(executable, args, env: env, stdin: base + ".in", stdout: base + ".out", stderr: base + ".err")
    let status = child.waitUntilExit()
    let out = (try? Data(contentsOf: URL(fileURLWithPath: base + ".out"))) ?? Data()
    let err = (try? Data(contentsOf: URL(fileURLWithPath: base + ".err"))) ?? Data()
    return ProcessResult(status: status, stdout: out, stderr: String(decoding: err, as: UTF8.self))
}

/// glibc 2.34+; declared here because the header hides it behind _GNU_SOURCE.
@_silgen_name("posix_spawn_file_actions_addclosefrom_np")
func spawnAddCloseFrom(_ actions: UnsafeMutablePointer<posix_spawn_file_actions_t>, _ from: Int32) -> Int32

/// A child process started with posix_spawn and reaped with waitpid: no helper thread, and
/// the child inherits no descriptor but 0, 1 and 2. (Foundation's Process watches children
/// through inherited descriptors, and a daemon that keeps one hides another child's exit.)
final class ChildProcess: @unchecked Sendable {
    let processIdentifier: pid_t
    private var status: Int32?

    /// Starts `executable`; stdin from a file (or /dev/null), stdout and stderr appended to
    /// files (created 0666 when missing; /dev/null when nil).
    init(_ executable: String, _ arguments: [String], env: [String: String] = [:],
         stdin: String? = nil, stdout: String? = nil, stderr: String? = nil) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, stdin ?? "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, stdout ?? "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0o666)
        posix_spawn_file_actions_addopen(&actions, 2, stderr ?? "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0o666)
        guard spawnAddCloseFrom(&actions, 3) == 0 else { throw DaemonError("posix_spawn_file_actions_addclosefrom_np failed") }
        var environment = ProcessInfo.processInfo.environment
        for (k, v) in env { environment[k] = v }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in argv + envp { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, nil, argv, envp)
        guard rc == 0 else { throw DaemonError("cannot start \(executable): \(String(cString: strerror(rc)))") }
        processIdentifier = pid
    }

    /// Whether it still runs (reaps it when it has exited).
    var isRunning: Bool {
        if status != nil { return false }
        var raw: Int32 = 0
        if waitpid(processIdentifier, &raw, WNOHANG) == processIdentifier { status = Self.decode(raw); return false }
        return true
    }

    /// Waits for it to exit; its exit code, or the number of the signal that ended it.
    @discardableResult
    func waitUntilExit() -> Int32 {
        if let status { return status }
        var raw: Int32 = 0
        while waitpid(processIdentifier, &raw, 0) < 0 && errno == EINTR {}
        let decoded = Self.decode(raw)
        status = decoded
        return decoded
    }

    var terminationStatus: Int32 { status ?? -1 }

    /// Waits for it to exit; its exit code and the largest resident set (KiB) of it or any
    /// descendant it waited for (wait4's rusage).
    func waitWithMaxRSS() -> (status: Int32, maxRSSKiB: Int) {
        var raw: Int32 = 0
        var usage = rusage()
        while wait4(processIdentifier, &raw, 0, &usage) < 0 && errno == EINTR {}
        let decoded = Self.decode(raw)
        status = decoded
        return (decoded, usage.ru_maxrss)
    }

    static func decode(_ raw: Int32) -> Int32 {
        raw & 0x7f == 0 ? (raw >> 8) & 0xff : raw & 0x7f
    }
}

/// Runs `argv` as another user (gid = uid, the given supplementary groups) through `setpriv`
/// (needs root).
func runAs(uid: UInt32, _ argv: [String], stdin: Data = Data(), env: [String: String] = [:], groups: [UInt32] = []) throws -> ProcessResult {
    let groupArgs = groups.isEmpty ? ["--clear-groups"] : ["--groups=" + groups.map(String.init).joined(separator: ",")]
    return try run("/usr/bin/setpriv", ["--reuid=\(uid)", "--regid=\(uid)"] + groupArgs + ["--"] + argv, stdin: stdin, env: env)
}

var isRoot: Bool { getuid() == 0 }

/// Writes `bytes` random bytes to `path`, private to its owner (a root-key file).
func writeRandomKey(_ path: String, bytes: Int = 32) throws {
    let r = try run("/bin/sh", ["-c", "umask 077; head -c \(bytes) /dev/urandom > '\(path)'"])
    guard r.status == 0 else { throw DaemonError("cannot write \(path): \(r.stderr)") }
}

/// `head -c 32 /dev/urandom | systemd-creds encrypt --name=NAME - FILE` with the host key, as
/// README says: a new random key sealed as a systemd credential.
func sealRandomKey(name: String, to file: String) throws {
    let r = try run("/bin/sh", ["-c", "umask 077; head -c 32 /dev/urandom | systemd-creds encrypt --with-key=host --name=\(name) - '\(file)'"])
    guard r.status == 0 else { throw DaemonError("systemd-creds encrypt failed: \(r.stderr)") }
}

/// A key policy: administrators may do everything, then `statements` (JSON objects).
func keyPolicy(_ statements: String...) -> String {
    let admins = #"{"Sid": "Admins", "Effect": "Allow", "Principal": {"Role": "Administrators"}, "Action": "kms:*", "Resource": "*"}"#
    return #"{"Version": "2012-10-17", "Statement": [\#(([admins] + statements).joined(separator: ", "))]}"#
}

/// A real kmsd process in development mode with its own state directory and socket.
final class Daemon: @unchecked Sendable {
    let stateDir: String
    let socket: String
    let logPath: String
    private(set) var process: ChildProcess
    let arguments: [String]
    /// When the current kmsd process was started.
    private(set) var startedAt = Date()

    var pid: Int32 { process.processIdentifier }

    /// Starts kmsd and waits until its socket accepts connections.
    init(stateDir: String? = nil, arguments: [String] = [], auditFailClosed: Bool = false) throws {
        let dir = try stateDir ?? Paths.tempDir("state")
        self.stateDir = dir
        socket = dir + "/kmsd.sock"
        logPath = dir + ".log"
        // The user running the tests administers its daemons (root does by default).
        let admins = arguments.contains("--admin-uid") ? [] : ["--admin-uid", "0", "--admin-uid", "\(getuid())"]
        self.arguments = ["--dev", "--state-dir", dir, "--socket", dir + "/kmsd.sock",
                          "--audit-fail-closed", auditFailClosed ? "true" : "false"] + admins + arguments
        startedAt = Date()
        process = try launchKMSD(Paths.kmsd, self.arguments, log: logPath)
    }

    private func start() throws {
        startedAt = Date()
        process = try launchKMSD(Paths.kmsd, arguments, log: logPath)
    }

    /// Everything kmsd wrote to stderr, over all its runs.
    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func client() -> KMSClient { KMSClient(socketPath: socket) }

    /// Runs kmsctl (as this process's user) against this daemon.
    func kmsctl(_ args: [String], stdin: Data = Data()) throws -> ProcessResult {
        try run(Paths.kmsctl, args, stdin: stdin, env: ["KMSD_SOCKET": socket])
    }

    /// SIGKILL, no chance to flush anything.
    func kill9() {
        kill(pid, SIGKILL)
        process.waitUntilExit()
    }

    func stop() {
        guard process.isRunning else { return }
        kill(pid, SIGTERM)
        process.waitUntilExit()
    }

    func restart() throws {
        stop()
        try start()
    }

    deinit { if process.isRunning { kill(pid, SIGKILL); process.waitUntilExit() } }
}

/// Starts a daemon in its own session, detached from this process (never reaped by it), and
/// returns its pid. For journald and systemd-socket-activate, which outlive a test.
func spawnDetached(_ executable: String, _ arguments: [String], log: String) throws -> Int32 {
    let pidFile = "/tmp/kmsd-spawn-\(UUID().uuidString).pid"
    defer { unlink(pidFile) }
    let quoted = ([executable] + arguments).map { "'" + $0.replacingOccurrences(of: "'", with: "'\\''") + "'" }.joined(separator: " ")
    // The shell closes every other descriptor it inherited before it becomes the daemon, so a
    // long-lived daemon holds none of this process's sockets or pipes open.
    let closeInherited = #"for fd in /proc/$$/fd/*; do n=${fd##*/}; [ "$n" -gt 2 ] 2>/dev/null && eval "exec $n>&-"; done; exec "$0" "$@""#
    let status = system("setsid /bin/bash -c '\(closeInherited)' \(quoted) </dev/null >/dev/null 2>>'\(log)' & echo $! > \(pidFile)")
    guard status == 0, let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
          let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
        throw DaemonError("could not start \(executable)")
    }
    return pid
}

/// Starts `executable` (kmsd, or a launcher such as setpriv or unshare that ends up running it)
/// with stderr appended to `log`, and waits until kmsd reports it is ready.
///
/// Throws DaemonError with what kmsd said when it exits or is not ready within 30 s.
func launchKMSD(_ executable: String, _ arguments: [String], log: String, env: [String: String] = [:]) throws -> ChildProcess {
    if !FileManager.default.fileExists(atPath: log) { FileManager.default.createFile(atPath: log, contents: nil) }
    let offset = (try? FileManager.default.attributesOfItem(atPath: log)[.size] as? Int) ?? 0
    let p = try ChildProcess(executable, arguments, env: env, stdout: log, stderr: log)
    func thisRun() -> String {
        String(decoding: ((try? Data(contentsOf: URL(fileURLWithPath: log))) ?? Data()).dropFirst(offset), as: UTF8.self)
    }
    let deadline = Date().addingTimeInterval(30)
    while Date() < deadline {
        if thisRun().contains("kmsd: ready") { return p }
        if !p.isRunning { throw DaemonError("kmsd exited (\(p.terminationStatus)): \(thisRun())") }
        usleep(20_000)
    }
    kill(p.processIdentifier, SIGKILL)
    p.waitUntilExit()
    throw DaemonError("kmsd did not become ready in 30 s: \(thisRun())")
}

struct DaemonError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// The MESSAGE_IDs of kmsd's records (Protocol/AUDIT.md).
enum JournalIDs {
    static let request = "3f1c2a4e9b7d4c2e8a6f0d1b5e9c7a31"
    static let event = "c1b7e0f4a2d94e8b9f3a6d5c2e1b0a97"
    static let alarm = "9d4e7a1c3b2f48e6a5c0d9b8e7f6a1b2"
}

/// A real systemd-journald: the one running, or (as root) a private one started for the tests
/// and left running (never stop a journald you did not start; this one is ours to leave).
enum Journal {
    static let socketPath = "/run/systemd/journal/socket"

    static func ensureRunning() throws {
        if journaldRunning() { return }
        guard isRoot else { throw DaemonError("no journald is running and starting one needs root") }
        try FileManager.default.createDirectory(atPath: "/run/systemd/journal", withIntermediateDirectories: true)
        _ = try spawnDetached("/lib/systemd/systemd-journald", [], log: "/dev/null")
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if journaldRunning() { return }
            usleep(20_000)
        }
        throw DaemonError("systemd-journald did not create \(socketPath)")
    }

    /// True when something receives on journald's socket (a stale socket file refuses).
    static func journaldRunning() -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: Array(socketPath.utf8)) }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
    }

    /// Audit records matching journalctl `matches` (FIELD=value) written since `since`, waiting
    /// until at least `count` arrived.
    static func query(_ matches: [String], since: Date, atLeast count: Int, timeout: TimeInterval = 10) throws -> [[String: Any]] {
        let sinceMicros = UInt64(since.timeIntervalSince1970 * 1_000_000)
        let deadline = Date().addingTimeInterval(timeout)
        var records: [[String: Any]] = []
        repeat {
            let r = try run("/usr/bin/journalctl", ["-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=kmsd"] + matches)
            records = r.text.split(separator: "\n").compactMap {
                try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
            }.filter { (($0["__REALTIME_TIMESTAMP"] as? String).flatMap(UInt64.init) ?? 0) >= sinceMicros }
            if records.count >= count { return records }
            usleep(100_000)
        } while Date() < deadline
        return records
    }

    /// The audit records of one kmsd process (by pid, and written since it started, as pids are
    /// reused and the journal outlives test runs), waiting until at least `count` arrived.
    static func records(pid: Int32, since: Date, atLeast count: Int, timeout: TimeInterval = 10) throws -> [[String: Any]] {
        try query(["_PID=\(pid)"], since: since, atLeast: count, timeout: timeout)
    }
}

/// A raw Unix-socket connection, for sending bytes no well-behaved client would.
final class RawConnection: @unchecked Sendable {
    let fd: Int32

    init(path: String, receiveTimeoutSeconds: Int = 10) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw DaemonError("connect \(path): errno \(errno)") }
        var tv = timeval(tv_sec: receiveTimeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var send = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &send, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Sends all of `bytes`, or returns false when the peer stopped taking them for 2 s.
    func trySend(_ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8]) {
        _ = trySend(bytes)
    }

    func send(_ request: KMSRequest) throws {
        let body: [UInt8] = try request.serializedBytes()
        send(Self.frame(body))
    }

    static func frame(_ body: [UInt8]) -> [UInt8] {
        let n = UInt32(body.count)
        return [UInt8(n >> 24), UInt8((n >> 16) & 0xff), UInt8((n >> 8) & 0xff), UInt8(n & 0xff)] + body
    }

    private func readExactly(_ n: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = out[got...].withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if r <= 0 { return nil }
            got += r
        }
        return out
    }

    /// The next response, or nil at EOF (or after 10 s of silence).
    func receive() throws -> KMSResponse? {
        guard let header = readExactly(4) else { return nil }
        let n = Int(header[0]) << 24 | Int(header[1]) << 16 | Int(header[2]) << 8 | Int(header[3])
        guard let body = readExactly(n) else { return nil }
        return try KMSResponse(serializedBytes: body)
    }

    /// Reads `count` whole frames without decoding them (cheap: for load generators); false at
    /// EOF or after a receive timeout.
    func skipFrames(_ count: Int) -> Bool {
        for _ in 0..<count {
            guard let header = readExactly(4) else { return false }
            let n = Int(header[0]) << 24 | Int(header[1]) << 16 | Int(header[2]) << 8 | Int(header[3])
            guard readExactly(n) != nil else { return false }
        }
        return true
    }

    /// True when the server has closed the connection (recv returns 0).
    func isClosedByPeer() -> Bool {
        var b: UInt8 = 0
        return recv(fd, &b, 1, 0) == 0
    }
}

extension KMSRequest {
    static func with(id: UInt64, _ op: KMSRequest.OneOf_Operation) -> KMSRequest {
        var r = KMSRequest()
        r.id = id
        r.operation = op
        return r
    }
}

/// Asserts an async call throws a KMSError with `code`.
func expectKMSError<T>(_ code: KMSErrorCode, sourceLocation: SourceLocation = #_sourceLocation, _ body: () async throws -> T) async {
    do {
        _ = try await body()
        Issue.record("expected \(code.rawValue), got success", sourceLocation: sourceLocation)
    } catch let e as KMSError {
        #expect(e.code == code, "got \(e.code.rawValue): \(e.message)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected \(code.rawValue), got \(error)", sourceLocation: sourceLocation)
    }
}

/// A Python 3 that can import `module`: the one on PATH if it can, else Debian's (`make deps`
/// installs python3-cryptography and python3-protobuf for the references in Protocol/vectors
/// and the client in clients/python).
func python(importing module: String) -> String {
    if (try? run("/usr/bin/env", ["python3", "-c", "import \(module)"]))?.status == 0 { return "python3" }
    return "/usr/bin/python3"
}

let referencePython = python(importing: "cryptography")

/// Runs one of the Python references in Protocol/vectors.
func runReference(_ script: String, _ args: [String], stdin: Data = Data()) throws -> ProcessResult {
    let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Protocol/vectors/\(script)").path
    return try run("/usr/bin/env", [referencePython, path] + args, stdin: stdin)
}
