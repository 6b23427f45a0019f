import Foundation
import Glibc
import KMSProtocol
import Synchronization

/// kmsd with very many keys (`kmsbench --scale N`): how fast they are created, how long a
/// restart takes to READY, the daemon's memory, Encrypt across random keys once warm, and
/// ListKeys through all of them.
enum ScaleBench {
    struct Result: Codable, Sendable {
        let keys: Int
        /// nil when the work directory already held the keys.
        let createSeconds: Double?
        let readySeconds: Double
        let rssMegabytes: Double
        let lockedKilobytes: Double
        let keyCacheCapacity: Int
        let randomKeys: Int
        let randomKeyEncrypt: TargetFigures
        let sameKeyEncrypt: TargetFigures
        let listedKeys: Int
        let listSeconds: Double

        func markdown() -> String {
            var lines = ["", "Scale (audit off): \(keys) keys"]
            if let createSeconds {
                lines.append(String(format: "- created through CreateKey in %.0f s (%.0f keys/s, 4 connections × 64 in flight)", createSeconds, Double(keys) / max(createSeconds, 0.001)))
            } else {
                lines.append("- the keys were already in the work directory's keystore (created by an earlier run)")
            }
            lines.append(String(format: "- restart to ready: %.2f s; then RSS %.0f MB, locked %.0f kB (key cache capacity %d keys)", readySeconds, rssMegabytes, lockedKilobytes, keyCacheCapacity))
            lines.append(String(format: "- Encrypt, 1 connection, 32 in flight: same key %.0f ops/s (%.1f µs kmsd CPU/op); random keys among %d (all cacheable), warm: %.0f ops/s (%.1f µs kmsd CPU/op, p99 %.0f µs)",
                                sameKeyEncrypt.opsPerSecond, sameKeyEncrypt.cpuMicrosecondsPerOperation ?? 0, randomKeys,
                                randomKeyEncrypt.opsPerSecond, randomKeyEncrypt.cpuMicrosecondsPerOperation ?? 0, randomKeyEncrypt.p99Microseconds))
            lines.append(String(format: "- ListKeys (1000 per page) through all: %d keys in %.1f s", listedKeys, listSeconds))
            return lines.joined(separator: "\n")
        }
    }

    static func run(executable: String, work: String, keys: Int, kmsdArguments: [String],
                    measure: (any BenchTarget, Scenario, Int32) throws -> LoadResult) throws -> Result {
        let dir = work + "/scale"
        mkdir(dir, 0o700)
        var daemon = KMSDProcess(executable: executable, workDirectory: dir, extraArguments: kmsdArguments + ["--dev-audit-off"])
        try daemon.start()
        try daemon.waitUntilListening(timeoutSeconds: 120)
        // A work directory (--work-dir) that already holds the keys is used as it is.
        var ids = try listAll(daemon)
        var createSeconds: Double? = nil
        if ids.count < keys {
            progress("scale: creating \(keys - ids.count) keys")
            let createStart = monotonicNanos()
            ids += try createKeys(socketPath: daemon.socketPath, count: keys - ids.count)
            createSeconds = Double(monotonicNanos() - createStart) / 1e9
        }
        progress("scale: \(ids.count) keys; restarting kmsd")
        daemon.stop()

        daemon = KMSDProcess(executable: executable, workDirectory: dir, extraArguments: kmsdArguments + ["--dev-audit-off"])
        let started = monotonicNanos()
        try daemon.start()
        defer { daemon.stop() }
        let readySeconds = try daemon.waitUntilReady(timeoutSeconds: 120, since: started)
        progress(String(format: "scale: ready after %.2f s", readySeconds))

        let pid = daemon.pid
        let plaintext = KMSBench.plaintext
        let same = try BenchDaemon(audit: false, process: daemon, key: ids[0]).target(.encrypt, plaintext: plaintext)
        let sameResult = try measure(same, Scenario.all[2], pid)
        // Random keys from a set the key cache can hold (--kmsd-arg=--key-cache-capacity=N), so
        // that "warm" means cached: at most the cache's capacity (as kmsd reports it) and at
        // most 100,000.
        guard case .status(let status) = try daemon.call(.status(.init())) else { throw BenchError("Status: unexpected answer") }
        let cacheCapacity = Int(status.keyCacheCapacity)
        let sampleSize = min(ids.count, 100_000, cacheCapacity)
        let sample = Array(ids.shuffled().prefix(sampleSize))
        let random = try RandomKeyTarget(socketPath: daemon.socketPath, keyIDs: sample, plaintext: plaintext)
        progress("scale: warming \(sample.count) keys (one Encrypt each)")
        try touchAll(socketPath: daemon.socketPath, keyIDs: sample, plaintext: plaintext)
        let randomResult = try measure(random, Scenario.all[2], pid)
        let (rss, locked) = memory(pid: pid)

        progress("scale: ListKeys through all keys")
        let listStart = monotonicNanos()
        let listed = try listAll(daemon).count
        let listSeconds = Double(monotonicNanos() - listStart) / 1e9
        guard listed == ids.count else { throw BenchError("ListKeys listed \(listed) keys, \(ids.count) were created") }
        return Result(keys: ids.count, createSeconds: createSeconds, readySeconds: readySeconds, rssMegabytes: rss / 1024,
                      lockedKilobytes: locked, keyCacheCapacity: cacheCapacity, randomKeys: sample.count,
                      randomKeyEncrypt: TargetFigures(randomResult), sameKeyEncrypt: TargetFigures(sameResult),
                      listedKeys: listed, listSeconds: listSeconds)
    }

