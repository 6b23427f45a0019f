import ArgumentParser
import Foundation
import KMSClient

/// kmsctl: the command-line client of kmsd. Wiring only: each subcommand lives in its own file.
struct KMSCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kmsctl",
        abstract: "Command-line client for kmsd, the local AWS-KMS-like key service.",
        discussion: """
        kmsctl talks to kmsd over its Unix socket: --socket PATH, else $KMSD_SOCKET, \
        else /run/kmsd/kmsd.sock.

        encrypt, decrypt and re-encrypt read standard input and write raw bytes to standard \
        output (--base64 for base64 text); --json prints the result as JSON with AWS KMS field \
        names. Errors go to standard error as "kmsctl: <ErrorCode>: <message>"; the exit \
        status is 1 for service errors, 2 for usage errors and 3 when kmsd cannot be reached.

        Examples:
          kmsctl create-key --description app
          echo -n secret | kmsctl encrypt --key-id ID --context app=web > blob
          kmsctl decrypt --context app=web < blob
          kmsctl encrypt-file --key-id ID --context app=web < big.tar > big.tar.kms
          kmsctl decrypt-file --context app=web < big.tar.kms > big.tar
        """,
        subcommands: [
            Hello.self,
            WhoAmI.self,
            CreateKey.self,
            DescribeKey.self,
            ListKeys.self,
            EnableKey.self,
            DisableKey.self,
            ScheduleKeyDeletion.self,
            CancelKeyDeletion.self,
            UpdateKeyDescription.self,
            CreateAlias.self,
            UpdateAlias.self,
            DeleteAlias.self,
            ListAliases.self,
            TagResource.self,
            UntagResource.self,
            ListResourceTags.self,
            EnableKeyRotation.self,
            DisableKeyRotation.self,
            GetKeyRotationStatus.self,
            RotateKeyOnDemand.self,
            ListKeyRotations.self,
            SetMinimumDecryptionVersion.self,
            GetParametersForImport.self,
            ImportKeyMaterial.self,
            DeleteImportedKeyMaterial.self,
            GetKeyPolicy.self,
            PutKeyPolicy.self,
            ListKeyPolicies.self,
            SimulatePolicy.self,
            CreateGrant.self,
            ListGrants.self,
            ListRetirableGrants.self,
            RetireGrant.self,
            RevokeGrant.self,
            ReviewAccess.self,
            Audit.self,
            Status.self,
            Metrics.self,
            Backup.self,
            GetReplicationIdentity.self,
            PinReplicationIdentity.self,
            ReplicateKey.self,
            SyncReplica.self,
            ImportReplica.self,
            UpdatePrimaryRegion.self,
            Encrypt.self,
            Decrypt.self,
            EncryptFile.self,
            DecryptFile.self,
            ReEncrypt.self,
            GenerateDataKey.self,
            GenerateDataKeyWithoutPlaintext.self,
            GenerateRandom.self,
            Exec.self,
            PutCredential.self,
            DeleteCredential.self,
            LoadCredential.self,
        ]
    )

    /// Parses the command line, runs the chosen command and exits. This is the one place that
    /// turns errors into messages and exit statuses:
    /// - usage errors (parsing, validate()): ArgumentParser's message, status 2;
    /// - KMSError: `kmsctl: <code>: <message>`, status 1;
    /// - KMSTransportError: `kmsctl: ConnectionError: <message>`, status 3.
    static func runMain() async -> Never {
        var command: ParsableCommand
        do {
            command = try await asyncParseAsRoot()
        } catch {
            exitWithArgumentParserError(error)
        }
        do {
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            exitWithRunError(error)
        }
        terminate(ExitStatus.success)
    }

    /// Errors thrown while running a command.
    private static func exitWithRunError(_ error: Error) -> Never {
        switch error {
        case let e as KMSError:
            reportError(code: e.code.rawValue, message: e.message)
            terminate(ExitStatus.serviceError)
        case let e as EnvelopeError:
            reportError(code: e.code.rawValue, message: e.message)
            terminate(ExitStatus.serviceError)
        case let e as EnvelopeIOError:
            reportError(code: "IOError", message: e.description)
            terminate(ExitStatus.serviceError)
        case let e as KMSTransportError:
            reportError(code: "ConnectionError", message: e.description)
            terminate(ExitStatus.connectionError)
        case let e as ExitCode:
            terminate(e.rawValue)
        case is CleanExit, is ValidationError:
            // e.g. the root command run without a subcommand prints its help.
            exitWithArgumentParserError(error)
        case _ where String(reflecting: type(of: error)).hasPrefix("ArgumentParser."):
            // Help and usage errors that surface while running (e.g. `kmsctl --help`).
            exitWithArgumentParserError(error)
        default:
            reportError(code: KMSErrorCode.internalError.rawValue, message: "kmsctl failed: \(error)")
            terminate(ExitStatus.serviceError)
        }
    }

    /// Help requests and usage errors, reported the way ArgumentParser does, except that usage
    /// errors exit with status 2.
    private static func exitWithArgumentParserError(_ error: Error) -> Never {
        let code = exitCode(for: error)
        let text = fullMessage(for: error)
        if code.rawValue == ExitCode.success.rawValue {
            if !text.isEmpty { writeStdout(text + "\n") }
            terminate(ExitStatus.success)
        }
        if !text.isEmpty { writeStderr(text + "\n") }
        terminate(code.rawValue == ExitCode.validationFailure.rawValue ? ExitStatus.usageError : code.rawValue)
    }
}
