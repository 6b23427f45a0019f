import Foundation
import Glibc
import KMSClient
import Testing

/// Limits that keep one client from hurting others: request rate, frame timeout, reserved
/// administrator connections, and a fair share of the event loop.
@Suite(.serialized)
struct LimitsTests {
    @Test func aUIDOverItsRateIsThrottledAndKeepsItsConnection() throws {
        let daemon = try Daemon(arguments: ["--max-requests-per-second-per-uid", "20", "--request-burst-per-uid", "20"])
        defer { daemon.stop() }
        let raw = try RawConnection(path: daemon.socket)
        for id in 1...100 { try raw.send(.with(id: UInt64(id), .generateRandom(.with { $0.numberOfBytes = 4 }))) }
        var throttled = Set<UInt64>(), served = 0
        for _ in 1...100 {
            let r = try #require(try raw.receive())
            if r.kmsError?.code == .throttling { throttled.insert(r.id) } else if r.kmsError == nil { served += 1 }
        }
        // The burst (and whatever refilled meanwhile) is served; the rest is throttled, each
        // with its own id.
        #expect(served >= 20 && served < 60, "served \(served)")
        #expect(throttled.count == 100 - served && !throttled.contains(0))
        sleep(1)
        try raw.send(.with(id: 500, .hello(.init())))
        let after = try #require(try raw.receive())
        #expect(after.id == 500 && after.kmsError == nil, "the bucket refills and the connection stayed open")
    }

    @Test func aFrameTrickledSlowerThanTheFrameTimeoutIsCut() throws {
        let daemon = try Daemon(arguments: ["--frame-timeout", "1"])
        defer { daemon.stop() }
        // Idle between frames is fine (the idle timeout is longer)...
        let patient = try RawConnection(path: daemon.socket)
        sleep(2)
        try patient.send(.with(id: 1, .hello(.init())))
        #expect(try patient.receive()?.id == 1)
        // ...but a frame whose bytes trickle in one at a time is cut after the frame timeout.
        let slow = try RawConnection(path: daemon.socket, receiveTimeoutSeconds: 5)
        let frame = RawConnection.frame(try KMSRequest.with(id: 2, .hello(.init())).serializedBytes())
        let start = Date()
        var closed = false
        for byte in frame.prefix(frame.count - 1) {
            if !slow.trySend([byte]) { closed = true; break }
            usleep(300_000)
            if Date().timeIntervalSince(start) > 3 { break }
        }
        #expect(closed || slow.isClosedByPeer(), "still open after \(Date().timeIntervalSince(start)) s")
        #expect(Date().timeIntervalSince(start) < 3.5)
        #expect(daemon.process.isRunning)
    }

    @Test(.enabled(if: isRoot, "needs root to act as an administrator uid with setpriv"))
    func reservedConnectionsKeepAdministratorsIn() throws {
        // Here the test's own uid is an ordinary user; uid 64101 administers.
        let daemon = try Daemon(arguments: ["--admin-uid", "64101", "--max-connections", "8", "--admin-reserved-connections", "3"])
        defer { daemon.stop() }
        var held: [RawConnection] = []
        for i in 1...5 {
            let c = try RawConnection(path: daemon.socket)
            try c.send(.with(id: UInt64(i), .hello(.init())))
            #expect(try c.receive()?.id == UInt64(i))
            held.append(c)
        }
        let refused = try RawConnection(path: daemon.socket)
        let answer = try #require(try refused.receive())
        #expect(answer.kmsError?.code == .limitExceeded && answer.kmsError?.message.contains("reserved for administrators") == true)
        let admin = try runAs(uid: 64101, [Paths.kmsctl, "whoami", "--json"], env: ["KMSD_SOCKET": daemon.socket])
        #expect(admin.status == 0, "an administrator still gets in: \(admin.stderr)")
        _ = held
    }