    /// VmRSS and VmLck of a process, in kB.
    static func memory(pid: Int32) -> (rss: Double, locked: Double) {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return (0, 0) }
        func field(_ name: String) -> Double {
            guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix(name + ":") }) else { return 0 }
            return Double(line.split(separator: " ").dropFirst().first { !$0.isEmpty }.map(String.init) ?? "0") ?? 0
        }
        return (field("VmRSS"), field("VmLck"))
    }

    /// CreateKey `count` times over 4 connections, 64 in flight each; the key ids.
    static func createKeys(socketPath: String, count: Int) throws -> [String] {
        let connections = 4, window = 64
        let next = Atomic<Int>(0)
        let results = Mutex<(ids: [String], failure: String?)>(([], nil))
        let latch = ThreadLatch()
        for _ in 0..<connections {
            latch.enter()
            Thread {
                defer { latch.leave() }
                do {
                    let fd = try UnixSocket.connect(to: socketPath)
                    defer { close(fd) }
                    UnixSocket.setTimeouts(fd, seconds: 60)
                    var reader = FrameReader(fd: fd)
                    var outstanding = 0, mine: [String] = []
                    var id: UInt64 = 1
                    while true {
                        while outstanding < window, next.add(1, ordering: .relaxed).oldValue < count {
                            var request = Kmsd_V1_Request()
                            request.id = id
                            id += 1
                            request.operation = .createKey(.with { $0.description_p = "kmsbench scale" })
                            try UnixSocket.writeAll(fd, lengthPrefixed(try request.serializedBytes()))
                            outstanding += 1
                        }
                        if outstanding == 0 { break }
                        let range = try reader.nextFrame()
                        let response = try Kmsd_V1_Response(serializedBytes: Array(reader.buffer[range]))
                        guard case .createKey(let r)? = response.result else { throw BenchError("CreateKey failed: \(response.result.map { "\($0)" } ?? "no result")") }
                        mine.append(r.keyMetadata.keyID)
                        outstanding -= 1
                    }
                    results.withLock { $0.ids += mine }
                } catch {
                    results.withLock { $0.failure = "\(error)" }
                }
            }.start()
        }
        _ = latch.wait(seconds: 24 * 3600)
        let (ids, failure) = results.withLock { ($0.ids, $0.failure) }
        if let failure { throw BenchError("scale: \(failure)") }
        return ids
    }

    /// One Encrypt under each key (64 in flight on one connection), so each is cached.
    static func touchAll(socketPath: String, keyIDs: [String], plaintext: [UInt8]) throws {
        let fd = try UnixSocket.connect(to: socketPath)
        defer { close(fd) }
        UnixSocket.setTimeouts(fd, seconds: 60)
        var reader = FrameReader(fd: fd)
        var next = 0, outstanding = 0
        while next < keyIDs.count || outstanding > 0 {
            while outstanding < 64, next < keyIDs.count {
                let request = BenchOperation.encrypt.request(id: UInt64(next + 1), keyID: keyIDs[next], plaintext: plaintext, blob: [])
                try UnixSocket.writeAll(fd, lengthPrefixed(try request.serializedBytes()))
                next += 1
                outstanding += 1
            }
            let range = try reader.nextFrame()
            let response = try Kmsd_V1_Response(serializedBytes: Array(reader.buffer[range]))
            guard case .encrypt? = response.result else { throw BenchError("warming: Encrypt failed") }
            outstanding -= 1
        }
    }

    /// Every key id, page by page (1000 per page).
    static func listAll(_ daemon: KMSDProcess) throws -> [String] {
        var marker = "", listed: [String] = []
        repeat {
            guard case .listKeys(let r) = try daemon.call(.listKeys(.with { $0.limit = 1000; $0.marker = marker })) else {
                throw BenchError("ListKeys: unexpected answer")
            }
            listed += r.keys.map(\.keyID)
            marker = r.truncated ? r.nextMarker : ""
        } while !marker.isEmpty
        return listed
    }
}

/// Encrypt requests each naming a key drawn at random from a list.
struct RandomKeyTarget: BenchTarget {
    let name = "kmsd random keys"
    let socketPath: String
    let operations: [[UInt8]]

    init(socketPath: String, keyIDs: [String], plaintext: [UInt8]) throws {
        self.socketPath = socketPath
        operations = try keyIDs.map { id in try RequestFrames.operationBytes { BenchOperation.encrypt.request(id: $0, keyID: id, plaintext: plaintext, blob: []) } }
    }

    func makeFrame(id: UInt64, into frame: inout [UInt8]) {
        RequestFrames.build(id: id, operationBytes: operations[Int.random(in: 0..<operations.count)], into: &frame)
    }

    func answeredID(body: ArraySlice<UInt8>, position: UInt64) throws -> UInt64 {
        try KMSDTarget.answeredID(body: body, operation: .encrypt)
    }
}
