import Foundation
import KMSCore
import KMSCrypto
import KMSProtocol

/// VerifyAuditRecords (beyond AWS): KMS_CHAIN checks for `kmsctl audit verify`.
enum AuditHandlers {
    static let maxRecords = 1000

    static func verifyAuditRecords(_ r: Kmsd_V1_VerifyAuditRecordsRequest, _ ctx: HandlerContext) throws(KMSError) -> Kmsd_V1_VerifyAuditRecordsResponse {
        guard let audit = ctx.audit else { throw KMSError(.unsupportedOperation, "this server keeps no audit chain") }
        guard r.records.count <= maxRecords else { throw KMSError(.validation, "at most \(maxRecords) records per request") }
        var valid: [Bool] = []
        valid.reserveCapacity(r.records.count)
        for record in r.records {
            guard record.previousChain.count == 32,
                  let claimed = record.fields.last(where: { $0.name == "KMS_CHAIN" }).flatMap({ AuditLog.unhex($0.value) }),
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
