import Synchronization

/// Counts open connections in total and per uid, refusing those over the configured limits.
final class ConnectionLimits: Sendable {
    let maxTotal: Int
    let maxPerUID: Int
    private let counts = Mutex<(total: Int, perUID: [UInt32: Int])>((0, [:]))

    init(maxTotal: Int, maxPerUID: Int) {
        self.maxTotal = maxTotal
        self.maxPerUID = maxPerUID
    }

    /// Takes a slot for `uid`, or returns why not.
    func acquire(uid: UInt32) -> String? {
        counts.withLock { c in
            if c.total >= maxTotal { return "kmsd has \(c.total) connections, its maximum (maxConnections); retry later" }
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
