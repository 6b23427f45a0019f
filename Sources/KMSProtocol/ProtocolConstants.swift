/// Constants every client and server of protocol version 1 agrees on (see Protocol/PROTOCOL.md).
public enum KMSProtocolConstants {
    /// The protocol version this code speaks.
    public static let protocolVersion: UInt32 = 1
    /// Length of the big-endian frame length prefix.
    public static let lengthPrefixBytes = 4
    /// Default largest frame body a server accepts.
    public static let defaultMaxFrameBytes = 65_536
    /// Hard ceiling on any configured frame size.
    public static let maxConfigurableFrameBytes = 16 * 1024 * 1024
    /// Request id reserved for connection-level errors.
    public static let connectionErrorRequestID: UInt64 = 0
    /// The socket clients use when neither `--socket` nor `KMSD_SOCKET` says otherwise.
    public static let defaultSocketPath = "/run/kmsd/kmsd.sock"
    /// The environment variable clients read for the socket path.
    public static let socketEnvironmentVariable = "KMSD_SOCKET"
}

/// Public limits on request fields, enforced by the server and documented in PROTOCOL.md.
public enum KMSLimits {
    public static let maxPlaintextBytes = 4096
    public static let maxCiphertextBlobBytes = 6144
    public static let maxDataKeyBytes = 1024
    public static let maxRandomBytes = 1024
    public static let maxContextPairs = 64
    public static let maxCanonicalContextBytes = 8192
    public static let maxDescriptionBytes = 8192
    public static let maxTags = 50
    public static let maxTagKeyLength = 128
    public static let maxTagValueLength = 256
    public static let defaultListLimit = 100
    public static let maxListLimit = 1000
    /// ScheduleKeyDeletion's waiting period, in days (as AWS KMS).
    public static let pendingWindowDays: ClosedRange<UInt32> = 7...30
    public static let defaultPendingWindowDays: UInt32 = 30
    public static let maxAliasesPerKey = 50
    /// EnableKeyRotation's period, in days (as AWS KMS), and the on-demand rotations a key may have.
    public static let rotationPeriodDays: ClosedRange<UInt32> = 90...2560
    public static let defaultRotationPeriodDays: UInt32 = 365
    public static let maxOnDemandRotations: UInt32 = 10
    public static let aliasARNPrefix = "kmsd:alias/"
}
