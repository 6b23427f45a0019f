// swift-tools-version:6.1
import PackageDescription

// Arrows point down: executables -> KMSServer/KMSClient -> KMSCore -> KMSCrypto -> C shims.
// KMSClient depends only on KMSProtocol, KMSEnvelope and KMSCrypto (file envelopes and cached
// data keys: AES-GCM and locked memory in the client) and its transport (SwiftNIO); the build
// checks it
// (`--explicit-target-dependency-import-check error` in the Makefile).
let package = Package(
    name: "kmsd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "kmsd", targets: ["kmsd"]),
        .executable(name: "kmsctl", targets: ["kmsctl"]),
        .executable(name: "kmsbench", targets: ["kmsbench"]),
        .executable(name: "kmsfuzz", targets: ["kmsfuzz"]),
        .library(name: "KMSClient", targets: ["KMSClient"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
    ],
    targets: [
        .systemLibrary(name: "CKMSOpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CKMSSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        .systemLibrary(name: "CSQLite", pkgConfig: "sqlite3", providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(name: "CKMSLinux"),

        .target(
            name: "KMSProtocol",
            dependencies: [
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            exclude: ["Generated/README.md"]
        ),
        .target(name: "KMSCrypto", dependencies: ["CKMSOpenSSL", "CKMSLinux"]),
        .target(name: "KMSCore", dependencies: ["KMSCrypto", "KMSProtocol", "CSQLite"]),
        // The file envelope format (PROTOCOL.md §16) without transport: KMSClient adds kmsd,
        // KMSServer's fuzz targets drive its reader.
        .target(name: "KMSEnvelope", dependencies: ["KMSCrypto", "KMSProtocol"]),
        .target(
            name: "KMSServer",
            dependencies: [
                "KMSCore", "KMSCrypto", "KMSProtocol", "KMSEnvelope", "CKMSSystemd", "CKMSLinux",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .target(
            name: "KMSClient",
            dependencies: [
                "KMSProtocol", "KMSCrypto", "KMSEnvelope",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "kmsd",
            dependencies: ["KMSServer", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "kmsctl",
            dependencies: ["KMSClient", "KMSCrypto", "CKMSSystemd", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "kmsbench",
            dependencies: ["KMSProtocol", "KMSCore", "KMSCrypto", "KMSClient", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),

        // Fuzz targets (`make fuzz`: built with -sanitize=fuzzer and -DKMSFUZZ_LIBFUZZER); the
        // ordinary build replays corpora and regressions through the same targets.
        .executableTarget(name: "kmsfuzz", dependencies: ["KMSServer", "KMSProtocol", "KMSEnvelope", "KMSCrypto"]),

        .testTarget(
            name: "KMSProtocolTests",
            dependencies: ["KMSProtocol", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio")]
        ),
        .testTarget(name: "KMSCryptoTests", dependencies: ["KMSCrypto"]),
        .testTarget(name: "KMSCoreTests", dependencies: ["KMSCore", "KMSCrypto", "KMSProtocol", "CSQLite"]),
        .testTarget(
            name: "KMSServerTests",
            dependencies: ["KMSServer", "KMSCore", "KMSProtocol", "CKMSLinux", .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "NIOPosix", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio")]
        ),
        .testTarget(name: "KMSClientTests", dependencies: ["KMSClient", "KMSEnvelope", "KMSCrypto"]),
        .testTarget(
            name: "EndToEndTests",
            dependencies: ["KMSClient", "KMSProtocol", "KMSCrypto", .product(name: "NIOCore", package: "swift-nio")]
        ),
    ]
)
