/// The credential provider's names (PROTOCOL.md §13): which units and credential ids are
/// accepted, and the encryption context a stored credential is bound to. Shared by kmsd and
/// kmsctl so both refuse the same names.
public enum CredentialNames {
    /// Encryption-context keys of a stored credential: its unit and its id.
    public static let unitContextKey = "systemd-unit"
    public static let credentialContextKey = "credential"
    public static let defaultDirectory = "/etc/kmsd/credentials"
    public static let defaultSocketPath = "/run/kmsd/credentials.sock"

    public static func context(unit: String, id: String) -> [String: String] {
        [unitContextKey: unit, credentialContextKey: id]
    }

    private static let unitCharacters = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:-_.\\@")
    private static let idCharacters = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:-_.@")

    /// A unit name as systemd writes them (`NAME.TYPE`, at most 255 bytes, systemd's
    /// characters, so never a path).
    public static func isValidUnit(_ s: String) -> Bool {
        (3...255).contains(s.utf8.count) && s.allSatisfy(unitCharacters.contains) && s.contains(".") && !s.hasPrefix(".")
    }

    /// A credential id as systemd allows them: 1–255 bytes, no '/', not "." or "..".
    public static func isValidID(_ s: String) -> Bool {
        (1...255).contains(s.utf8.count) && s.allSatisfy(idCharacters.contains) && s != "." && s != ".."
    }
}
