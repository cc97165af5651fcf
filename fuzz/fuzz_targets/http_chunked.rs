#![no_main]
//! Upload bodies in chunked transfer coding, straight from the network.
use diskcast_bootserver::http::ChunkedReader;
use libfuzzer_sys::fuzz_target;
use std::io::Read;

fuzz_target!(|data: &[u8]| {
    let mut body = Vec::new();
    let _ = ChunkedReader::new(data).read_to_end(&mut body);
    assert!(body.len() <= data.len());
});
