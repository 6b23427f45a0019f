/// Failures of the crypto module. None carries secret bytes.
public enum CryptoError: Error, Sendable, Equatable, CustomStringConvertible {
    /// An AEAD tag did not verify: wrong key, wrong AAD, or tampered data. Deliberately opaque.
    case authenticationFailure
    /// A parameter had the wrong size or shape (the message names which).
    case invalidParameter(String)
    /// OpenSSL reported an internal failure in the named call.
    case openSSL(String)
    /// Locked memory could not be obtained (the message names the limit and how to raise it).
    case cannotLockMemory(String)

    public var description: String {
        switch self {
        case .authenticationFailure: "authentication failed"
        case .invalidParameter(let what): "invalid parameter: \(what)"
        case .openSSL(let call): "OpenSSL call \(call) failed"
        case .cannotLockMemory(let why): why
        }
    }
}
