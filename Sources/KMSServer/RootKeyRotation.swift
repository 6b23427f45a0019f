import Foundation
import Glibc
import KMSCore

/// `kmsd rewrap`: root-key rotation, offline (kmsd stopped; the state directory's lock
/// guarantees it). The keystore key is re-wrapped under the new root key in one durable write
/// (KeyRepository.rewrap), so after a crash at any point the keystore is under exactly one of
/// the two keys, and running the command again finishes or confirms the move.
public enum RootKeyRotation {
    /// The old root key comes from where kmsd itself would load it ($CREDENTIALS_DIRECTORY/root-key,
    /// else rootKeyFile, else in development mode STATE_DIR/root-key); the new one from
    /// `newKeyFile`, else $CREDENTIALS_DIRECTORY/new-root-key. Returns what happened, for the
    /// administrator.
    public static func run(configuration c: ServerConfiguration, newKeyFile: String?) throws -> String {
        try c.validate()
        guard FileManager.default.fileExists(atPath: c.keystorePath) else {
            throw ConfigurationError("no keystore at \(c.keystorePath): nothing to rewrap (start kmsd with the new root key instead)")
        }
        try StateDirectory.checkContents(c.stateDirectory)
        let lock = try StateDirectory.lock(c.stateDirectory)
        defer { close(lock) }
        let credentials = ProcessInfo.processInfo.environment["CREDENTIALS_DIRECTORY"]
        let devPath = c.development && FileManager.default.fileExists(atPath: c.devRootKeyPath) ? c.devRootKeyPath : nil
        let (old, oldSource) = try RootKey.load(credentialsDirectory: credentials, file: c.rootKeyFile, devPath: devPath)
        let new: RootKey, newSource: String
        if let newKeyFile {
            try StateDirectory.checkTrusted(newKeyFile, what: "new root key file")
            new = try RootKey.read(file: newKeyFile)
            newSource = "file \(newKeyFile)"
        } else if let dir = credentials, !dir.isEmpty, FileManager.default.fileExists(atPath: dir + "/new-root-key") {
            new = try RootKey.read(file: dir + "/new-root-key", privateOnly: false)
            newSource = "systemd credential \(dir)/new-root-key"
        } else {
            throw ConfigurationError("no new root key: give --new-root-key-file FILE, or the systemd credential new-root-key (LoadCredentialEncrypted=new-root-key:…)")
        }
        let storage = try SQLiteKeyStorage(path: c.keystorePath)
        let result = try KeyRepository.rewrap(storage, from: old, to: new)
        // The keystore opens under the new key, its rows and row index check out.
        let reopened = try KeyRepository(storage: storage, root: new)
        if let problem = reopened.integrityReport.problem {
            throw ConfigurationError("the keystore is now under root key \(new.fingerprint), but its row index reports: \(problem)")
        }
        switch result {
        case .rewrapped:
            return "keystore \(c.keystorePath) moved from root key \(old.fingerprint) (\(oldSource)) to root key \(new.fingerprint) (\(newSource)). Start kmsd with the new root key; the old one no longer opens this keystore"
        case .alreadyUnderNewKey:
            return "keystore \(c.keystorePath) is already under the new root key \(new.fingerprint) (\(newSource)): an earlier rewrap finished. Start kmsd with the new root key"
        }
    }
}
