// Entry point of kmsctl. The command tree lives in KMSCtl.swift; KMSCtl.runMain() parses the
// arguments, runs the chosen subcommand and maps every error to a message and exit status.
await KMSCtl.runMain()
