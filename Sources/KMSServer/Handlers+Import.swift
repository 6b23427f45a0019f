import Foundation
import KMSCore
import KMSProtocol

/// GetParametersForImport, ImportKeyMaterial, DeleteImportedKeyMaterial.
enum ImportHandlers {
    static func getParametersForImport(_ r: Kmsd_V1_GetParametersForImportRequest, _ ctx: HandlerContext,
                                       _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_GetParametersForImportResponse {
        d.noteKey(requested: r.keyID)
        let p = try ctx.service.getParametersForImport(r.keyID, algorithm: r.wrappingAlgorithm, keySpec: r.wrappingKeySpec,
                                                       caller: ctx.principal)
        d.keyID = p.keyID.description
        return .with {
            $0.keyID = p.keyID.description
            $0.importToken = Data(p.importToken)
            $0.publicKey = Data(p.publicKey)
            $0.parametersValidTo = Int64(p.validTo.timeIntervalSince1970)
        }
    }

    static func importKeyMaterial(_ r: Kmsd_V1_ImportKeyMaterialRequest, _ ctx: HandlerContext,
                                  _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_ImportKeyMaterialResponse {
        d.noteKey(requested: r.keyID)
        let change = try ctx.service.importKeyMaterial(r.keyID, importToken: Array(r.importToken),
                                                       encryptedKeyMaterial: Array(r.encryptedKeyMaterial),
                                                       expirationModel: r.expirationModel, validTo: r.validTo, caller: ctx.principal)
        d.keyID = change.after.keyID.description
        d.keyVersion = change.after.currentVersion
        let service = ctx.service
        d.undo = { try service.undoImport(change) }
        return .init()
    }

    static func deleteImportedKeyMaterial(_ r: Kmsd_V1_DeleteImportedKeyMaterialRequest, _ ctx: HandlerContext,
                                          _ d: inout AuditDetails) throws(KMSError) -> Kmsd_V1_DeleteImportedKeyMaterialResponse {
        d.noteKey(requested: r.keyID)
        // Not undone when its record is refused: the material is gone (the same material can be
        // imported again). So refused before anything changes while journald is known not to
        // take records; should it fail in between, the answer still says the audit failed.
        try ctx.requireAuditable("delete imported key material")
        let change = try ctx.service.deleteImportedKeyMaterial(r.keyID, caller: ctx.principal)
        d.keyID = change.after.keyID.description
        return .init()
    }
}
