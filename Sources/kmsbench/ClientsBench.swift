import Foundation
import Glibc
import KMSProtocol
import Synchronization

/// Many clients (`kmsbench --many-clients`): one well-behaved client's latency alone, then
/// beside 2,000 connections making requests and 500 that sent half a frame and stalled; whether
/// kmsd drops the stalled ones after its frame timeout; and that connections over the per-uid
/// limit are refused with LimitExceededException.
enum ClientsBench {
    struct Result: Codable, Sendable {
        let active: Int
        let activeRequestsPerSecond: Double
        let stalled: Int
        let unloaded: TargetFigures
        let loaded: TargetFigures
        let stalledDroppedAfterTimeout: Int
        let frameTimeoutSeconds: Int
        let perUIDLimit: Int
        let refusedOverLimit: String

        var p99Ratio: Double { unloaded.p99Microseconds > 0 ? loaded.p99Microseconds / unloaded.p99Microseconds : 0 }

        func markdown() -> String {
            [
                "",
                "Many clients (audit off): \(active) connections making requests (\(String(format: "%.0f", activeRequestsPerSecond)) requests/s in all) and \(stalled) that sent half a frame and stalled",
                String(format: "- a well-behaved client (1 connection, 1 in flight): alone p50 %.0f µs, p99 %.0f µs; beside them p50 %.0f µs, p99 %.0f µs (p99 %.1f× unloaded; target ≤ 5×: %@)",
                       unloaded.p50Microseconds, unloaded.p99Microseconds, loaded.p50Microseconds, loaded.p99Microseconds, p99Ratio, p99Ratio <= 5 ? "met" : "NOT met"),
                "- stalled connections dropped by kmsd within its frame timeout (\(frameTimeoutSeconds) s) + 3 s: \(stalledDroppedAfterTimeout) of \(stalled)",
                "- \(perUIDLimit + 1) connections of one uid at once (maxConnectionsPerUid \(perUIDLimit)): \(refusedOverLimit)",
            ].joined(separator: "\n")
        }
    }

    static let active = 2000, stalled = 500, frameTimeout = 5

