import Foundation
import Glibc

/// journald's own ingest rate for records like kmsd's: datagrams with the same fields and sizes
/// as an Encrypt audit record, sent as fast as journald takes them, then counted in the journal.
enum JournaldIngest {
    /// Makes sure a journald is running: the system's, or (as root) a private one started here
    /// and left running, as `make test` does.
    static func ensureRunning() throws {
        if running() { return }
        guard getuid() == 0 else { throw BenchError("no systemd-journald is running and starting one needs root") }
        mkdir("/run/systemd", 0o755)
        mkdir("/run/systemd/journal", 0o755)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/setsid")
        p.arguments = ["/lib/systemd/systemd-journald"]
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        for _ in 0..<200 {
            if running() { progress("started a private systemd-journald (none was running)"); return }
            usleep(50_000)
        }
        throw BenchError("systemd-journald did not start")
    }

    /// True when something receives on journald's socket.
    static func running() -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard var addr = try? UnixSocket.address("/run/systemd/journal/socket") else { return false }
        return withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } } == 0
    }

    struct Result: Codable, Sendable {
        let sent: Int
        let stored: Int
        let seconds: Double
        var recordsPerSecond: Double { seconds > 0 ? Double(stored) / seconds : 0 }
    }

    /// One record: kmsd's Encrypt record fields with representative values.
    static func datagram(run: String, n: Int) -> [UInt8] {
        let fields = [
            "MESSAGE=Encrypt by uid 0 (root) allowed on key 3f0b1f4e-2c1d-4a5b-9c8d-7e6f5a4b3c2d",
            "MESSAGE_ID=3f1c2a4e9b7d4c2e8a6f0d1b5e9c7a31", "PRIORITY=6", "SYSLOG_IDENTIFIER=kmsbench-ingest",
            "KMS_ACTION=Encrypt", "KMS_RESULT=Allowed", "KMS_ERROR=", "KMS_KEY_ID=3f0b1f4e-2c1d-4a5b-9c8d-7e6f5a4b3c2d",
            "KMS_KEY_VERSION=1", "KMS_ALIAS=", "KMS_REQUEST_ID=\(n)", "KMS_PEER_UID=0", "KMS_PEER_GID=0", "KMS_PEER_PID=4242",
            "KMS_PEER_USER=root", "KMS_PEER_EXE=/usr/local/bin/kmsbench", "KMS_PEER_UNIT=", "KMS_PEER_UNRESOLVED=",
            "KMS_ENCRYPTION_CONTEXT=", "KMS_DECIDED_BY=key-policy:KeyCreator", "KMS_DURATION_US=35",
            "KMS_RUN_ID=\(run)", "KMS_SEQ=\(n)", "KMS_CHAIN=" + String(repeating: "ab", count: 32), "KMSBENCH_N=\(n)",
        ]
        return fields.flatMap { Array($0.utf8) + [10] }
    }

    static func measure(seconds: Double) throws -> Result {
        let run = UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw BenchError("socket: \(errnoDescription(errno))") }
        defer { close(fd) }
        var addr = try UnixSocket.address("/run/systemd/journal/socket")
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard rc == 0 else { throw BenchError("cannot reach journald: \(errnoDescription(errno))") }
        let start = monotonicNanos()
        let end = start + UInt64(seconds * 1e9)
        var sent = 0
        while monotonicNanos() < end {
            let d = datagram(run: run, n: sent + 1)
            let n = d.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }  // blocks while journald is behind
            guard n == d.count else { throw BenchError("journald refused a record: \(errnoDescription(errno))") }
            sent += 1
        }
        // Until journald has stored the last one (or gives up on it).
        var stored = 0
        var done = monotonicNanos()
        for _ in 0..<300 {
            stored = try count(run: run)
            done = monotonicNanos()
            if stored >= sent { break }
            usleep(100_000)
        }
        return Result(sent: sent, stored: stored, seconds: Double(done - start) / 1e9)
    }

    static func count(run: String) throws -> Int {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/journalctl")
        p.arguments = ["-o", "json", "--no-pager", "--output-fields=KMSBENCH_N", "KMS_RUN_ID=\(run)"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return data.reduce(0) { $0 + ($1 == 10 ? 1 : 0) }
    }
}
