//! CSV point clouds: any UTF-8 text gives an (N, D) tensor or a clean `Err`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((t, _)) = candle_ot_cli::io::parse_csv(text) {
            assert_eq!(t.rank(), 2);
        }
    }
});