    static func run(executable: String, work: String, kmsdArguments: [String],
                    measure: (any BenchTarget, Scenario, Int32) throws -> LoadResult) throws -> Result {
        raiseDescriptorLimit()
        let perUID = active + stalled + 8
        let bench = try BenchDaemon.launch(executable: executable, workDirectory: work + "/clients", arguments: kmsdArguments + [
            "--dev-audit-off", "--max-connections", "\(perUID + 64)", "--max-connections-per-uid", "\(perUID)",
            "--admin-reserved-connections", "0", "--frame-timeout", "\(frameTimeout)", "--idle-timeout", "60",
        ])
        let daemon = bench.process
        defer { daemon.stop() }
        let target = try bench.target(.encrypt, plaintext: KMSBench.plaintext)
        let pid = daemon.pid
        let unloaded = try measure(target, Scenario.all[0], pid)

        // 500 connections that announce a 100-byte frame, send 10 bytes of it, and stall.
        progress("many clients: \(stalled) stalled connections, \(active) active ones")
        var stalledFDs: [Int32] = []
        defer { for fd in stalledFDs { close(fd) } }
        for _ in 0..<stalled {
            let fd = try UnixSocket.connect(to: daemon.socketPath)
            try UnixSocket.writeAll(fd, [0, 0, 0, 100] + [UInt8](repeating: 0x0a, count: 10))
            stalledFDs.append(fd)
        }
        let stalledAt = monotonicNanos()

        // 2,000 connections, each one Encrypt every 200 ms.
        let socketPath = daemon.socketPath
        let stop = StopSignal()
        let done = Atomic<Int>(0)
        let failures = Mutex<[String]>([])
        let latch = ThreadLatch()
        for _ in 0..<active {
            latch.enter()
            let thread = Thread {
                defer { latch.leave() }
                do {
                    let fd = try UnixSocket.connect(to: socketPath)
                    defer { close(fd) }
                    UnixSocket.setTimeouts(fd, seconds: 30)
                    var reader = FrameReader(fd: fd)
                    var frame: [UInt8] = []
                    var id = RequestFrames.firstID
                    usleep(useconds_t.random(in: 0..<200_000))
                    while !stop.isSet {
                        target.makeFrame(id: id, into: &frame)
                        try UnixSocket.writeAll(fd, frame)
                        let body = try reader.nextFrame()
                        _ = try target.answeredID(body: reader.buffer[body], position: id)
                        id += 1
                        done.add(1, ordering: .relaxed)
                        usleep(200_000)
                    }
                } catch {
                    failures.withLock { $0.append("\(error)") }
                    stop.set()
                }
            }
            thread.stackSize = 256 * 1024
            thread.start()
        }
        usleep(1_000_000)  // every active connection is up and in its rhythm
        let before = done.load(ordering: .relaxed), t0 = monotonicNanos()
        let loaded = try measure(target, Scenario.all[0], pid)
        let rate = Double(done.load(ordering: .relaxed) - before) / (Double(monotonicNanos() - t0) / 1e9)

        // The stalled connections: closed by kmsd once the frame timeout has passed.
        let waitUntil = stalledAt + UInt64(frameTimeout + 3) * 1_000_000_000
        LoadDriver.sleepUntil(waitUntil)
        var dropped = 0
        for fd in stalledFDs {
            var buffer = [UInt8](repeating: 0, count: 4096)
            var closed = false
            // kmsd may send an error frame first; then EOF.
            for _ in 0..<4 {
                let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
                if n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { closed = true; break }
                if n < 0 { break }
            }
            if closed { dropped += 1 }
        }
        stop.set()
        _ = latch.wait(seconds: 60)
        if let first = failures.withLock({ $0.first }) { throw BenchError("an active client failed: \(first)") }
        for fd in stalledFDs { close(fd) }
        stalledFDs = []

        // The per-uid limit: once kmsd has let go of the connections above (Status counts open
        // connections; this one included), fill it, then one more is refused with an error frame.
        let settled = monotonicNanos() + 30_000_000_000
        while monotonicNanos() < settled {
            if case .status(let st)? = try? daemon.call(.status(.init())), st.connections <= 1 { break }
            usleep(100_000)
        }
        var held: [Int32] = []
        defer { for fd in held { close(fd) } }
        var connectFailed = false
        for _ in 0..<(perUID + 1) {
            guard let fd = try? UnixSocket.connect(to: daemon.socketPath) else { connectFailed = true; break }
            held.append(fd)
        }
        // kmsd resolves each connection's credentials on its worker threads, so connections
        // made at once are admitted in the order their resolutions finish, not quite the order
        // of connect(2): whichever one is over the limit gets the error frame. So every
        // connection is watched, and the limit holds when exactly one is refused.
        var refusal = "connect failed"
        if !connectFailed {
            let over = refusals(held)
            refusal = over.refused == 0 ? "none of them refused"
                : "\(over.refused) of them refused, with \(Set(over.codes).sorted().joined(separator: ", "))"
        }
        return Result(active: active, activeRequestsPerSecond: rate, stalled: stalled, unloaded: TargetFigures(unloaded),
                      loaded: TargetFigures(loaded), stalledDroppedAfterTimeout: dropped, frameTimeoutSeconds: frameTimeout,
                      perUIDLimit: perUID, refusedOverLimit: refusal)
    }

