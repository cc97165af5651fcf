#![no_main]
//! A stick's diskcast.cfg, edited by hand on any computer.
use diskcast_proto::cmdline::BootConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let mut config = BootConfig::default();
        if config.apply_settings_file(text).is_ok() {
            let mut again = BootConfig::default();
            again
                .apply_settings_file(&config.render_settings_file())
                .expect("rendered settings parse");
            assert_eq!(again, config);
        }
    }
});
