//! The policy parser: the input is a policy file's text (lossy UTF-8), validated as
//! `policy check` and the agent do. Every problem must name a line of the text.
#![no_main]

use std::path::Path;

use backupd::policy::parse::parse_policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(problems) = parse_policy(&text, Path::new("/etc/backupd/policies/fuzz.toml")) {
        let lines = text.lines().count().max(1);
        for p in problems {
            assert!(p.line <= lines + 1, "problem on line {} of {lines}", p.line);
        }
    }
});
