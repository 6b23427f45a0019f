import Foundation
import Glibc
import KMSClient
import KMSProtocol
import Testing

/// kmsd as systemd's notify-type service: READY=1 once it serves, STATUS=, WATCHDOG=1 when a
/// watchdog is set, STOPPING=1 on SIGTERM; and a SIGTERM while a client has many requests in
/// flight answers every one of them in full before kmsd exits 0.
@Suite(.serialized)
struct LifecycleSignalTests {
    /// A datagram socket standing in for systemd's notification socket.
    final class NotifySocket {
        let path: String
        let fd: Int32
        init() throws {
            path = try Paths.tempDir("notify") + "/notify.sock"
            fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
            let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            guard rc == 0 else { throw DaemonError("bind \(path): errno \(errno)") }
            chmod(path, 0o666)
        }
        deinit { close(fd) }

        /// Messages until `until` is seen or `timeout` passes.
        func read(until predicate: (String) -> Bool, timeout: TimeInterval = 10) -> [String] {
            var messages: [String] = []
            let deadline = Date().addingTimeInterval(timeout)
            var buffer = [UInt8](repeating: 0, count: 4096)
            while Date() < deadline {
                var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&pfd, 1, 100) == 1 else { continue }
                let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                guard n > 0 else { continue }
                let m = String(decoding: buffer[0..<n], as: UTF8.self)
                messages.append(m)
                if predicate(m) { break }
            }
            return messages
        }
    }

    @Test func readinessWatchdogAndADrainingStop() throws {
        let notify = try NotifySocket()
        let dir = try Paths.tempDir("lifecycle")
        let socketPath = dir + "/state/kmsd.sock"
        let p = try ChildProcess(Paths.kmsd, ["--dev", "--state-dir", dir + "/state", "--admin-uid", "0", "--admin-uid", "\(getuid())"],
                                 env: ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "300000"], stdout: dir + "/log", stderr: dir + "/log")
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL); _ = p.waitUntilExit() } }
        let ready = notify.read { $0.contains("READY=1") }
        #expect(ready.contains { $0.contains("READY=1") && $0.contains("STATUS=") }, "\(ready)")
        // READY=1 means serving: the socket takes a request at once.
        let raw = try RawConnection(path: socketPath)
        try raw.send(.with(id: 1, .hello(.init())))
        #expect(try raw.receive()?.id == 1)
        // A watchdog keep-alive comes at half the interval.
        let beats = notify.read(until: { $0.contains("WATCHDOG=1") }, timeout: 2)
        #expect(beats.contains { $0.contains("WATCHDOG=1") }, "\(beats)")

        // Many requests pipelined, then SIGTERM (PROTOCOL §2): kmsd stops reading; every request
        // it had read is answered in full (done, or ThrottlingException: not done, retry), none
        // twice and none half; the ones it never read get no answer; then the connection closes
        // cleanly and kmsd exits 0.
        let n = 300
        for id in 2..<(2 + n) { try raw.send(.with(id: UInt64(id), .generateRandom(.with { $0.numberOfBytes = 32 }))) }
        kill(p.processIdentifier, SIGTERM)
        var answered = Set<UInt64>()
        var done = 0
        /// The next whole frame; nil at a clean end; a frame cut short is an issue.
        func nextFrame() throws -> KMSResponse? {
            var bytes: [UInt8] = []
            func fill(_ count: Int) -> Bool {
                var chunk = [UInt8](repeating: 0, count: count - bytes.count)
                while bytes.count < count {
                    let r = chunk.withUnsafeMutableBytes { recv(raw.fd, $0.baseAddress, count - bytes.count, 0) }
                    if r <= 0 { return false }
                    bytes += chunk[0..<r]
                }
                return true
            }
            guard fill(4) else {
                #expect(bytes.isEmpty, "a frame header cut short")
                return nil
            }
            let n = Int(bytes[0]) << 24 | Int(bytes[1]) << 16 | Int(bytes[2]) << 8 | Int(bytes[3])
            guard fill(4 + n) else {
                Issue.record("a frame cut short: \(bytes.count - 4) of \(n) bytes")
                return nil
            }
            return try KMSResponse(serializedBytes: Array(bytes[4...]))
        }
        while let r = try nextFrame() {
            #expect((2..<UInt64(2 + n)).contains(r.id) && answered.insert(r.id).inserted, "id \(r.id) unexpected or twice")
            switch r.result {
            case .generateRandom(let g)?: #expect(g.plaintext.count == 32); done += 1
            case .error(let e)?: #expect(e.code == "ThrottlingException", "\(e.code)")
            default: Issue.record("answer \(r.id) is neither")
            }
        }
        // kmsd reads in order, so what it read, and answered, is a prefix of what was sent.
        #expect(!answered.isEmpty && answered == Set(2..<UInt64(2 + answered.count)), "\(answered.count) answered, not a prefix")
        #expect(done > 0)
        #expect(p.waitUntilExit() == 0)
        let stopping = notify.read(until: { $0.contains("STOPPING=1") }, timeout: 2)
        #expect(stopping.contains { $0.contains("STOPPING=1") }, "\(stopping)")
    }

    /// The drain has a deadline (drainTimeoutSeconds): a request that cannot finish (its
    /// keystore write waits on a lock another process holds) does not keep kmsd from stopping;
    /// kmsd says how many it left unanswered and still exits 0.
    @Test func theDrainStopsWaitingAtItsDeadline() throws {
        let dir = try Paths.tempDir("drain")
        try #"{"drainTimeoutSeconds": 1}"#.write(toFile: dir + "/kmsd.json", atomically: true, encoding: .utf8)
        chmod(dir + "/kmsd.json", 0o600)
        let notify = try NotifySocket()
        let p = try ChildProcess(Paths.kmsd, ["--dev", "--state-dir", dir + "/state", "--config", dir + "/kmsd.json", "--admin-uid", "\(getuid())"],
                                 env: ["NOTIFY_SOCKET": notify.path], stdout: dir + "/log", stderr: dir + "/log")
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL); _ = p.waitUntilExit() } }
        #expect(notify.read { $0.contains("READY=1") }.contains { $0.contains("READY=1") })
        // Another process holds the keystore's write lock for 3 s (kmsd waits up to 5 s for it).
        let holder = try ChildProcess("/usr/bin/python3", ["-c", """
            import sqlite3, sys, time
            c = sqlite3.connect(sys.argv[1], isolation_level=None)
            c.execute("BEGIN EXCLUSIVE")
            print("locked", flush=True)
            time.sleep(3)
            c.execute("COMMIT")
            """, dir + "/state/keystore.sqlite3"], stdout: dir + "/holder", stderr: dir + "/holder")
        defer { _ = holder.waitUntilExit() }
        for _ in 0..<100 where (try? String(contentsOfFile: dir + "/holder", encoding: .utf8))?.contains("locked") != true { usleep(20_000) }
        let raw = try RawConnection(path: dir + "/state/kmsd.sock", receiveTimeoutSeconds: 10)
        try raw.send(.with(id: 1, .createKey(.init())))
        usleep(300_000)  // the CreateKey is in flight, waiting for the lock
        let sent = Date()
        kill(p.processIdentifier, SIGTERM)
        for _ in 0..<100 where !((try? String(contentsOfFile: dir + "/log", encoding: .utf8))?.contains("drain deadline") ?? false) { usleep(20_000) }
        let waited = Date().timeIntervalSince(sent)
        let log = (try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? ""
        #expect(log.contains("drain deadline (1 s) passed with 1 requests unanswered"), "\(log.suffix(500))")
        #expect(waited < 2.5, "the drain gave up after about 1 s, not when the lock was released (\(waited) s)")
        #expect(p.waitUntilExit() == 0)
    }
}
