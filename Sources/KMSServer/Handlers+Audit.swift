import Foundation
import KMSCore
import KMSCrypto
import KMSProtocol

/// VerifyAuditRecords (beyond AWS): KMS_CHAIN checks for `kmsctl audit verify`.
enum AuditHandlers {
    static let maxRecords = 1000

    static func verifyAuditRecords(_ r: Kmsd_V1_VerifyAuditRecordsRequest, _ ctx: HandlerContext) throws(KMSError) -> Kmsd_V1_VerifyAuditRecordsResponse {
        let audit = ctx.audit
        guard r.records.count <= maxRecords else { throw KMSError(.validation, "at most \(maxRecords) records per request") }
        var valid: [Bool] = []
        valid.reserveCapacity(r.records.count)
        for record in r.records {
            guard record.previousChain.count == 32,
                  let claimed = record.fields.last(where: { $0.name == "KMS_CHAIN" }).flatMap({ Hex.decode($0.value) }),
                  let computed = audit.chainValue(previous: Array(record.previousChain), fields: record.fields.map { ($0.name, $0.value) })
            else { valid.append(false); continue }
            valid.append(ConstantTime.equals(claimed, computed))
        }
        let position = audit.chainPosition
        return .with {
            $0.valid = valid
            $0.currentRunID = audit.runID
            $0.currentSequence = position.sequence
        }
    }
}

extension AuditHandlers {
    /// Status (beyond AWS): health and use since kmsd started.
    static func status(_ ctx: HandlerContext) throws(KMSError) -> Kmsd_V1_StatusResponse {
        let metrics = ctx.metrics
        let snapshot = metrics.snapshot
        let repository = ctx.service.repository
        return .with { s in
            s.serverVersion = DaemonHandlers.serverVersion
            s.startedAt = Int64(metrics.started.timeIntervalSince1970)
            s.uptimeSeconds = UInt64(max(0, Date().timeIntervalSince(metrics.started)))
            s.keysByState = repository.keyCountsByState().mapValues { UInt64($0) }
            for (action, stats) in snapshot.sorted(by: { $0.key < $1.key }) {
                for (result, count) in stats.results.sorted(by: { $0.key < $1.key }) {
                    s.requests.append(.with { $0.action = action; $0.result = result; $0.count = count })
                }
                s.latencies.append(.with {
                    $0.action = action
                    $0.bucketUpperMicros = Metrics.bucketsMicros
                    $0.bucketCounts = stats.buckets
                    $0.sumMicros = stats.sumMicros
                    $0.count = stats.count
                })
            }
            s.latencyP50Micros = Metrics.percentile(0.5, of: snapshot) ?? 0
            s.latencyP99Micros = Metrics.percentile(0.99, of: snapshot) ?? 0
            s.keyCacheEntries = UInt64(repository.cachedKeys)
            s.keyCacheCapacity = UInt64(repository.cacheCapacity)
            s.connections = UInt64(max(0, metrics.connections.load(ordering: .relaxed)))
            s.auditRunID = ctx.audit.runID
            s.auditSequence = ctx.audit.lastSequence
            s.identityPolicies = UInt64(ctx.service.identityPolicies.policies.count)
            s.accessDecisionsReused = metrics.decisionsReused.load(ordering: .relaxed)
            s.alarms = ctx.alarms.counts
        }
    }
}
