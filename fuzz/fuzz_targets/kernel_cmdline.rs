#![no_main]
use diskcast_proto::cmdline::BootConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        if let Ok(config) = BootConfig::parse(line) {
            assert_eq!(BootConfig::parse(&config.render()), Ok(config));
        }
    }
});
