//! Token verification on arbitrary text: never panics, and never accepts a
//! token this key did not sign (the fuzzer cannot forge Ed25519).

#![no_main]

use irisd::auth::TokenAuthority;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let authority = TokenAuthority::from_secret([7; 32]);
    assert!(authority.verify(text, 0).is_err(), "an unsigned token was accepted: {text:?}");
});
