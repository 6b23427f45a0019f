import Foundation
import Glibc
import KMSProtocol
import Synchronization

/// The transport baseline ("how fast can a Unix socket carry these frames"): a server that
/// answers every 4-byte-length frame with the same frame. Blocking POSIX sockets, one thread
/// per connection (no epoll round trip per request); no protobuf, no crypto, no allocation per
/// frame: C speed. Runs in a process of its own
/// (`EchoProcess`), so its CPU time is measured as kmsd's is.
///
/// Sendable: every stored property is immutable or thread-safe.
final class EchoServer: @unchecked Sendable {
    /// A connection that sends nothing for this long is closed.
    static let idleSeconds = 30

    let path: String
    private let listenFD: Int32
    private let stopping = Atomic<Bool>(false)
    private let acceptLoop = ThreadLatch()
    private let connections = ThreadLatch()

    init(path: String) throws {
        self.path = path
        self.listenFD = try UnixSocket.listen(at: path)
    }

    func start() {
        acceptLoop.enter()
        let thread = Thread { [self] in
            self.acceptConnections()
            self.acceptLoop.leave()
        }
        thread.name = "kmsbench-echo-accept"
        thread.start()
    }

    /// Stops accepting, removes the socket file and waits (bounded) for open connections to end.
    func stop() {
        stopping.store(true, ordering: .relaxed)
        // Wake the blocked accept(): it sees `stopping` and returns.
        if let fd = try? UnixSocket.connect(to: path) { close(fd) }
        if !acceptLoop.wait(seconds: 5) {
            _ = shutdown(listenFD, Int32(SHUT_RDWR))
            _ = acceptLoop.wait(seconds: 2)
        }
        close(listenFD)
        unlink(path)
        _ = connections.wait(seconds: Double(EchoServer.idleSeconds + 5))
    }

    private func acceptConnections() {
        while !stopping.load(ordering: .relaxed) {
            let fd = accept(listenFD, nil, nil)
            if fd < 0 {
                let e = errno
                if e == EINTR || e == ECONNABORTED { continue }
                return  // shut down, or out of resources
            }
            if stopping.load(ordering: .relaxed) {
                close(fd)
                return
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            UnixSocket.setTimeouts(fd, seconds: EchoServer.idleSeconds)
            let latch = connections
            latch.enter()
            let thread = Thread {
                EchoServer.echoFrames(fd: fd)
                close(fd)
                latch.leave()
            }
            thread.name = "kmsbench-echo-conn"
            thread.start()
        }
    }

    /// Reads frames and writes each complete frame back unchanged, until the client closes,
    /// goes quiet for `idleSeconds`, or sends a bad length. Frames that arrived together are
    /// written back with one write(2), as an event-loop server flushes them together.
    static func echoFrames(fd: Int32) {
        var reader = FrameReader(fd: fd, waitsInPoll: false)
        while let frames = try? reader.completeFrames() {
            let written = reader.buffer.withUnsafeBytes { p in
                (try? UnixSocket.writeAll(fd, UnsafeRawBufferPointer(rebasing: p[frames]))) != nil
            }
            guard written else { return }
        }
    }
}

/// The echo server in a child process (`kmsbench --echo-server PATH`): it serves until its
/// stdin closes, so it never outlives kmsbench.
final class EchoProcess {
    let path: String
    private let process = Process()
    private let stdin = Pipe()

    init(path: String) { self.path = path }

    var pid: Int32 { process.processIdentifier }

    func start() throws {
        var buffer = [CChar](repeating: 0, count: 4097)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { throw BenchError("cannot read /proc/self/exe") }
        process.executableURL = URL(fileURLWithPath: String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self))
        process.arguments = ["--echo-server", path]
        process.standardInput = stdin
        try process.run()
        let deadline = monotonicNanos() + 10_000_000_000
        while monotonicNanos() < deadline {
            if let fd = try? UnixSocket.connect(to: path) { close(fd); return }
            guard process.isRunning else { break }
            usleep(20_000)
        }
        throw BenchError("the echo server did not start on \(path)")
    }

    func stop() {
        try? stdin.fileHandleForWriting.close()
        let deadline = monotonicNanos() + 10_000_000_000
        while process.isRunning && monotonicNanos() < deadline { usleep(20_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    /// The child's side: serve until stdin reaches EOF.
    static func serve(path: String) throws {
        let server = try EchoServer(path: path)
        server.start()
        var byte: UInt8 = 0
        while read(0, &byte, 1) > 0 {}
        server.stop()
    }
}
