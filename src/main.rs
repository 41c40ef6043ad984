//! The `backupd` binary: parse, set up logging, run, map the error to an exit code.

fn main() {
    let code = backupd::cli::main();
    std::process::exit(code);
}
