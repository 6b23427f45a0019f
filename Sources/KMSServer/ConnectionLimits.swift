import Glibc
import KMSCore
import Synchronization

/// Counts open connections in total and per uid, refusing those over the configured limits.
/// The last `reservedForAdministrators` connections go only to administrators, so other users
/// filling the daemon cannot lock out the people who must fix it.
final class ConnectionLimits: Sendable {
    let maxTotal: Int
    let maxPerUID: Int
    let reservedForAdministrators: Int
    private let counts = Mutex<(total: Int, perUID: [UInt32: Int])>((0, [:]))

    init(maxTotal: Int, maxPerUID: Int, reservedForAdministrators: Int = 0) {
        self.maxTotal = maxTotal
        self.maxPerUID = maxPerUID
        self.reservedForAdministrators = reservedForAdministrators
    }

    /// Takes a slot for `uid`, or returns why not.
    func acquire(uid: UInt32, isAdministrator: Bool = false) -> String? {
        counts.withLock { c in
            if c.total >= maxTotal { return "kmsd has \(c.total) connections, its maximum (maxConnections); retry later" }
            if !isAdministrator, c.total >= maxTotal - reservedForAdministrators {
                return "kmsd has \(c.total) connections; the remaining \(maxTotal - c.total) are reserved for administrators (adminReservedConnections); retry later"
            }
            if c.perUID[uid, default: 0] >= maxPerUID {
                return "uid \(uid) has \(maxPerUID) connections open, the per-uid maximum (maxConnectionsPerUid); reuse a connection"
            }
            c.total += 1
            c.perUID[uid, default: 0] += 1
            return nil
        }
    }

    func release(uid: UInt32) {
        counts.withLock { c in
            c.total -= 1
            let n = c.perUID[uid, default: 1] - 1
            c.perUID[uid] = n == 0 ? nil : n
        }
    }

    var total: Int { counts.withLock { $0.total } }
}

/// A token bucket per uid: `rate` requests per second on average, `burst` at once. Buckets
/// that have refilled are forgotten, so memory follows the uids active in the last seconds.
final class RequestRateLimiter: Sendable {
    private struct Bucket { var tokens: Double; var updated: UInt64 }
    private struct State { var rate: Double; var burst: Double; var buckets: [UInt32: Bucket] = [:] }
    private let state: Mutex<State>
    /// Read without the lock, so an unlimited kmsd pays nothing per request.
    private let on: Atomic<Bool>

    /// `rate` 0 disables the limit; `burst` 0 means one second's worth.
    init(rate: Int, burst: Int) {
        state = Mutex(State(rate: Double(rate), burst: Double(burst > 0 ? burst : rate)))
        on = Atomic(rate > 0)
    }

    var enabled: Bool { on.load(ordering: .relaxed) }
    var rate: Double { state.withLock { $0.rate } }

    /// New limits (SIGHUP); every uid starts again with a full bucket.
    func set(rate: Int, burst: Int) {
        state.withLock { $0 = State(rate: Double(rate), burst: Double(burst > 0 ? burst : rate)) }
        on.store(rate > 0, ordering: .relaxed)
    }

    /// Takes one token for `uid`; false when its bucket is empty.
    func allow(uid: UInt32) -> Bool {
        guard enabled else { return true }
        let now = Self.nowNanoseconds()
        return state.withLock { s in
            guard s.rate > 0 else { return true }
            let (rate, burst) = (s.rate, s.burst)
            var bucket = s.buckets[uid] ?? Bucket(tokens: burst, updated: now)
            let elapsed = Double(now &- bucket.updated) / 1e9
            bucket.tokens = min(burst, bucket.tokens + elapsed * rate)
            bucket.updated = now
            let allowed = bucket.tokens >= 1
            if allowed { bucket.tokens -= 1 }
            s.buckets[uid] = bucket
            if s.buckets.count > 4096 {
                s.buckets = s.buckets.filter { Double(now &- $0.value.updated) / 1e9 * rate + $0.value.tokens < burst }
            }
            return allowed
        }
    }

    static func nowNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

/// Per uid, which throttled requests get a record of their own (the first in each second) and
/// how many more there were, for one summary record per uid per second.
final class ThrottleLog: Sendable {
    struct Summary: Sendable {
        let principal: Principal
        let count: Int
    }

    private struct Window {
        var second: UInt64
        var principal: Principal
        var suppressed: Int
    }

    private let windows = Mutex<[UInt32: Window]>([:])

    /// Notes a throttled request: whether to record it individually, and any summaries of
    /// earlier seconds of this uid that are now complete.
    func note(uid: UInt32, principal: Principal) -> (recordThis: Bool, summaries: [Summary]) {
        let second = RequestRateLimiter.nowNanoseconds() / 1_000_000_000
        return windows.withLock { w in
            if var window = w[uid], window.second == second {
                window.suppressed += 1
                window.principal = principal
                w[uid] = window
                return (false, [])
            }
            let ended = w[uid].flatMap { $0.suppressed > 0 ? Summary(principal: $0.principal, count: $0.suppressed) : nil }
            w[uid] = Window(second: second, principal: principal, suppressed: 0)
            return (true, ended.map { [$0] } ?? [])
        }
    }

    /// Summaries of every second that has ended, forgetting those windows.
    func flush() -> [Summary] {
        let second = RequestRateLimiter.nowNanoseconds() / 1_000_000_000
        return windows.withLock { w in
            var out: [Summary] = []
            for (uid, window) in w where window.second < second {
                if window.suppressed > 0 { out.append(Summary(principal: window.principal, count: window.suppressed)) }
                w[uid] = nil
            }
            return out
        }
    }
}
