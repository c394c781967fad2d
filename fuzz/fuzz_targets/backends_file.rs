//! Arbitrary text (bytes read as lossy UTF-8, as a file with bad bytes would be) into the
//! backends-file parser. Invariants: no panic; an `Ok` list is non-empty, has unique names and
//! someone may take traffic (not every weight 0); an error is one line. The unit test
//! `parse_backends_file_invariants_hold_for_generated_text` in src/discovery/backends_file.rs
//! checks the same on generated inputs.
//!
//! Run: cargo +nightly fuzz run backends_file -- -dict=fuzz/backends_file.dict

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use ringway::discovery::backends_file::parse_backends_file;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse_backends_file(&text) {
        Ok(backends) => {
            assert!(!backends.is_empty(), "Ok with no backends for {text:?}");
            let mut names = HashSet::new();
            for b in &backends {
                assert!(names.insert(b.name.as_str()), "{} twice in {text:?}", b.name);
            }
            assert!(backends.iter().any(|b| b.weight > 0), "all weight 0: {text:?}");
        }
        Err(error) => assert!(!error.contains('\n'), "not one line: {error:?}"),
    }
});
