//! Arbitrary command lines into flag parsing (argh) and validation (`Config::from_flags`). The
//! bytes, read as lossy UTF-8, are split on NUL or whitespace into at most 40 arguments (empty
//! ones included, as a shell passes `""`). Invariants: no panic; an argh failure is argh's own
//! message (not checked further); a `from_flags` error is one line and starts with the flag it
//! names, `--...`. The unit test `flag_errors_hold_for_generated_command_lines` in
//! src/config.rs checks the same on generated command lines.
//!
//! Run: cargo +nightly fuzz run flags -- -dict=fuzz/flags.dict

#![no_main]

use argh::FromArgs;
use libfuzzer_sys::fuzz_target;
use ringway::config::{Config, Flags};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let args: Vec<&str> = text
        .split(|c: char| c == '\0' || c.is_whitespace())
        .take(40)
        .collect();
    let Ok(flags) = Flags::from_args(&["ringway"], &args) else {
        return; // argh's own message (unknown flag, missing value, --help)
    };
    if let Err(error) = Config::from_flags(&flags) {
        let message = error.to_string();
        assert!(
            error.flag.starts_with("--") && message.starts_with(error.flag),
            "{args:?} gave an error not led by its flag: {message:?}"
        );
        assert!(!message.contains('\n'), "{args:?} gave {message:?}");
    }
});