    /// A flooder pipelining cheap requests on connections on every event loop; a victim's Hello,
    /// on a connection that shares a loop with them, is still answered within 10 ms at the
    /// 99th percentile. (As root, kmsd runs where no journald is reachable, audit fail-open: a
    /// journald ingesting the flood would take a core of its own on this 2-core machine, and the
    /// test would measure the CPU scheduler instead of kmsd's event loops.) The kmsd measured is
    /// the release build `make test` makes (KMSD_RELEASE_BIN), as it ships; the debug build of
    /// the tests stalls its loop for 10-60 ms at times under this flood (debug code only), and
    /// is used only where no release build was given.
    @Test func aPipeliningFloodDoesNotStarveAnotherConnection() throws {
        let kmsd = ProcessInfo.processInfo.environment["KMSD_RELEASE_BIN"] ?? Paths.kmsd
        print("fairness: measuring \(kmsd)")
        let dir = try Paths.tempDir("fair")
        let socket = dir + "/state/kmsd.sock"
        // One event loop: the flood and the victim share it.
        let args = ["--dev", "--state-dir", dir + "/state", "--audit-fail-closed", "false", "--max-requests-per-second-per-uid", "0", "--event-loops", "1",
                    "--admin-uid", "0", "--admin-uid", "\(getuid())"]
        let p = isRoot
            ? try launchKMSD("/usr/bin/unshare", ["-m", "--propagation", "private", "/bin/sh", "-c",
                                                  "mount -t tmpfs tmpfs /run/systemd/journal && exec \"$0\" \"$@\"", kmsd] + args, log: dir + "/log")
            : try launchKMSD(kmsd, args, log: dir + "/log")
        defer { kill(p.processIdentifier, SIGTERM); p.waitUntilExit() }
        let stop = Shared(false)
        let flooded = Shared(0)
        let conns = try (0..<4).map { _ in try RawConnection(path: socket) }
        let flooder = Thread {
            // The flooder thread yields the CPU to everything else (nice 19): kmsd's event loop
            // stays saturated by its requests, but on this 2-core machine the victim's wake-ups
            // do not wait for the flooder's time slice.
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 19)  // 0: this thread, on Linux
            let batch = (1...64).flatMap { id in
                RawConnection.frame((try? KMSRequest.with(id: UInt64(id), .whoAmI(.init())).serializedBytes()) ?? [])
            }
            while !stop.load() {
                for c in conns { guard c.trySend(batch) else { return } }
                for c in conns { guard c.skipFrames(64) else { return } }
                flooded.add(64 * conns.count)
            }
        }
        flooder.start()
        defer { stop.store(true) }
        usleep(300_000)
        let victim = try RawConnection(path: socket)
        var nextID: UInt64 = 1
        /// 1000 Hellos, one every 2 ms: their latencies (ms, sorted) and the flood meanwhile;
        /// and, over the same time, how late a thread of this process that only sleeps 2 ms at
        /// a time wakes up (ms, sorted): the delay this machine itself adds to any wake-up.
        func measure() throws -> (latencies: [Double], machine: [Double], during: Int) {
            let done = Shared(false), lateness = Shared<[Double]>([])
            let control = Thread {
                var late: [Double] = []
                while !done.load() {
                    let t0 = DispatchTime.now().uptimeNanoseconds
                    usleep(2_000)
                    late.append(max(0, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6 - 2))
                }
                lateness.store(late.sorted())
            }
            control.start()
            var latencies: [Double] = []
            let before = flooded.load()
            for _ in 1...1000 {
                let t0 = DispatchTime.now().uptimeNanoseconds
                try victim.send(.with(id: nextID, .hello(.init())))
                #expect(try victim.receive()?.id == nextID)
                nextID += 1
                latencies.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e6)
                usleep(2_000)
            }
            done.store(true)
            while lateness.load().isEmpty { usleep(1_000) }
            return (latencies.sorted(), lateness.load(), flooded.load() - before)
        }
        // Up to three windows: the sleeping thread shows when the machine itself was slow to wake
        // anyone. A loop that lets a flood starve a connection misses every window.
        var p99 = Double.infinity
        for attempt in 1...3 where p99 > 10 {
            let (latencies, machine, during) = try measure()
            p99 = latencies[latencies.count * 99 / 100]
            let machineP99 = machine[machine.count * 99 / 100]
            print("fairness (window \(attempt)): victim Hello p50 \(latencies[latencies.count / 2]) ms, p95 \(latencies[latencies.count * 95 / 100]) ms, p99 \(p99) ms, max \(latencies.last!) ms; a sleeping thread's wake-up p99 \(machineP99) ms late; during \(during) flood requests")
            #expect(during > 2_000, "the flood ran (\(during) requests while the victim was measured)")
        }
        stop.store(true)
        #expect(p99 <= 10, "victim p99 \(p99) ms in each of three windows of 1000 Hellos during the flood")
    }
}

/// A small lock-protected value for test threads.
final class Shared<T: Sendable>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ v: T) { value = v }
    func load() -> T { lock.withLock { value } }
    func store(_ v: T) { lock.withLock { value = v } }
    func update(_ change: (inout T) -> Void) { lock.withLock { change(&value) } }
}

extension Shared where T == Int {
    func add(_ n: Int) { lock.withLock { value += n } }
}
