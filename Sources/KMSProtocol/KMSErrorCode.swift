/// The stable error codes of the kmsd protocol, named like AWS KMS exceptions.
///
/// The raw value is what travels in `Error.code`; it never changes once released.
public enum KMSErrorCode: String, Sendable, CaseIterable, Codable {
    case accessDenied = "AccessDeniedException"
    case alreadyExists = "AlreadyExistsException"
    case auditUnavailable = "AuditUnavailableException"
    case disabled = "DisabledException"
    case expiredImportToken = "ExpiredImportTokenException"
    case incorrectKeyMaterial = "IncorrectKeyMaterialException"
    case incorrectKey = "IncorrectKeyException"
    case invalidCiphertext = "InvalidCiphertextException"
    case invalidImportToken = "InvalidImportTokenException"
    case invalidKeyUsage = "InvalidKeyUsageException"
    case invalidMarker = "InvalidMarkerException"
    case internalError = "KMSInternalException"
    case invalidState = "KMSInvalidStateException"
    case keyUnavailable = "KeyUnavailableException"
    case limitExceeded = "LimitExceededException"
    case notFound = "NotFoundException"
    case throttling = "ThrottlingException"
    case unsupportedOperation = "UnsupportedOperationException"
    case validation = "ValidationException"
}

/// A failed request: a stable code and a message for people that says what to do next.
///
/// Equal by code, so tests and callers can match on the code alone. The message never
/// contains secret bytes.
public struct KMSError: Error, Sendable, CustomStringConvertible, Equatable {
    public let code: KMSErrorCode
    public let message: String

    public init(_ code: KMSErrorCode, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }

    public static func == (lhs: KMSError, rhs: KMSError) -> Bool { lhs.code == rhs.code }
}