    /// Watches `fds` (connections that sent nothing) for 5 s, or until 1 s after the first
    /// answer: the number of them answered with an error frame, and its codes.
    static func refusals(_ fds: [Int32]) -> (refused: Int, codes: [String]) {
        var waiting = Set(fds)
        var refused = 0
        var codes: [String] = []
        let deadline = monotonicNanos() + 5_000_000_000
        var quietAfter: UInt64? = nil
        while !waiting.isEmpty, monotonicNanos() < min(deadline, quietAfter ?? .max) {
            var polled = waiting.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            guard poll(&polled, nfds_t(polled.count), 100) > 0 else { continue }
            for p in polled where p.revents != 0 {
                waiting.remove(p.fd)
                UnixSocket.setTimeouts(p.fd, seconds: 2)
                var reader = FrameReader(fd: p.fd)
                if let range = try? reader.nextFrame(), let response = try? Kmsd_V1_Response(serializedBytes: Array(reader.buffer[range])),
                   case .error(let e)? = response.result {
                    refused += 1
                    codes.append(e.code)
                }
                if quietAfter == nil { quietAfter = monotonicNanos() + 1_000_000_000 }
            }
        }
        return (refused, codes)
    }

    /// Raises this process's descriptor limit to its hard limit (thousands of sockets).
    static func raiseDescriptorLimit() {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
    }
}

/// A long run (`kmsbench --soak SECONDS`): Encrypt with 32 in flight on fresh connections every
/// 10 s, kmsd's RSS and open descriptors sampled between; growth after the warm-up (the first
/// tenth of the run) is reported.
enum SoakBench {
    struct Sample: Codable, Sendable {
        let seconds: Double
        let requests: Int
        let rssKilobytes: Double
        let descriptors: Int
    }

    struct Result: Codable, Sendable {
        let samples: [Sample]
        var requests: Int { samples.last?.requests ?? 0 }
        var warm: Sample? { samples.first { $0.seconds >= (samples.last?.seconds ?? 0) / 10 } }
        var rssGrowth: Double {
            guard let w = warm, let last = samples.last, w.rssKilobytes > 0 else { return 0 }
            return (last.rssKilobytes - w.rssKilobytes) / w.rssKilobytes
        }

        func markdown() -> String {
            guard let first = samples.first, let w = warm, let last = samples.last else { return "soak: no samples" }
            return [
                "",
                String(format: "Soak (audit off): %d requests in %.0f s (%.0f/s), Encrypt 32 in flight on a new connection every 10 s", requests, last.seconds, Double(requests) / max(1, last.seconds)),
                String(format: "- kmsd RSS: %.1f MB at %.0f s (after warm-up), %.1f MB at the end: %+.1f%% (target < 10%%: %@)",
                       w.rssKilobytes / 1024, w.seconds, last.rssKilobytes / 1024, 100 * rssGrowth, rssGrowth < 0.1 ? "met" : "NOT met"),
                "- kmsd open descriptors: \(first.descriptors) before any load, \(w.descriptors) after warm-up, \(last.descriptors) at the end, at most \(samples.map(\.descriptors).max() ?? 0) (\(last.descriptors <= w.descriptors ? "no leak" : "GREW after warm-up"))",
            ].joined(separator: "\n")
        }
    }

    static func run(executable: String, work: String, seconds: Double, kmsdArguments: [String],
                    measure: (any BenchTarget, Scenario, Double, Int32) throws -> LoadResult) throws -> Result {
        let bench = try BenchDaemon.launch(executable: executable, workDirectory: work + "/soak", arguments: kmsdArguments + ["--dev-audit-off"])
        let daemon = bench.process
        defer { daemon.stop() }
        let target = try bench.target(.encrypt, plaintext: KMSBench.plaintext)
        let pid = daemon.pid
        let start = monotonicNanos()
        var samples: [Sample] = []
        var requests = 0
        func sample() {
            let (rss, _) = ScaleBench.memory(pid: pid)
            let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
            samples.append(Sample(seconds: Double(monotonicNanos() - start) / 1e9, requests: requests, rssKilobytes: rss, descriptors: fds))
        }
        sample()
        while Double(monotonicNanos() - start) / 1e9 < seconds {
            let r = try measure(target, Scenario.all[2], 10, pid)
            requests += r.completed
            sample()
            progress(String(format: "soak: %.0f s, %d requests, RSS %.1f MB, %d descriptors", samples.last!.seconds, requests,
                            samples.last!.rssKilobytes / 1024, samples.last!.descriptors))
        }
        return Result(samples: samples)
    }
}
