//! `params` metadata (JSON) → options: any UTF-8 string gives `Ok` or a clean `Err`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let _ = candle_ot_cli::eval::parse_params(Some(s));
});
