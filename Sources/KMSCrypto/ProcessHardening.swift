import CKMSLinux
import Glibc

/// Process-wide protections for a daemon that holds keys.
public enum ProcessHardening {
    /// Makes the process non-dumpable (no core dumps, no ptrace by non-root) and sets
    /// RLIMIT_CORE to 0. Throws when either cannot be applied.
    public static func apply() throws {
        guard kms_disable_core_dumps() == 0 else {
            throw CryptoError.invalidParameter("setrlimit(RLIMIT_CORE, 0) failed (errno \(errno))")
        }
        guard kms_set_nondumpable() == 0 else {
            throw CryptoError.invalidParameter("prctl(PR_SET_DUMPABLE, 0) failed (errno \(errno))")
        }
    }
}
