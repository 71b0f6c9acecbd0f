//! The configuration parser and validator on arbitrary text: never panic;
//! every accepted configuration validates the same way twice.

#![no_main]

use irisd::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = toml::from_str::<Config>(text) else { return };
    let first = config.validate().is_ok();
    assert_eq!(first, config.validate().is_ok());
});
